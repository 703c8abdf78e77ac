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
- `slo`: scheduled for the SLO at every step boundary (`deadline.py`): running requests step in urgency order
  (priority, then earliest due; a request that can no longer meet its SLO even alone after all that still
  can), and only as many as the cost curve says are worth one call (a linear CPU curve: the most urgent alone;
  a sublinear GPU curve: the batch filled). Needs an `SloModel`. Admission in the same order, first fit, up to
  `deadline.HOLD` x the row budget held (each iteration's calls stay within the budget).
- `request`: the Triton-style baseline: when the batch is empty, group what arrived within `max_delay` of
  the oldest waiting request (sooner when the group fills the budget) and run the group to completion before
  admitting anyone else; a member that finishes early still answers at once (the stronger baseline).
- `single`: one request at a time (the official demo's behaviour).

Every policy admits in priority order (high, normal, low; first come first served within one), so a waiting
request never passes one of a higher priority.

Service levels (`slo.py`; the scheduler's half in `levels.py`, the `ServiceLevels` mixin; with an `SloModel`: the
cost curve and --slo-scale). At submission each request gets its SLO (`due`: --slo-scale x its predicted solo
latency, or its deadline). A request that allows a quality trade carries options (the frontier of stored plans
within its dFID budget); the scheduler projects when it will finish (`project`: this scheduler's own policy run
forward on the cost curve with no further arrivals, the simulator's model) and, when it would miss, moves it to its
cheapest option (or, `SloModel.adapt` least-dfid, the one of least dFID that meets its SLO) (`_plan`), lowest
priority first. It does so at submission (none meets: `SloUnreachable`, a 503), at admission, and for a running
request at a step boundary where the move is sound (`sampling.step.switch_point`: the plans share every step so
far, so its images are exactly the new plan's). A request that allows no trade is never moved.

A request reserves its peak rows while it runs: num x 2 if any of its steps needs the unconditional half
(a guided step, or a recompute step whose state a guided step reuses), else num. The budget is the engines'
batch.max, so no graph call is ever split.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Any

from ...core.errors import ConfigError, InputError
from ..sampling.plan import peak_rows, step_rows
from ..sampling.request import SampleRequest
from .costs import rest_seconds
from .deadline import CUMULATIVE, HOLD, in_order, pick, serial
from .levels import ServiceLevels, SloModel, planned  # noqa: F401  (SloModel, planned: imported from here too)
from .requests import (TRANSITIONS, QueueFull, Request, RunnerOutput, SchedulerOutput, SloUnreachable,  # noqa: F401
                       Status)
from .slo import Option, Terms

POLICIES = ("step", "fair", "slo", "request", "single")
STEP_LEVEL = ("step", "fair", "slo")  # policies that admit at every step boundary


def check_policy(policy: str, field: str = "--batching") -> str:
    """The one check of a batching policy name."""
    if policy not in POLICIES:
        raise InputError(field, " | ".join(POLICIES), policy)
    return policy


class Scheduler(ServiceLevels):
    """The waiting queue and the running set; decides each iteration's batch and applies its result. Not
    thread-safe: its one caller (`engine.Engine`) serializes the calls."""

    def __init__(self, row_budget: int, policy: str = "step", max_delay: float = 0.0, max_queue: int = 64,
                 slo: SloModel | None = None):
        assert row_budget >= 1 and max_queue >= 1 and max_delay >= 0, (row_budget, max_queue, max_delay)
        self.row_budget, self.policy, self.max_delay, self.max_queue = row_budget, check_policy(policy), \
            max_delay, max_queue
        if policy == "slo" and slo is None:
            raise ConfigError("--batching slo", "a cost curve and an SLO scale (an SloModel)", "none")
        self.slo = slo
        self.hold = row_budget * (HOLD if policy == "slo" else 1)  # rows of started requests held at once
        self.cumulative = CUMULATIVE and slo is not None and serial(slo.curve)  # `deadline.in_order`
        self.fixed = False  # a projection's twin: plans stay as they are (no service-level moves)
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
        if self.policy != "slo":  # under `slo` a finish never delays another request's projection
            self._epoch += 1

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
            req.rest = rest_seconds(self.slo.curve, steps, sample.num)
            req.solo_s = req.rest[0]  # `costs.solo_seconds`
            req.due = now + (terms.deadline_s if terms.deadline_s is not None else self.slo.scale * req.solo_s)
            if terms.adaptive:
                req.adaptive = True
                req.options, req.plans, req.rests = self._options(asked, (steps, rows), req.rest, terms.options)
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

    def _group(self, now: float) -> list[Request]:
        """The longest prefix of the queue (in admission order) that fits the free rows; `slo`: the waiting
        requests that its pick would step now (a request starts when it first steps)."""
        if self.policy == "slo":
            return [r for r, _, _ in self._pick(now) if r.status is Status.WAITING]
        free, group = self.row_budget - self.used_rows, []
        limit = 1 if self.policy == "single" else len(self.waiting)
        for req in itertools.islice(self.waiting, limit):
            if req.rows > free:
                break
            group.append(req)
            free -= req.rows
        return group

    def _pick(self, now: float) -> list[tuple[Request, int, int]]:
        """`slo`: this iteration's batch (`deadline.pick`) from the waiting and running requests in urgency order
        (`deadline.in_order`), a waiting one where its rows fit what is left of the rows held (`hold`)."""
        free, order = self.hold - self.used_rows, []
        for r in in_order([*self.waiting, *self.running.values()], now, self.cumulative):
            if r.status is Status.WAITING:
                if r.rows > free:
                    continue
                free -= r.rows
            order.append(r)
        return pick(order, self.slo.curve, self.row_budget)

    def _admit(self, now: float) -> list[Request]:
        """Move waiting requests into the running set, as the policy allows at this step boundary; those that
        allow a trade get their plan for the load of this moment first, lowest priority first."""
        if not self.waiting or (self.policy not in STEP_LEVEL and self.running):
            return []
        group = self._group(now)
        if self.policy == "request":
            full = len(group) < len(self.waiting) or sum(r.rows for r in group) == self.row_budget
            if not full and now < self.waiting[0].arrival + self.max_delay:
                return []  # the window is open: wait for more (see `wakeup`)
        movable = [r for r in group if len(r.options) > 1] if self.slo is not None and not self.fixed else []
        if movable:
            for req in sorted(movable, key=lambda r: (r.priority, -r.arrival)):
                self._plan(req, now)
            group = self._group(now)  # their plans may take other rows
        for req in group:
            self.waiting.remove(req)
            self._move(req, Status.RUNNING, now)
            self.running[req.id] = req
        return group

    def wakeup(self) -> float | None:
        """When admission can change with no new arrival: the request policy's window closing, else None."""
        if self.policy == "request" and self.waiting and not self.running:
            return self.waiting[0].arrival + self.max_delay
        return None

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
        if self.slo is not None and not self.fixed:
            self._check_running(now)
        new = self._admit(now)
        if self.policy == "slo":
            chosen = [c for c in self._pick(now) if c[0].status is Status.RUNNING]
            batch = [(r.id, r.current) for r, _, _ in chosen]
            enc_rows, dec_rows = sum(e for _, e, _ in chosen), sum(d for _, _, d in chosen)
            return self._output(new, batch, freed, enc_rows, dec_rows)
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
        return self._output(new, batch, freed, enc_rows, dec_rows)

    def _output(self, new, batch, freed, enc_rows, dec_rows) -> SchedulerOutput:
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
