"""Step-level continuous batching: the scheduler. Torch-free, and free of HTTP, asyncio, Ray and numerics.

DDT's decoder takes no timestep (all its time information comes through the encoder state s), so one decoder
call can carry rows of requests that are at different steps, with different step counts, CFG scales and
encoder schedules; only the encoder needs a per-row t. So the batch is re-planned at every step boundary
(iteration-level scheduling, as Orca and vLLM do for LLMs). One iteration, in vLLM v1's split
(`engine.Engine.step` makes these three calls):

    out = scheduler.schedule(now)                # plain data: who is admitted, who steps at which step, who left
    res = runner.execute(out)                    # the model step (`runner.ModelRunner`): never touches a Request
    finished = scheduler.update(out, res, now)   # applies the result: the one place a status changes

The scheduler never reads a clock (the caller passes `now`), so the server drives it with `time.monotonic()`
and the simulator and the tests with a virtual clock. Every status change goes through `Scheduler._move`,
which refuses a transition `TRANSITIONS` does not allow.

Policies (`POLICIES`):
- `step`: admit at every step boundary, first come first served, while the request's rows fit the budget;
  every running request does one step per iteration.
- `fair`: admitted as `step`, but a request steps in an iteration only when its credit covers its rows
  (deficit round robin: every iteration each running request earns the smallest running request's rows), so
  a request advances at a rate inversely proportional to its rows. Where a step's cost is linear in rows (a
  CPU), every request then gets an equal share of the machine instead of a share proportional to its rows.
  Where rows are nearly free (a GPU), `step` keeps the batches fuller.
- `request`: the Triton-style baseline: when the batch is empty, group what arrived within `max_delay` of
  the oldest waiting request (sooner when the group fills the budget) and run the group to completion before
  admitting anyone else; a member that finishes early still answers at once (the stronger baseline).
- `single`: one request at a time (the official demo's behaviour).

Every policy admits in priority order (high, normal, low; first come first served within one), so a waiting
request never passes one of a higher priority.

Service levels (`slo.py`; with an `SloModel`: the cost curve and --slo-scale). At submission each request gets
its SLO (`due`: --slo-scale x its predicted solo latency, or its deadline). A request that allows a quality
trade carries options (the frontier of stored plans within its dFID budget); the scheduler projects when it
will finish (`project`: this scheduler's own policy run forward on the cost curve with no further arrivals,
the simulator's model) and, when it would miss, moves it to its cheapest option (or, `SloModel.adapt`
least-dfid, the one of least dFID that meets its SLO) (`_plan`), lowest priority first. It does so at
submission (none meets: `SloUnreachable`, a 503), at admission, and for a running request at a step boundary
where the move is sound (`sampling.step.switch_point`: the plans share every step so far, so its images are
exactly the new plan's). A request that allows no trade is never moved.

A request reserves its peak rows while it runs: num x 2 if any of its steps needs the unconditional half
(a guided step, or a recompute step whose state a guided step reuses), else num. The budget is the engines'
batch.max, so no graph call is ever split.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

from ...core.errors import InputError
from ..sampling.plan import Step, peak_rows, plan_steps, step_rows
from ..sampling.request import SampleRequest
from ..sampling.step import switch_point
from .costs import CostCurve, solo_seconds
from .requests import (TRANSITIONS, QueueFull, Request, RunnerOutput, SchedulerOutput, SloUnreachable,  # noqa: F401
                       Status)
from .slo import CHEAPEST, SLO_SCALE, Option, Terms, frontier

POLICIES = ("step", "fair", "request", "single")
STEP_LEVEL = ("step", "fair")  # policies that admit at every step boundary


@functools.lru_cache(maxsize=512)
def _steps(sampler, recompute: tuple[int, ...]) -> tuple[Step, ...]:
    return tuple(plan_steps(sampler, recompute))


def planned(sample: SampleRequest) -> Sequence[Step]:
    """The request's plan (`sampling.plan.plan_steps`), computed once per sampler and schedule: the simulator
    and the plan options submit the same few over and over."""
    return _steps(sample.sampler, tuple(sample.recompute))


def check_policy(policy: str, field: str = "--batching") -> str:
    """The one check of a batching policy name."""
    if policy not in POLICIES:
        raise InputError(field, " | ".join(POLICIES), policy)
    return policy


@dataclass(frozen=True)
class SloModel:
    """What the scheduler needs for service levels: the per-call cost curve (the server fits it at start-up),
    the SLO's multiple of the solo latency, and where a late request goes (`slo.ADAPT`): `cheapest`, the cheapest
    option within its budget (the issue's rule); `least-dfid`, the option of least dFID that meets its SLO."""

    curve: CostCurve
    scale: float = SLO_SCALE
    adapt: str = CHEAPEST


class Scheduler:
    """The waiting queue and the running set; decides each iteration's batch and applies its result. Not
    thread-safe: its one caller (`engine.Engine`) serializes the calls."""

    def __init__(self, row_budget: int, policy: str = "step", max_delay: float = 0.0, max_queue: int = 64,
                 slo: SloModel | None = None):
        assert row_budget >= 1 and max_queue >= 1 and max_delay >= 0, (row_budget, max_queue, max_delay)
        self.row_budget, self.policy, self.max_delay, self.max_queue = row_budget, check_policy(policy), \
            max_delay, max_queue
        self.slo = slo
        self.waiting: deque[Request] = deque()  # in admission order: priority, then arrival
        self.running: dict[int, Request] = {}  # in admission order
        self._leaving: list[Request] = []  # retired by `schedule`, reported by the next `update`
        self._switched: list[Request] = []  # running requests moved to another plan since the last `schedule`
        self._ids = itertools.count()
        self._epoch = 0  # counts submissions and finishes: a running request's SLO is checked again after one

    def _move(self, req: Request, status: Status, now: float, error: Exception | None = None) -> None:
        """The one place a status changes."""
        if status not in TRANSITIONS.get(req.status, ()):
            raise AssertionError(f"request {req.id}: {req.status.value} -> {status.value} is not a transition")
        req.status = status
        if status is Status.RUNNING:
            req.admitted = now
            return
        req.ended, req.error = now, error
        if req.due is not None and status is not Status.CANCELLED:
            req.slo_met = status is Status.DONE and now <= req.due
        self._epoch += 1

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
        req.option, req.sample, req.steps, req.rows = k, req.options[k].sample, steps, rows

    # ------------------------------------------------------------------------------------------- admission

    def submit(self, sample: SampleRequest, now: float, context: Any = None, terms: Terms = Terms()) -> Request:
        """Queue a resolved request; QueueFull when `max_queue` are waiting, InputError when it can never fit,
        SloUnreachable when it allows a trade and no plan within its budget meets its SLO."""
        assert sample.recompute is not None, "resolve the request's schedule first"
        steps = planned(sample)
        rows = peak_rows(steps, sample.num)
        if rows > self.row_budget:
            per = rows // sample.num
            raise InputError("num", f"<= {self.row_budget // per} images ({per} rows each within the row budget "
                             f"{self.row_budget}, the engines' batch.max)", sample.num)
        if len(self.waiting) >= self.max_queue:
            raise QueueFull("queue", f"fewer than {self.max_queue} waiting requests (--max-queue)",
                            f"{len(self.waiting)} waiting")
        asked = Option(sample.plan, sample, terms.dfid)
        req = Request(next(self._ids), sample, steps, rows, now, terms.priority, asked, context=context)
        if self.slo is not None:
            req.solo_s = solo_seconds(self.slo.curve, steps, sample.num)
            req.due = now + (terms.deadline_s if terms.deadline_s is not None else self.slo.scale * req.solo_s)
            if terms.adaptive:
                req.adaptive = True
                req.options, req.plans = self._options(asked, (steps, rows), req.solo_s, terms.options)
        at = next((i for i, r in enumerate(self.waiting) if r.priority < req.priority), len(self.waiting))
        self.waiting.insert(at, req)
        self._epoch += 1
        moved = self._make_room(req, now) if self.slo is not None else []
        if req.adaptive:
            met, finish = self._plan(req, now)
            if not met:
                self.waiting.remove(req)
                for r in moved:  # the room was for nothing: each planned for its own SLO again
                    self._plan(r, now)
                raise SloUnreachable("latency", f"<= {req.due - req.arrival:.3f} s (its SLO) on a plan within its "
                                     "budget", f"{finish - req.arrival:.3f} s projected on the fastest "
                                     f"({req.plan or 'as asked'})")
        return req

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

    def _options(self, asked: Option, plan, asked_s: float, given: tuple[Option, ...]):
        """(options, their (steps, rows)): the plan asked for, then the frontier of the given ones that fit."""
        plans, cost = [], []
        for o in given:
            steps = planned(o.sample)
            plans.append((steps, peak_rows(steps, o.sample.num)))
            cost.append(solo_seconds(self.slo.curve, steps, o.sample.num) if plans[-1][1] <= self.row_budget
                        else float("inf"))
        keep = frontier(given, cost, asked_s)
        return (asked, *(given[i] for i in keep)), (plan, *(plans[i] for i in keep))

    def cancel(self, req: Request, now: float) -> bool:
        """A waiting request leaves the queue now (True: it is finished); a running one leaves the batch at the
        next step boundary (False)."""
        if req.status is Status.WAITING:
            self.waiting.remove(req)
            self._move(req, Status.CANCELLED, now)
            return True
        if req.status is Status.RUNNING:
            req.cancel_requested = True
        return False

    @property
    def used_rows(self) -> int:
        return sum(r.rows for r in self.running.values())

    def _group(self) -> list[Request]:
        """The longest prefix of the queue (in admission order) that fits the free rows."""
        free, group = self.row_budget - self.used_rows, []
        limit = 1 if self.policy == "single" else len(self.waiting)
        for req in itertools.islice(self.waiting, limit):
            if req.rows > free:
                break
            group.append(req)
            free -= req.rows
        return group

    def _admit(self, now: float) -> list[Request]:
        """Move waiting requests into the running set, as the policy allows at this step boundary; those that
        allow a trade get their plan for the load of this moment first, lowest priority first."""
        if not self.waiting or (self.policy not in STEP_LEVEL and self.running):
            return []
        group = self._group()
        if self.policy == "request":
            full = len(group) < len(self.waiting) or sum(r.rows for r in group) == self.row_budget
            if not full and now < self.waiting[0].arrival + self.max_delay:
                return []  # the window is open: wait for more (see `wakeup`)
        movable = [r for r in group if len(r.options) > 1] if self.slo is not None else []
        if movable:
            for req in sorted(movable, key=lambda r: (r.priority, -r.arrival)):
                self._plan(req, now)
            group = self._group()  # their plans may take other rows
        for req in group:
            self.waiting.popleft()
            self._move(req, Status.RUNNING, now)
            self.running[req.id] = req
        return group

    def wakeup(self) -> float | None:
        """When admission can change with no new arrival: the request policy's window closing, else None."""
        if self.policy == "request" and self.waiting and not self.running:
            return self.waiting[0].arrival + self.max_delay
        return None

    # ------------------------------------------------------------------------------------------- service levels

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
        free = self.row_budget - self.used_rows + req.rows
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
        for k in order:
            self._try(req, k)
            at = self.finishes(now, [req, *above])
            finish = at[req.id]
            if finish <= req.due and all(at[r.id] <= r.due for r in above):
                met = True
                break
        self._try(req, start)  # back to where it was: the move that stays is recorded once
        self._switch(req, k if met else fastest)
        return met, finish

    def _check_running(self, now: float) -> None:
        """Running requests that allow a trade, projected to miss their SLO, with a sound move at this boundary:
        re-planned, lowest priority first (checked again only after a submission or a finish)."""
        due = []
        for req in self.running.values():
            if len(req.options) < 2 or req.checked == self._epoch or req.cancel_requested:
                continue
            req.checked = self._epoch
            if any(k != req.option and req.done_steps <= self._shared(req, k) for k in range(len(req.options))):
                due.append(req)
        for req in sorted(due, key=lambda r: (r.priority, -r.arrival)):
            if self.project(now, req) > req.due:
                self._plan(req, now)

    def project(self, now: float, req: Request) -> float:
        """When req finishes if nothing else arrives (`finishes`)."""
        return self.finishes(now, [req])[req.id]

    def finishes(self, now: float, reqs: Sequence[Request]) -> dict[int, float]:
        """When each of reqs finishes if nothing else arrives: a copy of this scheduler (its policy, queue, running
        set, credits) run forward on the cost curve, iteration by iteration, as the simulator runs the engine,
        until they are all done (inf for one not in the system)."""
        twin = Scheduler(self.row_budget, self.policy, self.max_delay, 1 << 30)
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

    # ------------------------------------------------------------------------------------------- the iteration

    def schedule(self, now: float) -> SchedulerOutput:
        """This iteration: retire the cancelled, re-plan the running that would miss their SLO where a move is
        sound, admit, then every running request at its current step (`fair`: those whose credit covers their
        rows; calling it spends the credits)."""
        freed = []
        for req in [r for r in self.running.values() if r.cancel_requested]:
            del self.running[req.id]
            self._move(req, Status.CANCELLED, now)
            self._leaving.append(req)
            freed.append(req.id)
        if self.slo is not None:
            self._check_running(now)
        new = self._admit(now)
        quantum = min((r.rows for r in self.running.values()), default=0)
        batch, enc_rows, dec_rows = [], 0, 0
        for req in self.running.values():
            if self.policy == "fair":
                req.credit += quantum
                if req.credit < req.rows:
                    continue
                req.credit -= req.rows
            st = req.current
            enc, dec = step_rows(st, req.num)
            batch.append((req.id, st))
            enc_rows, dec_rows = enc_rows + enc, dec_rows + dec
        switched = tuple((r.id, r.sample) for r in dict.fromkeys(self._switched) if r.status is Status.RUNNING)
        self._switched = []
        return SchedulerOutput(tuple((r.id, r.sample) for r in new), tuple(batch), tuple(freed), enc_rows, dec_rows,
                               switched)

    def update(self, out: SchedulerOutput, res: RunnerOutput, now: float) -> list[Request]:
        """Apply the model step's result: each request of the batch did its step, or failed; a request whose
        last step it was is done, with its images. Returns the requests that finished since the last update
        (cancelled at `schedule` included), each out of the running set."""
        finished, self._leaving = self._leaving, []
        for rid, st in out.batch:
            req = self.running[rid]
            if rid in res.failed:
                self._move(req, Status.FAILED, now, res.failed[rid])
            else:
                req.done_steps += 1
                if req.done_steps < req.total_steps:
                    continue
                req.sampled, req.images = now - res.vae_s, res.images.get(rid)
                self._move(req, Status.DONE, now)
            del self.running[rid]
            finished.append(req)
        return finished

    def abort(self, error: Exception, now: float) -> list[Request]:
        """Everything running fails with `error` (a fault outside any one request); returns them."""
        out = list(self.running.values()) + self._leaving
        for req in self.running.values():
            self._move(req, Status.FAILED, now, error)
        self.running, self._leaving = {}, []
        return out

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
