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

A request reserves its peak rows while it runs: num x 2 if any of its steps needs the unconditional half
(a guided step, or a recompute step whose state a guided step reuses), else num. The budget is the engines'
batch.max, so no graph call is ever split.
"""
from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...core.errors import DDTExportError, InputError
from ..sampling.plan import Step, peak_rows, plan_steps, step_rows
from ..sampling.request import SampleRequest

POLICIES = ("step", "fair", "request", "single")
STEP_LEVEL = ("step", "fair")  # policies that admit at every step boundary


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED)


TRANSITIONS = {Status.WAITING: {Status.RUNNING, Status.CANCELLED},
               Status.RUNNING: {Status.DONE, Status.FAILED, Status.CANCELLED}}


class QueueFull(DDTExportError):
    """The waiting queue holds `max_queue` requests: come back later (HTTP 503 with Retry-After)."""


def check_policy(policy: str, field: str = "--batching") -> str:
    """The one check of a batching policy name."""
    if policy not in POLICIES:
        raise InputError(field, " | ".join(POLICIES), policy)
    return policy


@dataclass(eq=False)
class Request:
    """One request in the scheduler. Only the scheduler changes it; `context` is whatever the caller attaches
    (the server's ticket), `images` the result once done ((num, H, W, C) uint8; None in simulation)."""

    id: int
    sample: SampleRequest  # resolved: labels, seed, sampler, recompute steps
    steps: list[Step]  # its plan, one entry per sampling step
    rows: int  # peak rows, reserved while running
    arrival: float
    admitted: float | None = None
    sampled: float | None = None  # when its last step finished (before the VAE call)
    ended: float | None = None  # when it finished (done, failed or cancelled)
    done_steps: int = 0
    status: Status = Status.WAITING
    error: Exception | None = None
    cancel_requested: bool = False
    credit: int = 0  # the `fair` policy's deficit counter, in rows
    images: np.ndarray | None = None
    context: Any = None

    @property
    def num(self) -> int:
        return self.sample.num

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    @property
    def current(self) -> Step:
        return self.steps[self.done_steps]


@dataclass(frozen=True)
class SchedulerOutput:
    """One iteration, as plain data: what the model runner needs and nothing it could change."""

    new: tuple[tuple[int, SampleRequest], ...] = ()  # admitted at this boundary: the runner starts their rows
    batch: tuple[tuple[int, Step], ...] = ()  # who steps this iteration, and at which step
    freed: tuple[int, ...] = ()  # left without finishing their steps (cancelled): the runner drops their rows
    encoder_rows: int = 0
    decoder_rows: int = 0

    @property
    def empty(self) -> bool:
        return not (self.batch or self.freed or self.new)


@dataclass(frozen=True)
class RunnerOutput:
    """What one iteration's model step did: the requests that failed (by id), the images of those that finished
    their last step, and how long the graph calls took (measured by the runner, modelled by the simulator)."""

    failed: dict[int, Exception] = field(default_factory=dict)
    images: dict[int, Any] = field(default_factory=dict)  # id -> (num, H, W, C) uint8 (None in simulation)
    step_s: float = 0.0
    vae_s: float = 0.0
    vae_rows: int = 0


class Scheduler:
    """The waiting queue and the running set; decides each iteration's batch and applies its result. Not
    thread-safe: its one caller (`engine.Engine`) serializes the calls."""

    def __init__(self, row_budget: int, policy: str = "step", max_delay: float = 0.0, max_queue: int = 64):
        assert row_budget >= 1 and max_queue >= 1 and max_delay >= 0, (row_budget, max_queue, max_delay)
        self.row_budget, self.policy, self.max_delay, self.max_queue = row_budget, check_policy(policy), \
            max_delay, max_queue
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # in admission order
        self._leaving: list[Request] = []  # retired by `schedule`, reported by the next `update`
        self._ids = itertools.count()

    def _move(self, req: Request, status: Status, now: float, error: Exception | None = None) -> None:
        """The one place a status changes."""
        if status not in TRANSITIONS.get(req.status, ()):
            raise AssertionError(f"request {req.id}: {req.status.value} -> {status.value} is not a transition")
        req.status = status
        if status is Status.RUNNING:
            req.admitted = now
        else:
            req.ended, req.error = now, error

    # ------------------------------------------------------------------------------------------- admission

    def submit(self, sample: SampleRequest, now: float, context: Any = None) -> Request:
        """Queue a resolved request; QueueFull when `max_queue` are waiting, InputError when it can never fit."""
        assert sample.recompute is not None, "resolve the request's schedule first"
        steps = plan_steps(sample.sampler, sample.recompute)
        rows = peak_rows(steps, sample.num)
        if rows > self.row_budget:
            per = rows // sample.num
            raise InputError("num", f"<= {self.row_budget // per} images ({per} rows each within the row budget "
                             f"{self.row_budget}, the engines' batch.max)", sample.num)
        if len(self.waiting) >= self.max_queue:
            raise QueueFull("queue", f"fewer than {self.max_queue} waiting requests (--max-queue)",
                            f"{len(self.waiting)} waiting")
        req = Request(next(self._ids), sample, steps, rows, now, context=context)
        self.waiting.append(req)
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

    def _group(self) -> list[Request]:
        """The longest first-come-first-served prefix of the queue that fits the free rows."""
        free, group = self.row_budget - self.used_rows, []
        limit = 1 if self.policy == "single" else len(self.waiting)
        for req in itertools.islice(self.waiting, limit):
            if req.rows > free:
                break
            group.append(req)
            free -= req.rows
        return group

    def _admit(self, now: float) -> list[Request]:
        """Move waiting requests into the running set, as the policy allows at this step boundary."""
        if not self.waiting or (self.policy not in STEP_LEVEL and self.running):
            return []
        group = self._group()
        if self.policy == "request":
            full = len(group) < len(self.waiting) or sum(r.rows for r in group) == self.row_budget
            if not full and now < self.waiting[0].arrival + self.max_delay:
                return []  # the window is open: wait for more (see `wakeup`)
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

    # ------------------------------------------------------------------------------------------- the iteration

    def schedule(self, now: float) -> SchedulerOutput:
        """This iteration: retire the cancelled, admit, then every running request at its current step (`fair`:
        those whose credit covers their rows; calling it spends the credits)."""
        freed = []
        for req in [r for r in self.running.values() if r.cancel_requested]:
            del self.running[req.id]
            self._move(req, Status.CANCELLED, now)
            self._leaving.append(req)
            freed.append(req.id)
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
        return SchedulerOutput(tuple((r.id, r.sample) for r in new), tuple(batch), tuple(freed), enc_rows, dec_rows)

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
