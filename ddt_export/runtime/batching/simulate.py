"""The batching simulator: the serving engine (`engine.Engine.step`, the same code the server runs) on a virtual
clock, with a per-call cost curve as its executor instead of engines. Torch-free. (Vidur does this for
vLLM-style schedulers.)

An iteration costs encoder(rows) + decoder(rows) + the host's per-iteration and per-request overheads; the
requests that take their last step pay one vae_decoder(rows) call; each answered request adds a fixed
`request_s` (HTTP, PNG encoding) to its latency. Arrivals during an iteration join at the next step boundary,
as in the server.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ..sampling.request import SampleRequest
from .engine import Engine
from .scheduler import QueueFull, RunnerOutput, Scheduler, SchedulerOutput


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
        if rows <= 0:
            return 0.0
        pts = np.array(getattr(self, graph), np.float64)  # (n, 2)
        r, s = pts[:, 0], pts[:, 1]
        if rows <= r[-1]:
            return float(np.interp(rows, r, s))
        slope = (s[-1] - s[-2]) / (r[-1] - r[-2])
        return float(s[-1] + slope * (rows - r[-1]))

    def iteration(self, requests: int, encoder_rows: int, decoder_rows: int) -> float:
        return (self.call("encoder", encoder_rows) + self.call("decoder", decoder_rows) + self.iteration_s
                + self.request_step_s * requests)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "CostCurve":
        pts = {k: tuple(tuple(p) for p in d[k]) for k in ("encoder", "decoder", "vae_decoder") if k in d}
        rest = {k: d[k] for k in ("iteration_s", "request_s", "request_step_s", "note") if k in d}
        return CostCurve(**pts, **rest)


class VirtualClock:
    """A clock that moves only when told: `clock()` reads it, `advance(seconds)` moves it."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class SimulatedRunner:
    """The engine's executor in simulation: each iteration advances the virtual clock by what the cost curve
    says it costs (the graph calls, then one VAE call for the requests that took their last step)."""

    def __init__(self, curve: CostCurve, clock: VirtualClock):
        self.curve, self.clock = curve, clock
        self.num: dict[int, int] = {}  # running request id -> its images

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for rid in out.freed:
            self.num.pop(rid, None)
        for rid, req in out.new:
            self.num[rid] = req.num
        if not out.batch:
            return RunnerOutput()
        step_s = self.curve.iteration(len(out.batch), out.encoder_rows, out.decoder_rows)
        self.clock.advance(step_s)
        last = [rid for rid, st in out.batch if st.last]
        rows = sum(self.num.pop(rid) for rid in last)
        vae_s = self.curve.call("vae_decoder", rows)
        self.clock.advance(vae_s)
        return RunnerOutput({}, {rid: None for rid in last}, step_s, vae_s, rows)

    def reset(self) -> None:
        self.num.clear()


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds from the start
    spec: SampleRequest  # resolved, with its recompute steps
    kind: int  # which request of the catalog (its solo latency is the slowdown's denominator)


@dataclass
class SimResult:
    latency: dict[int, float] = field(default_factory=dict)  # arrival index -> seconds (answered ones)
    queue: dict[int, float] = field(default_factory=dict)
    rejected: list[int] = field(default_factory=list)  # 503: the queue was full
    iterations: int = 0
    requests_per_iteration: float = 0.0
    rows_per_iteration: dict[str, float] = field(default_factory=dict)
    end: float = 0.0  # virtual time of the last answer


def simulate(arrivals: Sequence[Arrival], curve: CostCurve, row_budget: int, policy: str = "step",
             max_delay: float = 0.0, max_queue: int = 64) -> SimResult:
    """Run the arrivals through the serving engine on a virtual clock."""
    clock = VirtualClock()
    engine = Engine(Scheduler(row_budget, policy, max_delay, max_queue), SimulatedRunner(curve, clock), clock)
    res, index, i = SimResult(), {}, 0
    n_req = enc = dec = 0
    arrivals = sorted(arrivals, key=lambda a: a.t)
    while i < len(arrivals) or not engine.idle:
        while i < len(arrivals) and arrivals[i].t <= clock():
            try:
                index[engine.submit(arrivals[i].spec, arrival=arrivals[i].t).id] = i
            except QueueFull:
                res.rejected.append(i)
            i += 1
        it = engine.step()
        if it is None:  # idle until the next arrival or the request policy's window closing
            clock.t = max(clock(), min(t for t in (arrivals[i].t if i < len(arrivals) else None, engine.wakeup())
                                       if t is not None))
            continue
        res.iterations += 1
        n_req, enc, dec = n_req + len(it.stepped), enc + it.out.encoder_rows, dec + it.out.decoder_rows
        for req in it.finished:
            k = index[req.id]
            res.latency[k] = req.ended - req.arrival + curve.request_s
            res.queue[k] = req.admitted - req.arrival
        res.end = clock()
    if res.iterations:
        res.requests_per_iteration = n_req / res.iterations
        res.rows_per_iteration = {"encoder": enc / res.iterations, "decoder": dec / res.iterations}
    return res


def gpu_like_curve(encoder_flops: float, decoder_flops: float, vae_flops: float, *, peak_flops: float = 989e12,
                   max_utilization: float = 0.6, half_rows: float = 8.0, call_s: float = 0.5e-3,
                   request_step_s: float = 0.05e-3, request_s: float = 2e-3,
                   rows: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128)) -> CostCurve:
    """A stated assumption from the FLOP model, for a GPU (no GPU measured yet): a call of `rows` rows costs
    call_s + rows x flops / (peak x u(rows)), the utilization u(rows) = max_utilization x rows / (rows +
    half_rows) rising with rows (small GEMMs leave the GPU idle). Defaults: H100/H200 dense bf16 peak, 60%
    at best, half of that at 8 rows (M = 8 x 256 tokens), 0.5 ms per call (launch, host sync)."""
    def pts(flops):
        return tuple((r, call_s + flops * (r + half_rows) / (peak_flops * max_utilization)) for r in rows)

    return CostCurve(pts(encoder_flops), pts(decoder_flops), pts(vae_flops), iteration_s=0.0,
                     request_step_s=request_step_s, request_s=request_s,
                     note=f"GPU-like: {call_s * 1e3:.1f} ms/call + rows x FLOPs / ({peak_flops / 1e12:.0f} TFLOP/s x "
                          f"{max_utilization:.0%} x rows/(rows+{half_rows:g}))")
