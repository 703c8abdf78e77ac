"""The batching simulator: the scheduler of `runtime.batching`, the same code the server runs, on a virtual clock
with a per-call cost curve instead of engines. Torch-free. (`benchmarks/serve_load.py simulate`; Vidur does
this for vLLM-style schedulers.)

An iteration costs encoder(rows) + decoder(rows) + the host's per-iteration and per-request overheads; the
requests that retire pay one vae_decoder(rows) call; each answered request adds a fixed `request_s` (HTTP,
PNG encoding) to its latency. Arrivals during an iteration join at the next step boundary, as in the server.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .batching import QueueFull, RequestSpec, Scheduler


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


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds from the start
    spec: RequestSpec
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
    """Run the arrivals (sorted by time) through the scheduler on a virtual clock."""
    sch = Scheduler(row_budget, policy, max_delay, max_queue)
    res, index, now, i = SimResult(), {}, 0.0, 0
    n_req = enc = dec = 0
    arrivals = sorted(arrivals, key=lambda a: a.t)
    while i < len(arrivals) or not sch.idle:
        while i < len(arrivals) and arrivals[i].t <= now:
            try:
                index[sch.submit(arrivals[i].spec, arrivals[i].t).id] = i
            except QueueFull:
                res.rejected.append(i)
            i += 1
        sch.admit(now)
        batch = sch.batch()
        if not batch.jobs:  # idle until the next arrival or the request policy's window closing
            nxt = [t for t in (arrivals[i].t if i < len(arrivals) else None, sch.wakeup()) if t is not None]
            now = max(now, min(nxt))
            continue
        res.iterations += 1
        n_req, enc, dec = n_req + len(batch), enc + batch.encoder_rows, dec + batch.decoder_rows
        now += curve.iteration(len(batch), batch.encoder_rows, batch.decoder_rows)
        sch.advance(batch, now)
        retired = sch.retire(now)
        if retired:
            now += curve.call("vae_decoder", sum(j.spec.num for j in retired))
        for job in retired:
            k = index[job.id]
            res.latency[k] = now - job.arrival + curve.request_s
            res.queue[k] = job.admitted - job.arrival
        res.end = now
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
