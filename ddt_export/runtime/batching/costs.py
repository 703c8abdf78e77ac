"""What an iteration costs: the per-call cost curve, a request's predicted solo latency, and the curve's fit from a
few timed calls (what `serve` does at start-up). Torch-free; nothing here reads a clock except `measure_curve`.

    curve = measure_curve(engines)                     # timed calls at 1, 2, 4, ..., batch.max rows (start-up)
    curve = fit_curve({"encoder": {1: [..s], 2: [..]}, "decoder": {...}})   # the fit alone: medians, monotone
    curve = read_curve("gpu_check.json")               # a stored curve: this module's JSON or gpu_check's
    solo = solo_seconds(curve, plan_steps(sampler, recompute), num)        # the request alone on the machine
    rest = rest_seconds(curve, steps, num)             # rest[k]: its steps k.. and the VAE call, alone

A request's solo latency is what the simulator charges it when it runs alone: one iteration per step (its
encoder rows at a recompute step, its decoder rows, the host's per-iteration and per-request costs), then one
VAE call over its images. The server's SLO is a multiple of it (`slo.py`).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ...core.errors import ConfigError
from ..graphs.engines import Graphs, call_graph
from ..sampling.plan import Step, plan_steps, step_rows
from ..sampling.step import run_step, start_rows

GRAPHS = ("encoder", "decoder", "vae_decoder")
REPEATS = 3  # timed calls per (graph, rows) at start-up; the median is kept ...
SPEND_S = 0.2  # ... fewer where the first ones took this long (the largest row counts)


@dataclass(frozen=True)
class CostCurve:
    """Seconds per graph call by rows: piecewise linear between the (rows, seconds) points, extrapolated
    linearly past the last two; plus the host's overheads."""

    encoder: tuple[tuple[int, float], ...]
    decoder: tuple[tuple[int, float], ...]
    vae_decoder: tuple[tuple[int, float], ...] = ((1, 0.0), (2, 0.0))
    iteration_s: float = 0.0  # per iteration: the loop, the thread hand-off
    request_step_s: float = 0.0  # per request per iteration: CFG combine, Euler step, slicing
    request_s: float = 0.0  # per answered request, outside the loop: HTTP, JSON, PNGs
    note: str = ""

    def call(self, graph: str, rows: int) -> float:
        """Seconds of one call of `rows` rows (0 for none). Plain Python: the scheduler's projections call it
        once per graph per projected iteration."""
        if rows <= 0:
            return 0.0
        pts = getattr(self, graph)
        if len(pts) == 1:
            return float(pts[0][1]) * rows / pts[0][0]
        if rows <= pts[0][0]:
            return float(pts[0][1])
        for (r0, s0), (r1, s1) in zip(pts, pts[1:]):
            if rows <= r1:
                return float(s0 + (s1 - s0) * (rows - r0) / (r1 - r0))
        (r0, s0), (r1, s1) = pts[-2], pts[-1]
        return float(s1 + (s1 - s0) / (r1 - r0) * (rows - r1))

    def iteration(self, requests: int, encoder_rows: int, decoder_rows: int) -> float:
        return (self.call("encoder", encoder_rows) + self.call("decoder", decoder_rows) + self.iteration_s
                + self.request_step_s * requests)

    def scaled(self, k: float) -> "CostCurve":
        """Every in-loop cost times k (the graph calls, the per-iteration and per-request-step overheads);
        `request_s`, outside the loop, as it is. `calibrate.Calibration` keeps the scheduler's curve so."""
        def pts(p):
            return tuple((r, s * k) for r, s in p)
        return CostCurve(pts(self.encoder), pts(self.decoder), pts(self.vae_decoder), self.iteration_s * k,
                         self.request_step_s * k, self.request_s, self.note)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "CostCurve":
        pts = {k: tuple(tuple(p) for p in d[k]) for k in GRAPHS if k in d}
        rest = {k: d[k] for k in ("iteration_s", "request_s", "request_step_s", "note") if k in d}
        return CostCurve(**pts, **rest)


def solo_seconds(curve: CostCurve, steps: Sequence[Step], num: int) -> float:
    """A request's latency alone on the machine (the server's time, `request_s` excluded): one iteration per
    step, then one VAE call over its `num` images (`rest_seconds`' first entry)."""
    return rest_seconds(curve, steps, num)[0]


def rest_seconds(curve: CostCurve, steps: Sequence[Step], num: int) -> tuple[float, ...]:
    """rest[k]: what steps k, k+1, ... and the final VAE call cost a request of `num` images alone on the machine
    (rest[0] is its solo latency; rest[len(steps)] the VAE call alone). The `slo` policy's urgency reads it."""
    out = [curve.call("vae_decoder", num)]
    for st in reversed(steps):
        enc, dec = step_rows(st, num)
        out.append(out[-1] + curve.iteration(1, enc, dec))
    return tuple(reversed(out))


def linearity(curve: CostCurve, graph: str = "decoder") -> float:
    """How close to linear in rows a graph's cost is: cost(top rows) / (top x cost(1 row)) over its points.
    1.0: rows cost the same batched or not (a CPU); well below 1: batching is nearly free (a GPU)."""
    pts = getattr(curve, graph)
    top = pts[-1][0]
    one = curve.call(graph, 1)
    return curve.call(graph, top) / (top * one) if one > 0 else 1.0


# ---------------------------------------------------------------------------------------------- the fit


def fit_curve(samples: Mapping[str, Mapping[int, Sequence[float]]], *, request_step_s: float = 0.0,
              iteration_s: float = 0.0, note: str = "") -> CostCurve:
    """The curve from timed calls: {graph: {rows: [seconds, ...]}} -> per graph the line a + b x rows (a, b >= 0,
    `line`) through the median of each row count, as points at those row counts; encoder and decoder
    required, vae_decoder free where absent (a folder without a VAE graph).

    A line, not the medians themselves: on a shared CPU one burst of other work can double a point, and the
    policy choice reads the curve's shape (its fixed part a against its per-row part b). A line loses nothing
    on either kind of machine modelled here: a CPU's cost is b x rows, and the GPU-like curve
    (`gpu_like_curve`) is itself a line, a launch plus the under-used rows of a small batch."""
    pts = {}
    for graph in GRAPHS:
        if graph not in samples:
            if graph == "vae_decoder":
                continue
            raise ConfigError("cost curve", f"timed calls of the {graph}", "none")
        got = sorted((int(r), float(np.median(s))) for r, s in samples[graph].items() if len(s))
        if not got or any(r < 1 or not np.isfinite(s) or s < 0 for r, s in got):
            raise ConfigError(f"cost curve: {graph}", "seconds >= 0 at rows >= 1", got)
        a, b = line(np.array([r for r, _ in got], np.float64), np.array([s for _, s in got], np.float64))
        rows = sorted({r for r, _ in got} | {1, 2 * got[-1][0]})
        pts[graph] = tuple((r, a + b * r) for r in rows)
    return CostCurve(**pts, iteration_s=float(iteration_s), request_step_s=float(max(request_step_s, 0.0)),
                     note=note)


def line(rows: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """seconds = a + b x rows, a and b >= 0, fitted robustly (Theil-Sen: b the median of the slopes between
    every two points, a the median of seconds - b x rows), so one point spoiled by other work moves nothing;
    where a < 0, the line through 0 (b the median of seconds / rows); where b < 0, flat (a the median)."""
    if len(rows) == 1:
        return 0.0, float(seconds[0] / rows[0])
    i, j = np.triu_indices(len(rows), 1)
    b = float(np.median((seconds[j] - seconds[i]) / (rows[j] - rows[i])))
    a = float(np.median(seconds - b * rows))
    if b < 0:
        return float(np.median(seconds)), 0.0
    if a < 0:
        return 0.0, float(np.median(seconds / rows))
    return a, b


def curve_rows(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to batch.max, batch.max included."""
    rows, r = [], 1
    while r < max_batch:
        rows.append(r)
        r *= 2
    return rows + [max_batch]


def measure_curve(graphs: Graphs, rows: Sequence[int] | None = None, repeats: int = REPEATS,
                  clock: Callable[[], float] = time.perf_counter, spend_s: float = SPEND_S) -> CostCurve:
    """Time each graph at each row count on random inputs, largest first (after one 1-row warm-up call per graph:
    the first call of a session pays its set-up), the first call at each row count untimed, then up to `repeats`
    calls or `spend_s` seconds per point;
    and a few sampling steps of a 1-image request (the host time of a step beyond its graph calls, timed in the
    same step, is the per-request cost). `fit_curve` of the times. What `serve` runs at start-up."""
    m = graphs.config.model
    rng = np.random.default_rng(0)
    rows = sorted(set(rows or curve_rows(graphs.max_batch)), reverse=True)
    samples: dict[str, dict[int, list[float]]] = {g: {} for g in GRAPHS}
    names = [g for g in GRAPHS if g != "vae_decoder" or getattr(graphs, "vae_decoder", None) is not None]

    def timed(graph: str, feeds: dict) -> np.ndarray:
        ts: list[float] = []  # the first call of a shape pays its set-up (20-40% on onnxruntime): dropped
        while len(ts) < repeats + 1 and (len(ts) < 2 or sum(ts[1:]) < spend_s):
            t0 = clock()
            out = call_graph(graphs, graph, feeds)
            ts.append(clock() - t0)
        samples[graph][len(next(iter(feeds.values())))] = ts[1:]
        return out

    for r in [1, *rows]:  # the first: a warm-up (a session's first call pays its set-up), overwritten by the last
        x = rng.standard_normal((r, *m.latent_shape), dtype=np.float32)
        s = timed("encoder", {"x": x, "t": rng.uniform(0, 1, r).astype(np.float32),
                              "y": rng.integers(0, m.num_classes, r).astype(np.int64)})
        timed("decoder", {"x": x, "s": s})
        if "vae_decoder" in names:
            timed("vae_decoder", {"latent": x})
    if "vae_decoder" not in names:
        del samples["vae_decoder"]
    sampler = graphs.config.sampler
    step = plan_steps(sampler, range(sampler.num_steps))[0]  # a recompute step
    timed_graphs, host = _GraphTime(graphs, clock), []
    for _ in range(repeats + 1):  # the host time of a step beyond its graph calls, both timed in the same step
        item = start_rows(sampler, np.zeros(1, np.int64), 0, range(1), m.latent_shape)
        timed_graphs.seconds = 0.0
        t0 = clock()
        run_step(timed_graphs, [(item, step)])
        host.append(clock() - t0 - timed_graphs.seconds)
    return fit_curve(samples, request_step_s=float(np.median(host[1:])),
                     note=f"measured at start-up: rows {sorted(rows)}, median of up to {repeats} calls")


class _GraphTime:
    """The graphs, adding up the seconds their calls take (to tell a step's host time from its graph time)."""

    def __init__(self, graphs: Graphs, clock: Callable[[], float]):
        self.graphs, self.clock, self.seconds = graphs, clock, 0.0
        self.config, self.max_batch, self.min_batch = graphs.config, graphs.max_batch, graphs.min_batch

    def run(self, graph: str, feeds: dict) -> dict:
        t0 = self.clock()
        try:
            return self.graphs.run(graph, feeds)
        finally:
            self.seconds += self.clock() - t0


def read_curve(path: Path, field: str = "--cost-curve") -> CostCurve:
    """A stored curve: `CostCurve.to_dict()` JSON (or one under a "curve" key, as the load benchmark writes), or
    a `scripts/gpu_check.py` result (`results.cost-curve`: {graph: {rows: seconds}} measured on a GPU)."""
    try:
        d = json.loads(Path(path).read_text())
        if isinstance(d, dict) and "cost-curve" in d.get("results", {}):
            c = d["results"]["cost-curve"]
            pts = {g: tuple(sorted((int(r), float(t)) for r, t in c[g].items())) for g in GRAPHS if g in c}
            return CostCurve(**pts, note=f"measured by gpu_check on {c.get('gpu', 'a GPU')}")
        curve = CostCurve.from_dict(d.get("curve", d))
        for g in ("encoder", "decoder"):
            if not getattr(curve, g) or any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in getattr(curve, g)):
                raise ValueError(f"{g}: bad points")
        return curve
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(field, "a cost-curve JSON (CostCurve fields, or a gpu_check.json with results.cost-curve)",
                          f"{path}: {type(e).__name__}: {e}")
