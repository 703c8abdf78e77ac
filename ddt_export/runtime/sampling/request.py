"""A sampling request, resolved once. Torch-free.

Every way in (CLI flags, an HTTP body, a Ray task, validate, calibrate) states what it was given as a
`RequestInput`, and `resolve` turns it into one frozen `SampleRequest`: labels, seed, the model's sampler
with the overrides, the parsed schedule. Every later stage reads that record. The checks live here, once, and
each error names the field the way its caller typed it (`FieldNames`: `--cfg` on the command line, `cfg` in a
JSON body), so the CLI's one-line error and the API's 422 are the same sentence.

    request = resolve(engines.config, RequestInput(classes=(3,), num=4, cfg=2.0, schedule="dp:5"), CLI)
    request = resolve_schedule(request, engines)    # dp:K: stored with the engines or computed (schedules.py)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ...core.classes import ClassNames
from ...core.config import FORECAST_ORDERS, MAX_ADAMS_ORDER, Config, SamplerConfig, solver_order
from ...core.errors import ArtifactError, ConfigError, InputError
from ...core.labels import Labels
from .grammar import ScheduleSpec, default_schedule, parse_schedule, validate_steps
from .plans import PLAN_FIELDS, Plan

MAX_SEED = 2 ** 63 - 1  # numpy's SeedSequence takes any non-negative int; JSON and int64 hold this much
MAX_CFG = 100.0  # far above any useful scale (ImageNet FID runs use 1.5-4); keeps v_u + s (v_c - v_u) finite
MAX_TIMESHIFT = 100.0
DEFAULT_NUM = 8  # images when neither --num nor --class / --labels says how many

# What each field must be, in words: the errors say it, and the API's OpenAPI descriptions.
EXPECTED = {
    "num": ">= 1",
    "seed": f"an integer in [0, {MAX_SEED}]",
    "steps": "an integer >= 1",
    "cfg": f"a finite number in [0, {MAX_CFG:g}] (the CFG scale inside the guidance interval)",
    "interval": "[lo, hi] with 0 <= lo <= hi <= 1 (guidance applies where lo < t < hi)",
    "timeshift": f"a finite number in (0, {MAX_TIMESHIFT:g}] (the official timestep shift)",
    "solver": f"euler | adams:K with K in 1..{MAX_ADAMS_ORDER} (the official AdamLMSampler of order K)",
    "forecast": " | ".join(map(str, FORECAST_ORDERS)) + " (0 reuses the encoder state; 1, 2 extrapolate it)",
    # the serving terms (runtime.batching.slo checks them; the API's schema says the same)
    "deadline_ms": "a finite number > 0 (milliseconds from arrival to the images; default --slo-scale x the "
                   "predicted solo latency)",
    "max_fid_delta": "a finite number >= 0 (the most dFID of a cheaper stored plan the request accepts under load)",
    "quality": "exact | adaptive (adaptive: under load, any stored plan up to the fast plan's dFID)",
    "priority": "low | normal | high",
}


@dataclass(frozen=True)
class FieldNames:
    """How one kind of caller names the request's fields (what its errors say)."""

    classes: str
    labels_file: str
    num: str
    seed: str
    steps: str
    cfg: str
    schedule: str
    interval: str
    timeshift: str
    solver: str
    forecast: str
    plan: str
    files: bool  # may the schedule name a JSON file


CLI = FieldNames("--class", "--labels", "--num", "--seed", "--steps", "--cfg", "--schedule", "--interval",
                 "--timeshift", "--solver", "--forecast", "--plan", files=True)
API = FieldNames("class", "labels", "num", "seed", "steps", "cfg", "schedule", "interval", "timeshift", "solver",
                 "forecast", "plan", files=False)


@dataclass(frozen=True)
class RequestInput:
    """A request as given; None means the default (the manifest's sampler, `default_schedule`, ...)."""

    classes: tuple[int | str, ...] | None = None  # ids (or ids as text, `ClassNames.resolve`) cycled to num;
    # default 0, 1, 2, ... cycled
    labels_file: Path | None = None  # a 1-D integer .npy instead of classes
    num: int | None = None  # default: the labels given, or DEFAULT_NUM
    seed: int = 0
    steps: int | None = None
    cfg: float | None = None
    schedule: str | None = None
    interval: tuple[float, float] | None = None
    timeshift: float | None = None
    solver: str | None = None  # euler | adams:K
    forecast: int | None = None  # 0 | 1 | 2
    plan: str | None = None  # a plan stored with the engines: fixes steps, solver, forecast, timeshift, interval,
    # schedule (`plans.py`)


@dataclass(frozen=True, eq=False)
class SampleRequest:
    """A resolved request: what every later stage reads. `recompute` is None until the schedule is resolved
    against the engines (`schedules.resolve_schedule`; every kind but dp:K resolves without them).

    `label_seq` states the labels without holding them (`core.labels.Labels`: a batch run of 1e8 samples does not
    hold 800 MB of them); `labels` is the (num,) int64 array, made on first use (small requests)."""

    label_seq: Labels  # (num,) labels in [0, num_classes); an array is accepted and wrapped
    seed: int
    sampler: SamplerConfig
    schedule: ScheduleSpec
    recompute: tuple[int, ...] | None = None
    plan: str | None = None  # the plan that set the sampler and schedule, if any

    def __post_init__(self):
        if not isinstance(self.label_seq, Labels):
            object.__setattr__(self, "label_seq", Labels.of(np.asarray(self.label_seq, np.int64)))

    @cached_property
    def labels(self) -> np.ndarray:
        """(num,) int64."""
        return self.label_seq.array()

    @property
    def num(self) -> int:
        return len(self.label_seq)

    def with_steps(self, recompute: Sequence[int]) -> "SampleRequest":
        return dataclasses.replace(self, recompute=tuple(int(s) for s in recompute))


def _int(value, field: str, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(field, expected, repr(value))
    return int(value)


def label_seq(num_classes: int, given: RequestInput, names: FieldNames = CLI) -> Labels:
    """The labels file (memory-mapped), else the classes cycled to num, else 0, 1, 2, ... cycled to num (or 8).
    Class ids given as text are read by `ClassNames.resolve` (one canonical spelling: core/classes.py), so the
    CLI's --class and the API's class accept and refuse the same values with the same sentence."""
    num = given.num
    if given.labels_file is not None:
        if given.classes:
            raise InputError(names.labels_file, f"either {names.classes} or {names.labels_file}", "both")
        try:
            rows = np.load(Path(given.labels_file), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(names.labels_file, "a readable .npy file", f"{given.labels_file}: {e}")
        if rows.ndim != 1 or rows.dtype.kind not in "iu" or rows.size == 0:
            raise InputError(names.labels_file, "a non-empty 1-D integer .npy", f"{rows.dtype} {rows.shape}")
        if num is not None and rows.shape[0] != num:
            raise InputError(names.num, f"{rows.shape[0]} (the number of labels in {given.labels_file})", num)
        labels = Labels(rows, int(rows.shape[0]))
    else:
        ids = ClassNames.ids(num_classes)
        classes = [ids.resolve(c, names.classes) if isinstance(c, str) else
                   _int(c, names.classes, "class ids (integers)") for c in given.classes or ()]
        base = np.asarray(classes or range(num_classes), np.int64)
        labels = Labels(base, num if num is not None else (len(base) if classes else DEFAULT_NUM))
    bad = labels.bad(num_classes)
    if bad is not None:
        raise InputError(names.classes, f"a class id in [0, {num_classes})", bad)
    return labels


def make_labels(num_classes: int, given: RequestInput, names: FieldNames = CLI) -> np.ndarray:
    """(B,) int64: `label_seq`, materialized."""
    return label_seq(num_classes, given, names).array()


def _finite(value, field: str, expected: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(field, expected, repr(value))
    value = float(value)
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        raise InputError(field, expected, value)
    return value


def resolve_sampler(sampler: SamplerConfig, given: RequestInput, names: FieldNames = CLI) -> SamplerConfig:
    """The model's sampler with the request's overrides, each checked and named by its field."""
    changes: dict = {}
    if given.steps is not None:
        changes["num_steps"] = _int(given.steps, names.steps, EXPECTED["steps"])
        if changes["num_steps"] < 1:
            raise InputError(names.steps, EXPECTED["steps"], given.steps)
    if given.cfg is not None:
        changes["guidance"] = _finite(given.cfg, names.cfg, EXPECTED["cfg"], 0.0, MAX_CFG)
    if given.timeshift is not None:
        changes["timeshift"] = _finite(given.timeshift, names.timeshift, EXPECTED["timeshift"], 0.0, MAX_TIMESHIFT,
                                       lo_open=True)
    if given.interval is not None:
        iv = tuple(given.interval) if isinstance(given.interval, (tuple, list)) else ()
        if len(iv) != 2:
            raise InputError(names.interval, EXPECTED["interval"], repr(given.interval))
        lo, hi = (_finite(v, names.interval, EXPECTED["interval"], 0.0, 1.0) for v in iv)
        if lo > hi:
            raise InputError(names.interval, EXPECTED["interval"], [lo, hi])
        changes["guidance_interval"] = (lo, hi)
    if given.solver is not None:
        try:
            solver_order(given.solver, names.solver)
        except ConfigError as e:
            raise InputError(names.solver, EXPECTED["solver"], repr(given.solver) if not isinstance(
                given.solver, str) else given.solver) from e
        changes["solver"] = given.solver
    if given.forecast is not None:
        if isinstance(given.forecast, bool) or given.forecast not in FORECAST_ORDERS:
            raise InputError(names.forecast, EXPECTED["forecast"], given.forecast)
        changes["forecast"] = int(given.forecast)
    try:
        return dataclasses.replace(sampler, **changes)
    except ConfigError as e:  # a combination the config refuses: named as the config names it
        raise InputError(e.thing, e.expected, e.actual, e.hint)


def apply_plan(given: RequestInput, plans: Callable[[str], Plan] | None, names: FieldNames = CLI
               ) -> tuple[RequestInput, Plan | None]:
    """(the request with its plan's settings in place, the plan) (`plans(name)` reads one); refused when the
    request sets them too."""
    if given.plan is None:
        return given, None
    if plans is None:
        raise InputError(names.plan, "no plan here (plans are stored with engines)", given.plan)
    clash = [getattr(names, f) for f in PLAN_FIELDS if getattr(given, f) is not None]
    if clash:
        raise InputError(names.plan, "a plan alone (it fixes " + ", ".join(getattr(names, f) for f in PLAN_FIELDS)
                         + ")", f"{given.plan} with {', '.join(clash)}")
    plan = plans(given.plan)
    return dataclasses.replace(given, **plan.settings()), plan


def pinned_steps(plan: Plan | None, schedule: ScheduleSpec, num_steps: int) -> tuple[int, ...] | None:
    """A dp:K plan's recompute steps as it was measured (`Plan.pinned_steps`), checked; None for other plans."""
    if plan is None or plan.pinned_steps is None or schedule.kind != "dp":
        return None
    where = f"plan {plan.name}: recompute_steps"
    steps = tuple(validate_steps(plan.pinned_steps, num_steps, where))
    if len(steps) != schedule.value:
        raise ArtifactError(where, f"{schedule.value} steps (its schedule {schedule.text})", len(steps))
    return steps


def resolve(config: Config, given: RequestInput, names: FieldNames = CLI,
            plans: Callable[[str], Plan] | None = None) -> SampleRequest:
    """The one place a request is checked: labels, num, seed, the plan, the sampler overrides and the schedule's
    grammar. `plans(name)`: the engine folder's plan of that name (`plans.read_plan`)."""
    given, chosen = apply_plan(given, plans, names)
    if given.num is not None and _int(given.num, names.num, EXPECTED["num"]) < 1:
        raise InputError(names.num, EXPECTED["num"], given.num)
    seed = _int(given.seed, names.seed, EXPECTED["seed"])
    if not 0 <= seed <= MAX_SEED:
        raise InputError(names.seed, EXPECTED["seed"], seed)
    sampler = resolve_sampler(config.sampler, given, names)
    labels = label_seq(config.model.num_classes, given, names)
    text = given.schedule if given.schedule is not None else default_schedule(sampler)
    schedule = parse_schedule(text, names.schedule, names.files)
    if schedule.kind == "dp" and schedule.value > sampler.num_steps:
        raise InputError(names.schedule, f"dp:K with K <= {sampler.num_steps} (the steps)", schedule.text)
    return SampleRequest(labels, seed, sampler, schedule, pinned_steps(chosen, schedule, sampler.num_steps),
                         plan=chosen.name if chosen is not None else None)
