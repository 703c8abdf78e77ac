"""The server's service levels: the cost curve and the batching policy chosen at start-up, the folder's frontier
of plans, and a body's serving terms (priority, deadline, the plans it may be moved to). The decisions are the
scheduler's (`runtime.batching.scheduler`, `slo.py`); this module gathers what they need, before any port binds
(the curve file, the frontier) or in the lifespan (the timed calls).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..core.errors import InputError
from ..runtime.batching.auto import PolicyChoice, choose_policy, policy_workload
from ..runtime.batching.calibrate import Calibration
from ..runtime.batching.costs import CostCurve, measure_curve, read_curve
from ..runtime.batching.slo import PRIORITIES, Option, Terms, check_terms
from ..runtime.sampling.plans import FAST, PLAN_FIELDS, Plan
from ..runtime.sampling.request import RequestInput, SampleRequest

log = logging.getLogger("ddt_export.serve")

NO_FRONTIER = ("no stored plan with a measured dFID (ddt-export tune writes them): every request runs the plan it "
               "asks for, and requests that allow a quality trade are refused (422)")


@dataclass
class Levels:
    """What the server decided at start-up: the curve, the policy (and why), the frontier."""

    curve: CostCurve
    policy: str
    asked: str  # --batching as given (auto or a policy)
    choice: Optional[PolicyChoice] = None
    curve_source: str = "measured at start-up"
    frontier: dict[str, Plan] = field(default_factory=dict)  # plans with a measured dFID
    calibration: Optional[Calibration] = None  # a measured curve's correction while serving (a stated one: none)

    def info(self, slo_scale: float) -> dict:
        """What /v1/info says about them."""
        fast = self.frontier.get(FAST)
        return {"batching_asked": self.asked, "batching_choice": None if self.choice is None else self.choice.to_dict(),
                "slo_scale": slo_scale, "cost_curve": {**self.curve.to_dict(), "source": self.curve_source},
                "cost_calibration": None if self.calibration is None else self.calibration.to_dict(),
                "frontier": [{"name": p.name, "dfid": dfid(p), "settings": p.label()}
                             for p in sorted(self.frontier.values(), key=dfid)],
                "adaptive_budget": None if fast is None else dfid(fast),
                "frontier_note": None if self.frontier else NO_FRONTIER, "priorities": list(PRIORITIES)}


def dfid(plan: Plan) -> float:
    return float(plan.measured["dfid"])


def frontier_plans(plans: dict[str, Plan]) -> dict[str, Plan]:
    """The stored plans whose measurement gives a finite dFID."""
    out = {}
    for name, p in plans.items():
        v = p.measured.get("dfid")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            out[name] = p
    return out


def start_curve(curve_file: Optional[Path]) -> Optional[CostCurve]:
    """--cost-curve FILE read now (a bad file fails before any port binds); None: measure in the lifespan."""
    return None if curve_file is None else read_curve(curve_file)


def decide(engines, asked: str, curve: Optional[CostCurve], max_images: int, frontier: dict[str, Plan],
           source: str = "measured at start-up") -> Levels:
    """The curve (given, or a few timed calls at 1..batch.max rows) and the policy (`auto`: the simulator's
    choice for that curve). Runs in the lifespan, off the event loop."""
    if curve is None:
        curve = measure_curve(engines)
    choice = None
    if asked == "auto":
        choice = choose_policy(curve, engines.max_batch, policy_workload(engines.config.sampler, max_images))
        log.info("batching auto: %s (simulated SLO attainment %s on the cost curve %s)", choice.policy,
                    {p: round(s["slo_attainment"], 3) for p, s in choice.scores.items()}, source)
    return Levels(curve, choice.policy if choice else asked, asked, choice, source, frontier)


def asked_dfid(body, plans: dict[str, Plan]) -> Optional[float]:
    """The dFID of what the body asks for: its plan's, 0.0 for the model's own sampler, None for other settings."""
    if body.plan is not None:
        p = plans.get(body.plan)
        return None if p is None else p.measured.get("dfid")
    return 0.0 if all(getattr(body, f) is None for f in PLAN_FIELDS) else None


def body_terms(body, frontier: dict[str, Plan]) -> tuple[dict, list[str]]:
    """The checked serving fields ({priority, deadline_s, budget}) and the frontier plans within the budget (their
    names, least dFID first); InputError (422) for a trade asked of a folder with no frontier."""
    t = check_terms(body.priority, body.deadline_ms, body.max_fid_delta, body.quality)
    if t["budget"] is None:
        return t, []
    field_name = "quality" if t["budget"] == "fast" else "max_fid_delta"
    given = body.quality if field_name == "quality" else body.max_fid_delta
    if not frontier:
        raise InputError(field_name, "a folder with stored plans with a measured dFID (ddt-export tune; GET /v1/info "
                         "lists them)", f"{given!r} to a folder with none")
    if t["budget"] == "fast":
        if FAST not in frontier:
            raise InputError("quality", f"adaptive only where the engines store a '{FAST}' plan with a measured dFID "
                             f"(stored: {', '.join(sorted(frontier))})", repr(given))
        t["budget"] = dfid(frontier[FAST])
    names = [n for n, p in sorted(frontier.items(), key=lambda kv: dfid(kv[1])) if dfid(p) <= t["budget"]]
    return t, names


def terms_for(t: dict, body, asked: SampleRequest, options: list[tuple[str, SampleRequest]],
              plans: dict[str, Plan]) -> Terms:
    return Terms(t["priority"], t["deadline_s"], tuple(Option(n, s, dfid(plans[n])) for n, s in options
                                                       if n != asked.plan),
                 adaptive=t["budget"] is not None, dfid=asked_dfid(body, plans))


def option_input(body, classes: tuple[int, ...], name: str) -> RequestInput:
    """The body with a frontier plan instead of its own sampler settings (its class, num, seed and cfg kept)."""
    return RequestInput(classes=classes, num=body.num, seed=body.seed, cfg=body.cfg, plan=name)


def served(req) -> dict:
    """What a response says about the plan a request ran and its SLO."""
    asked = req.asked
    return {"plan": req.plan, "fid_delta": req.dfid, "degraded": req.degraded,
            "asked_plan": None if asked is None else asked.plan,
            "switched_at_step": req.switched_at if req.degraded else None,
            "slo": {"target_s": None if req.due is None else req.due - req.arrival, "solo_s": req.solo_s,
                    "met": req.slo_met, "priority": PRIORITIES[req.priority]}}

