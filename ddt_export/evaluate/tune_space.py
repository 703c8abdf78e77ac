"""What `tune` searches and how it is asked: the options, the search space, a candidate plan, their checks.

The search itself is `tune.py`; what it writes, `tune_write.py`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from ..core.config import FORECAST_ORDERS, solver_order
from ..core.errors import ConfigError, InputError
from ..runtime.sampling.request import MAX_TIMESHIFT, RequestInput
from .features import FeatureExtractor

DEFAULT_NUM = 500  # FID samples per seed and candidate (paired: the same noise as the reference)
DEFAULT_PROBE = 64  # samples of the probe stage (the first ones of the reference's first seed)
DEFAULT_CONFIRM = 10  # candidates confirmed with FID, at most
DEFAULT_RECALL_DELTA = 0.01
STEP_FRACTIONS = (1 / 8, 1 / 6, 1 / 5, 1 / 4, 1 / 3, 1 / 2)  # default step counts: these of the reference's
MIN_STEPS = 4
INTERVAL_SHIFTS = (-0.05, 0.05, 0.1)  # the default extra guidance intervals: (lo + shift, hi)


@dataclass(frozen=True)
class SearchSpace:
    """What tune tries. Empty `steps`: STEP_FRACTIONS of the reference's steps; `intervals` None: the reference's
    guidance interval with its lower edge moved by INTERVAL_SHIFTS (where the steps' times cross it sets how
    much guidance a few-step plan gets)."""

    solvers: tuple[str, ...] = ("euler", "adams:2", "adams:3", "adams:4")
    steps: tuple[int, ...] = ()
    timeshifts: tuple[float, ...] = (1.0, 1.5)
    rates: tuple[int, ...] = (2, 3)  # uniform:R
    dp_fractions: tuple[float, ...] = (1 / 2, 1 / 3, 1 / 4)  # dp:K, K = round(fraction x steps)
    forecasts: tuple[int, ...] = FORECAST_ORDERS
    intervals: tuple[tuple[float, float], ...] | None = None
    keep: int = 1  # per step count, the best solver/timeshift pairs of stage (a) that go on to stage (b)


@dataclass(frozen=True)
class TuneOptions:
    max_fid_delta: float  # the budget: |dFID| at most this (mean over seeds) ...
    max_recall_delta: float = DEFAULT_RECALL_DELTA  # ... and |d recall| at most this
    num: int = DEFAULT_NUM
    seeds: tuple[int, ...] = (0,)
    probe: int = DEFAULT_PROBE
    confirm: int = DEFAULT_CONFIRM
    space: SearchSpace = SearchSpace()
    features: str | FeatureExtractor | None = None  # digits | inception | an extractor (default: by image size)
    inception_onnx: Path | None = None
    stats: Path | None = None  # data statistics (default for the digits model: the bundled ones)
    batch: int = 100  # images per trajectory batch


@dataclass(frozen=True)
class Candidate:
    solver: str
    steps: int
    timeshift: float
    interval: tuple[float, float]
    schedule: str = "all"
    forecast: int = 0

    def given(self, num: int, seed: int) -> RequestInput:
        return RequestInput(num=num, seed=seed, steps=self.steps, solver=self.solver, forecast=self.forecast,
                            timeshift=self.timeshift, interval=tuple(self.interval), schedule=self.schedule)


def check_options(o: TuneOptions) -> None:
    """Every tune flag, before any sampling: one line naming the flag, what it must be and what it was."""
    if not (isinstance(o.max_fid_delta, (int, float)) and math.isfinite(o.max_fid_delta) and o.max_fid_delta >= 0):
        raise InputError("--max-fid-delta", "a finite number >= 0", o.max_fid_delta)
    if not (math.isfinite(o.max_recall_delta) and o.max_recall_delta >= 0):
        raise InputError("--max-recall-delta", "a finite number >= 0", o.max_recall_delta)
    for flag, value, lo in (("--num", o.num, 2), ("--confirm", o.confirm, 1), ("batch", o.batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise InputError(flag, f"an integer >= {lo}", value)
    if isinstance(o.probe, bool) or not isinstance(o.probe, int) or not 2 <= o.probe <= o.num:
        raise InputError("--probe", f"an integer in [2, --num = {o.num}] (the first samples of the reference's)",
                         o.probe)
    if not o.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in o.seeds):
        raise InputError("--seed", "one or more integers >= 0", list(o.seeds))
    s = o.space
    if not s.solvers:
        raise InputError("--solvers", "one or more of euler | adams:K", "none")
    for solver in s.solvers:
        try:
            solver_order(solver, "--solvers")
        except ConfigError as e:
            raise InputError("--solvers", e.expected, solver) from e
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in s.steps):
        raise InputError("--steps", "integers >= 1", list(s.steps))
    if not s.timeshifts or not all(math.isfinite(v) and 0 < v <= MAX_TIMESHIFT for v in s.timeshifts):
        raise InputError("--timeshifts", f"numbers in (0, {MAX_TIMESHIFT:g}]", list(s.timeshifts))
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 2 for r in s.rates):
        raise InputError("--rates", "integers >= 2 (uniform:R)", list(s.rates))
    if not all(0 < f < 1 for f in s.dp_fractions):
        raise InputError("--dp-fractions", "numbers in (0, 1) (dp:K with K = fraction x steps)", list(s.dp_fractions))
    if not s.forecasts or any(f not in FORECAST_ORDERS or isinstance(f, bool) for f in s.forecasts):
        raise InputError("--forecasts", " | ".join(map(str, FORECAST_ORDERS)), list(s.forecasts))
    for iv in s.intervals or ():
        if len(iv) != 2 or not (0 <= iv[0] <= iv[1] <= 1):
            raise InputError("--interval", "LO,HI with 0 <= LO <= HI <= 1", list(iv))
    if isinstance(s.keep, bool) or not isinstance(s.keep, int) or s.keep < 1:
        raise InputError("keep", "an integer >= 1", s.keep)


def search_steps(o: TuneOptions, ref) -> tuple[list[int], list[tuple[float, float]]]:
    """The step counts and the extra guidance intervals of the search."""
    n = ref.num_steps
    steps = sorted(set(o.space.steps)) or sorted({max(MIN_STEPS, round(n * f)) for f in STEP_FRACTIONS})
    lo, hi = ref.guidance_interval
    intervals = list(o.space.intervals) if o.space.intervals is not None else \
        [(round(lo + d, 6), hi) for d in INTERVAL_SHIFTS if 0 <= lo + d < hi]
    return [s for s in steps if s < n], [tuple(iv) for iv in intervals if tuple(iv) != tuple(ref.guidance_interval)]


def encoder_variants(o: TuneOptions, base: Candidate) -> list[Candidate]:
    """Stage (b): a stage-(a) candidate under each encoder schedule (uniform:R, dp:K) and forecast order."""
    specs = [f"uniform:{r}" for r in o.space.rates if r < base.steps]
    specs += sorted({f"dp:{max(2, round(f * base.steps))}" for f in o.space.dp_fractions
                     if 2 <= round(f * base.steps) < base.steps}, key=lambda s: -int(s[3:]))
    return [dataclasses.replace(base, schedule=spec, forecast=f) for spec in specs for f in o.space.forecasts]
