"""Service levels in the scheduler (`scheduler.Scheduler` takes them as the `ServiceLevels` mixin): each request's
options, the projection of when requests finish, and the plan moves. Torch-free, no clock (the scheduler passes
`now`). What they decide is in `scheduler.py`'s docstring (service levels) and docs/serve.md.

    Scheduler.finishes(now, reqs)   # a copy of the scheduler run forward on the cost curve, no further arrivals
    Scheduler._plan(req, now)       # the option req runs from this step boundary on

The mixin reads the scheduler's state (waiting, running, slo, hold, policy, the epoch) and changes a request's
plan only through `_switch`; statuses stay the scheduler's (`Scheduler._move`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from ..sampling.plan import Step, peak_rows, plan_steps
from ..sampling.request import SampleRequest
from ..sampling.step import switch_point
from .costs import CostCurve, rest_seconds
from .deadline import late
from .requests import Request, RunnerOutput, Status
from .slo import CHEAPEST, SLO_SCALE, Option, frontier


@functools.lru_cache(maxsize=512)
def _steps(sampler, recompute: tuple[int, ...]) -> tuple[Step, ...]:
    return tuple(plan_steps(sampler, recompute))


def planned(sample: SampleRequest) -> Sequence[Step]:
    """The request's plan (`sampling.plan.plan_steps`), computed once per sampler and schedule: the simulator
    and the plan options submit the same few over and over."""
    return _steps(sample.sampler, tuple(sample.recompute))


@dataclass(frozen=True)
class SloModel:
    """What the scheduler needs for service levels: the per-call cost curve (the server fits it at start-up),
    the SLO's multiple of the solo latency, and where a late request goes (`slo.ADAPT`): `cheapest`, the cheapest
    option within its budget (the issue's rule); `least-dfid`, the option of least dFID that meets its SLO."""

    curve: CostCurve
    scale: float = SLO_SCALE
    adapt: str = CHEAPEST
    headroom: float = 1.0  # the share of the time left to its due that a request's projection may take (`_limit`)


class ServiceLevels:
    """The scheduler's service-level half: options, projections and plan moves (a mixin of `Scheduler`, whose
    state it reads; it is no scheduler on its own)."""

    def _switch(self, req: Request, k: int) -> None:
        """The one place a request's plan changes: to option k (`_plan` decides; sound where it runs)."""
        if k == req.option:
            return
        if req.status is Status.RUNNING:
            assert req.done_steps <= self._shared(req, k), f"request {req.id}: unsound switch"
            self._switched.append(req)
        self._try(req, k)
        req.switched_at = req.done_steps if k != 0 else None

    def _try(self, req: Request, k: int) -> None:
        """req on option k for a projection only (`_plan` then records the move that stays through `_switch`)."""
        steps, rows = req.plans[k]
        req.option, req.sample, req.steps, req.rows, req.rest = k, req.options[k].sample, steps, rows, req.rests[k]

    def _make_room(self, req: Request, now: float) -> list[Request]:
        """Low degrades first: while a newcomer is projected to miss its SLO on the plan it asked for, move the
        requests of a lower priority that allow a trade (lowest first, the latest first) to their fastest option.
        Returns those moved."""
        lower = [r for r in (*self.waiting, *self.running.values())
                 if r.priority < req.priority and len(r.options) > 1 and not r.cancel_requested]
        if not lower or self.project(now, req) <= req.due:
            return []
        moved = []
        for r in sorted(lower, key=lambda r: (r.priority, -r.arrival)):
            k = self._movable(r)[-1]
            if k != r.option:
                self._switch(r, k)
                moved.append(r)
                if self.project(now, req) <= req.due:
                    break
        return moved

    def _options(self, asked: Option, plan, rest: tuple[float, ...], given: tuple[Option, ...]):
        """(options, their (steps, rows), their `rest_seconds`): the plan asked for, then the frontier of the given
        ones that fit."""
        plans, rests, cost = [], [], []
        for o in given:
            steps = planned(o.sample)
            plans.append((steps, peak_rows(steps, o.sample.num)))
            rests.append(rest_seconds(self.slo.curve, steps, o.sample.num))
            cost.append(rests[-1][0] if plans[-1][1] <= self.row_budget else float("inf"))
        keep = frontier(given, cost, rest[0])
        return ((asked, *(given[i] for i in keep)), (plan, *(plans[i] for i in keep)),
                (rest, *(rests[i] for i in keep)))

    def _shared(self, req: Request, k: int) -> int:
        """The last step boundary at which req can move from the plan it runs to option k."""
        if k == req.option:
            return len(req.steps)
        return switch_point(req.steps, req.sample.sampler, req.plans[k][0], req.options[k].sample.sampler)

    def _movable(self, req: Request) -> list[int]:
        """The options req can run from now on (its own included): any while waiting; while running, those
        whose move is sound at this boundary and whose rows fit beside the others'."""
        if req.status is Status.WAITING:
            return list(range(len(req.options)))
        free = self.hold - self.used_rows + req.rows
        return [k for k in range(len(req.options))
                if req.plans[k][1] <= free and req.done_steps <= self._shared(req, k)]

    def _plan(self, req: Request, now: float) -> tuple[bool, float]:
        """Among the options req can move to now (waiting: any; running: where the move is sound and its rows
        fit), give it the first whose projected completion meets its SLO without making a request of a higher
        priority miss one it meets when req runs its fastest option: its own plan (the least dFID) if that does,
        else the cheapest (`adapt` cheapest) or the next by dFID (`adapt` least-dfid); none: the fastest.
        (met, its projected completion)."""
        movable = self._movable(req)
        start, fastest = req.option, movable[-1]
        above = [r for r in (*self.waiting, *self.running.values()) if r.priority > req.priority]
        if above:  # those it must not push past their SLO
            self._try(req, fastest)
            at = self.finishes(now, above)
            above = [r for r in above if at[r.id] <= r.due]
        met, finish = False, float("inf")
        order = movable if self.slo.adapt != CHEAPEST else list(dict.fromkeys((movable[0], fastest)))
        limit = self._limit(req, now)
        for k in order:
            self._try(req, k)
            at = self.finishes(now, [req, *above])
            finish = at[req.id]
            if finish <= limit and self._behind_all(req, now) <= req.due and all(at[r.id] <= r.due for r in above):
                met = True
                break
        self._try(req, start)  # back to where it was: the move that stays is recorded once
        self._switch(req, k if met else fastest)
        if not met:  # on its fastest (the last one tried): does it meet its SLO itself?
            met = finish <= req.due and all(at[r.id] <= r.due for r in above)
        return met, finish

    def _behind_all(self, req: Request, now: float) -> float:
        """`slo` on a serial curve (`deadline.serial`): when req would finish behind every request held now, run
        one after the other. Later arrivals with earlier dues can push it that far back (the projection foresees
        no arrival), so a request that allows a trade stays on a plan only where this meets its SLO too (it is
        refused only on the projection). Elsewhere: now (no constraint)."""
        if self.policy != "slo" or not self.cumulative:
            return now
        held = (*self.waiting, *self.running.values())
        return now + sum(r.rest[r.done_steps] for r in held if r is not req and r.rest) + req.rest[req.done_steps]

    def _limit(self, req: Request, now: float) -> float:
        """By when a plan's projected completion must come for req to stay on it: its due, or with
        `SloModel.headroom` h < 1, now + h x the time left to its due (later arrivals are not projected)."""
        return req.due if self.slo.headroom >= 1 else now + self.slo.headroom * (req.due - now)

    def _check_running(self, now: float) -> None:
        """Running requests that allow a trade (`slo`: waiting ones too, since they start only when they first
        step), projected to miss their SLO, with a sound move at this boundary: re-planned, lowest priority first
        (checked again only after a submission or a finish)."""
        due = []
        held = (*self.waiting, *self.running.values()) if self.policy == "slo" else self.running.values()
        for req in held:
            if len(req.options) < 2 or req.checked == self._epoch or req.cancel_requested:
                continue
            req.checked = self._epoch
            if any(k != req.option and req.done_steps <= self._shared(req, k) for k in range(len(req.options))):
                due.append(req)
        for req in sorted(due, key=lambda r: (r.priority, -r.arrival)):
            if late(req, now) or self._behind_all(req, now) > req.due or self.project(now, req) > self._limit(req, now):
                self._plan(req, now)

    def project(self, now: float, req: Request) -> float:
        """When req finishes if nothing else arrives (`finishes`)."""
        return self.finishes(now, [req])[req.id]

    def finishes(self, now: float, reqs: Sequence[Request]) -> dict[int, float]:
        """When each of reqs finishes if nothing else arrives: a copy of this scheduler (its policy, queue, running
        set, credits) run forward on the cost curve, iteration by iteration, as the simulator runs the engine,
        until they are all done (inf for one not in the system)."""
        twin = type(self)(self.row_budget, self.policy, self.max_delay, 1 << 30, self.slo)
        twin.fixed, twin.cumulative = True, self.cumulative
        copy = {r.id: dataclasses.replace(r, context=None, images=None) for r in (*self.waiting,
                                                                                 *self.running.values())}
        twin.waiting = deque(copy[r.id] for r in self.waiting)
        twin.running = {rid: copy[rid] for rid in self.running}
        curve, t = self.slo.curve, now
        out_at = {r.id: float("inf") for r in reqs}
        left = {r.id for r in reqs if r.id in copy}
        while left:
            out = twin.schedule(t)
            if out.empty:
                wake = twin.wakeup()
                assert wake is not None and wake > t, "a projection that cannot advance"
                t = wake
                continue
            if out.batch:  # as `simulate.SimulatedRunner`: the iteration, then the VAE call of those finishing
                t += curve.iteration(len(out.batch), out.encoder_rows, out.decoder_rows)
                t += curve.call("vae_decoder", sum(twin.running[rid].num for rid, st in out.batch if st.last))
            for r in twin.update(out, RunnerOutput(), t):
                if r.id in left:
                    out_at[r.id] = t
                    left.discard(r.id)
        return out_at
