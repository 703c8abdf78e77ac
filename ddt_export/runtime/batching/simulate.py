"""The batching simulator: the serving engine (`engine.Engine.step`, the same code the server runs) on a virtual
clock, with a per-call cost curve as its executor instead of engines. Torch-free. (Vidur does this for
vLLM-style schedulers.)

An iteration costs encoder(rows) + decoder(rows) + the host's per-iteration and per-request overheads; the
requests that take their last step pay one vae_decoder(rows) call; each answered request adds a fixed
`request_s` (HTTP, PNG encoding) to its latency. Arrivals during an iteration join at the next step boundary,
as in the server. Each arrival carries its service terms (priority, deadline, the plans it may be moved to:
`slo.Terms`), so the simulator runs SLO accounting and load-adaptive plans exactly as the server does, and
reports what the load benchmark measures (`report.summarize`: throughput, goodput, SLO attainment, p50/p99,
503s, mean dFID served). The curve can be any: fitted on this machine, `gpu_like_curve`, or read from a
gpu_check.json (`costs.read_curve`).

    res = simulate([Arrival(0.0, spec, 0, Terms(options=...))], curve, 64, "fair")
    res.summary()
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..sampling.request import SampleRequest
from .calibrate import Calibration
from .costs import CostCurve  # noqa: F401  (where the benchmarks import it from)
from .engine import Engine
from .report import Served, summarize
from .scheduler import QueueFull, RunnerOutput, Scheduler, SchedulerOutput, SloModel
from .slo import Terms


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
    terms: Terms = Terms()  # priority, deadline, the plans it may be moved to


@dataclass
class SimResult:
    latency: dict[int, float] = field(default_factory=dict)  # arrival index -> seconds (answered ones)
    queue: dict[int, float] = field(default_factory=dict)
    rejected: list[int] = field(default_factory=list)  # 503: the queue was full, or no plan met the SLO
    served: dict[int, Served] = field(default_factory=dict)  # arrival index -> what it ran and its SLO
    iterations: int = 0
    requests_per_iteration: float = 0.0
    rows_per_iteration: dict[str, float] = field(default_factory=dict)
    start: float = 0.0  # the first arrival
    end: float = 0.0  # virtual time of the last answer

    def summary(self) -> dict:
        """`report.summarize` of the run: what the load benchmark reports for a measured one."""
        offered = len(self.served) + len(self.rejected)
        return summarize([self.served[k] for k in sorted(self.served)], offered, len(self.rejected),
                         self.end - self.start)


def simulate(arrivals: Sequence[Arrival], curve: CostCurve, row_budget: int, policy: str = "step",
             max_delay: float = 0.0, max_queue: int = 64, slo: SloModel | None = None,
             calibrate: bool = False) -> SimResult:
    """Run the arrivals through the serving engine on a virtual clock, with the server's SLO accounting and
    load-adaptive plans (`slo`: --slo-scale, --adapt, and the study's headroom; default SloModel(curve)).
    `curve` is the machine; `slo.curve` what the scheduler believes (the server's start-up curve), corrected
    while it runs where `calibrate` (`calibrate.Calibration`, as the server does)."""
    clock = VirtualClock()
    scheduler = Scheduler(row_budget, policy, max_delay, max_queue, slo or SloModel(curve))
    cal = Calibration(scheduler.slo.curve) if calibrate else None
    engine = Engine(scheduler, SimulatedRunner(curve, clock), clock, cal)
    res, index, i = SimResult(), {}, 0
    n_req = enc = dec = 0
    arrivals = sorted(arrivals, key=lambda a: a.t)
    res.start = res.end = arrivals[0].t if arrivals else 0.0
    while i < len(arrivals) or not engine.idle:
        while i < len(arrivals) and arrivals[i].t <= clock():
            a = arrivals[i]
            try:
                index[engine.submit(a.spec, arrival=a.t, terms=a.terms).id] = i
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
            res.served[k] = Served(res.latency[k], req.slo_met, req.dfid, req.plan, req.degraded, req.adaptive,
                                   req.priority)
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
