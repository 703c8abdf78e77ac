"""`--batching auto`: the policy the simulator predicts best for this machine's cost curve. Torch-free, no clock.

    curve = costs.measure_curve(engines)                               # start-up: a few timed calls
    choice = choose_policy(curve, engines.max_batch, policy_workload(engines.config.sampler, 32))
    choice.policy, choice.scores                                       # "slo" on a CPU and on a GPU-like curve

The workload is a mix the server's own defaults imply (1 to 4 images, a fifth, half and all of the default
steps up to 50, with and without CFG, every step or every other one recomputing the encoder), sent as one seeded
Poisson trace at `LOAD` of its request-level saturation (as simulated on the same curve). Each step-level
policy serves it in the simulator; the best SLO attainment wins, the lower p99 slowdown breaks a tie. `slo`
(deadline order) wins on both a linear CPU curve (0.95 against fair's 0.41 on tests' linear curve) and the
GPU-like one (0.55 against step's 0.45); between the processor-sharing policies the ranking reverses with the
curve (`fair` on a CPU: each request gets an equal share; `step` on a GPU: `fair` leaves rows idle), which is
why the choice is simulated rather than fixed. `request` and `single` are never chosen: the step-level policy
that wins beats them on both kinds of curve (docs/serve.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ...core.config import SamplerConfig
from ..sampling.grammar import ScheduleSpec, uniform_steps
from ..sampling.request import SampleRequest
from .costs import CostCurve, solo_seconds
from .scheduler import STEP_LEVEL, SloModel, planned
from .simulate import Arrival, simulate

LOAD = 0.8  # of request-level saturation
REQUESTS = 160  # in the trace
MAX_STEPS = 50  # the longest request of the workload: the choice depends on the curve, not on the length
SEED = 23


@dataclass(frozen=True)
class PolicyChoice:
    policy: str
    scores: dict = field(default_factory=dict)  # policy -> {slo_attainment, p99_slowdown}
    load: float = LOAD
    rate: float = 0.0  # requests per second of the trace

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def policy_workload(sampler: SamplerConfig, max_images: int) -> list[SampleRequest]:
    """The request kinds the choice is made on, from the server's defaults (no engines needed: the schedules
    are `all` and `uniform:2`)."""
    out = []
    n = min(sampler.num_steps, MAX_STEPS)
    for steps in sorted({max(1, n // 5), max(1, n // 2), n}):
        for num in sorted({1, min(2, max_images), min(4, max_images)}):
            for cfg, rate in ((sampler.guidance, 2), (1.0, 1)):
                s = dataclasses.replace(sampler, num_steps=steps, guidance=cfg)
                out.append(SampleRequest(np.zeros(num, np.int64), 0, s, ScheduleSpec("uniform", rate),
                                         tuple(uniform_steps(steps, rate))))
    return out


def poisson(kinds: int, rate: float, n: int, seed: int) -> list[tuple[float, int]]:
    """n (arrival time, kind) pairs of a Poisson process of `rate` per second, kinds drawn uniformly."""
    rng = np.random.default_rng([seed, kinds])
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    return [(float(a), int(k)) for a, k in zip(t, rng.integers(0, kinds, n))]


def saturation(curve: CostCurve, row_budget: int, workload: list[SampleRequest], policy: str = "request",
               n: int = REQUESTS, seed: int = SEED) -> float:
    """Requests per second when the queue never empties (all n waiting at 0)."""
    trace = poisson(len(workload), 1.0, n, seed)
    res = simulate([Arrival(0.0, workload[k], k) for _, k in trace], curve, row_budget, policy, max_queue=n)
    return len(res.latency) / res.end


def choose_policy(curve: CostCurve, row_budget: int, workload: list[SampleRequest], load: float = LOAD,
                  slo_scale: float = 3.0) -> PolicyChoice:
    """The step-level policy with the best simulated SLO attainment (then the lower p99 slowdown) on a Poisson
    trace of the workload at `load` of request-level saturation."""
    rate = load * saturation(curve, row_budget, workload)
    solo = [solo_seconds(curve, planned(w), w.num) + curve.request_s for w in workload]
    arrivals = [Arrival(t, workload[k], k) for t, k in poisson(len(workload), rate, REQUESTS, SEED + 1)]
    scores = {}
    for policy in STEP_LEVEL:
        res = simulate(arrivals, curve, row_budget, policy, max_queue=REQUESTS, slo=SloModel(curve, slo_scale))
        slow = [res.latency[i] / solo[arrivals[i].kind] for i in res.latency]
        scores[policy] = {"slo_attainment": res.summary()["slo_attainment"],
                          "p99_slowdown": float(np.percentile(slow, 99))}
    best = max(STEP_LEVEL, key=lambda p: (round(scores[p]["slo_attainment"], 6), -scores[p]["p99_slowdown"]))
    return PolicyChoice(best, scores, load, rate)
