"""The cost curve against the loop's own iterations: one factor k = measured / predicted seconds, a moving ratio over
the last few hundred busy iterations, so that the `slo` scheduler's solo latencies, dues and projections are in
the machine's seconds while it serves. Torch-free, no clock (the engine passes what it measured).

Why: the start-up curve (`costs.measure_curve`) times the graphs in a tight loop on an idle process. Under load an
iteration also pays the host's step (CFG combine, update rule, slicing), the scheduler, the thread hand-off and the
HTTP threads on the same cores; on this 2-core CPU (2026-12-03, levels3.json) the servers' iterations fitted
1.36x the start-up curve at one row. A scheduler that believes the start-up curve projects every request early, so
it moves too few of those that allow a trade, and it predicts solo latencies 25-35% short (an SLO of 3x that
prediction is ~2.2x the real solo latency); the simulator run with that belief against the fitted machine gives the
measured 0.80 / 0.70 (issue 23, docs/serve.md).

    cal = Calibration(curve)                  # the start-up curve
    cal.observe(predicted_s, measured_s)      # per busy iteration (the engine does it)
    cal.curve                                 # curve.scaled(k): what the scheduler uses from then on

One factor, not a refit: the slo policy's iterations are mostly one request (a linear CPU curve), the ratio of the
whole iteration is what its projections need, and a uniform scale keeps the curve's shape (so `auto`'s choice and
`deadline.serial` stay as chosen at start-up).
"""
from __future__ import annotations

from .costs import CostCurve

HALF_LIFE = 200  # iterations: the ratio's memory
WARMUP = 32  # iterations before the first correction (the first calls of a session pay their set-up)
EVERY = 32  # iterations between two updates of the scheduler's curve
K_RANGE = (0.5, 4.0)  # a factor outside this is clamped (a stall of the machine is not its cost)
GAP_MAX_S = 0.02  # a gap between two busy iterations up to this long is the loop's own (longer: idle, a stall)


class Calibration:
    """The moving ratio of measured to predicted iteration seconds, and the base curve scaled by it."""

    def __init__(self, base: CostCurve, half_life: float = HALF_LIFE, warmup: int = WARMUP, every: int = EVERY):
        self.base, self.warmup, self.every, self.half_life = base, warmup, every, half_life
        self.decay = 0.5 ** (1.0 / half_life)
        self.measured = self.predicted = 0.0
        self.iterations = 0
        self.k = 1.0
        self.curve = base

    def observe(self, predicted_s: float, measured_s: float) -> bool:
        """One busy iteration; True when the curve changed (every `every` iterations after the warm-up)."""
        if predicted_s <= 0 or measured_s < 0:
            return False
        self.iterations += 1
        self.measured = self.decay * self.measured + measured_s
        self.predicted = self.decay * self.predicted + predicted_s
        if self.iterations < self.warmup or self.iterations % self.every:
            return False
        lo, hi = K_RANGE
        self.k = min(hi, max(lo, self.measured / self.predicted))
        self.curve = self.base.scaled(self.k)
        return True

    def to_dict(self) -> dict:
        return {"k": self.k, "iterations": self.iterations, "half_life": self.half_life}
