"""Step-level continuous batching: the scheduler. Torch-free, and free of HTTP, asyncio, Ray and numerics.

DDT's decoder takes no timestep (all its time information comes through the encoder state s), so one decoder
call can carry rows of requests that are at different steps, with different step counts, CFG scales and
encoder schedules; only the encoder needs a per-row t. So the batch is re-planned at every step boundary
(iteration-level scheduling, as Orca and vLLM do for LLMs):

    admitted = scheduler.admit(now)     # waiting -> running, within the row budget (CFG rows counted)
    batch = scheduler.batch()           # every running request at its current step
    failed = batch_step.run_iteration(engines, batch)   # the model step: one encoder call, one decoder call
    scheduler.advance(batch, now, failed)
    retired = scheduler.retire(now)     # finished (-> one batched VAE call), failed, cancelled

The three pieces (admission, the model step, retirement) are separate, and the scheduler never reads a clock:
the caller passes `now`, so the server drives it with `time.monotonic()` and the simulator
(`benchmarks/serve_load.py simulate`) and the tests with a virtual clock.

Policies (`POLICIES`):
- `step`: admit at every step boundary, first come first served, while the request's rows fit the budget;
  every running request does one step per iteration.
- `fair`: admitted as `step`, but a request steps in an iteration only when its credit covers its rows
  (deficit round robin: every iteration each running request earns the smallest running request's rows), so
  a request advances at a rate inversely proportional to its rows. Where a step's cost is linear in rows (a
  CPU), every request then gets an equal share of the machine instead of a share proportional to its rows: a
  1-image request beside a 4-image CFG request no longer runs at the big one's pace. Where rows are nearly
  free (a GPU), `step` keeps the batches fuller.
- `request`: the Triton-style baseline: when the batch is empty, group what arrived within `max_delay` of
  the oldest waiting request (sooner when the group fills the budget) and run the group to completion before
  admitting anyone else; a member that finishes early still answers at once (the stronger baseline).
- `single`: one request at a time (the official demo's behaviour).

A request reserves its peak rows while it runs: num x 2 if any of its steps needs the unconditional half
(a guided step, or a recompute step whose state a guided step reuses), else num. The budget is the engines'
batch.max, so no graph call is ever split.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..core.config import SamplerConfig
from ..core.errors import DDTExportError, InputError
from .host import Step, plan_steps

POLICIES = ("step", "fair", "request", "single")
STEP_LEVEL = ("step", "fair")  # policies that admit at every step boundary

# Job.status values
WAITING, RUNNING, SAMPLED, DONE, FAILED, CANCELLED = "waiting", "running", "sampled", "done", "failed", "cancelled"


class QueueFull(DDTExportError):
    """The waiting queue holds `max_queue` requests: come back later (HTTP 503 with Retry-After)."""


@dataclass(frozen=True)
class RequestSpec:
    """A resolved generation request: what `ddt-export generate --class label --num --seed ...` would run."""

    label: int
    num: int
    seed: int
    sampler: SamplerConfig
    schedule: tuple[int, ...]  # recompute steps
    schedule_spec: str  # all | uniform:R | dp:K, as asked


def step_rows(st: Step, num: int) -> tuple[int, int]:
    """(encoder rows, decoder rows) of one request of `num` images at step `st`."""
    enc = (2 if st.enc_uncond else 1) * num if st.recompute else 0
    return enc, (2 if st.dec_uncond else 1) * num


def peak_rows(plan: Sequence[Step], num: int) -> int:
    """The most rows the request puts into one graph call over its whole plan (what it reserves)."""
    return max(max(step_rows(st, num)) for st in plan)


@dataclass(eq=False)
class Job:
    """One request in the scheduler. `state` holds its numerics (`batch_step.JobState`; None in simulation),
    `context` whatever the caller attaches (the server's future and progress queue)."""

    id: int
    spec: RequestSpec
    plan: list[Step]
    rows: int  # peak rows, reserved while running
    arrival: float
    admitted: float | None = None
    sampled: float | None = None  # when its last step finished
    step: int = 0  # steps done
    status: str = WAITING
    error: Exception | None = None
    cancel_requested: bool = False
    credit: int = 0  # the `fair` policy's deficit counter, in rows
    state: Any = None
    context: Any = None

    @property
    def total_steps(self) -> int:
        return len(self.plan)

    @property
    def current(self) -> Step:
        return self.plan[self.step]


@dataclass
class Batch:
    """One iteration: every running request at its current step, and the rows of the two graph calls."""

    jobs: list[Job] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    encoder_rows: int = 0
    decoder_rows: int = 0

    def __len__(self) -> int:
        return len(self.jobs)


class Scheduler:
    """The waiting queue and the running set; decides each iteration's batch. Not thread-safe: one thread (the
    server's event loop, the simulator) calls it; the model step works on the `Batch` it hands out."""

    def __init__(self, row_budget: int, policy: str = "step", max_delay: float = 0.0, max_queue: int = 64):
        if policy not in POLICIES:
            raise InputError("--batching", " | ".join(POLICIES), policy)
        if row_budget < 1:
            raise InputError("row budget", ">= 1 rows", row_budget)
        if max_queue < 1:
            raise InputError("--max-queue", ">= 1", max_queue)
        if not max_delay >= 0:
            raise InputError("--max-delay-ms", ">= 0", max_delay)
        self.row_budget, self.policy, self.max_delay, self.max_queue = row_budget, policy, max_delay, max_queue
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------------------- admission

    def submit(self, spec: RequestSpec, now: float, context: Any = None) -> Job:
        """Queue a request; QueueFull when `max_queue` are waiting, InputError when it can never fit."""
        plan = plan_steps(spec.sampler, spec.schedule)
        rows = peak_rows(plan, spec.num)
        if rows > self.row_budget:
            per = rows // spec.num
            raise InputError("num", f"<= {self.row_budget // per} images ({per} rows each within the row budget "
                             f"{self.row_budget}, the engines' batch.max)", spec.num)
        if len(self.waiting) >= self.max_queue:
            raise QueueFull("queue", f"fewer than {self.max_queue} waiting requests (--max-queue)",
                            f"{len(self.waiting)} waiting")
        job = Job(next(self._ids), spec, plan, rows, now, context=context)
        self.waiting.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """A waiting request leaves the queue now; a running one leaves the batch at the next step boundary."""
        if job.status == WAITING and job in self.waiting:
            self.waiting.remove(job)
            job.status = CANCELLED
        elif job.status == RUNNING:
            job.cancel_requested = True

    @property
    def used_rows(self) -> int:
        return sum(j.rows for j in self.running)

    def _group(self) -> list[Job]:
        """The longest first-come-first-served prefix of the queue that fits the free rows."""
        free, group = self.row_budget - self.used_rows, []
        limit = 1 if self.policy == "single" else len(self.waiting)
        for job in itertools.islice(self.waiting, limit):
            if job.rows > free:
                break
            group.append(job)
            free -= job.rows
        return group

    def admit(self, now: float) -> list[Job]:
        """Move waiting requests into the running set, as the policy allows at this step boundary."""
        if not self.waiting or (self.policy not in STEP_LEVEL and self.running):
            return []
        group = self._group()
        if self.policy == "request":
            full = len(group) < len(self.waiting) or sum(j.rows for j in group) == self.row_budget
            if not full and now < self.waiting[0].arrival + self.max_delay:
                return []  # the window is open: wait for more (see `wakeup`)
        for job in group:
            self.waiting.popleft()
            job.status, job.admitted = RUNNING, now
            self.running.append(job)
        return group

    def wakeup(self) -> float | None:
        """When admission can change with no new arrival: the request policy's window closing, else None."""
        if self.policy == "request" and self.waiting and not self.running:
            return self.waiting[0].arrival + self.max_delay
        return None

    # ------------------------------------------------------------------------------------------- the step

    def batch(self) -> Batch:
        """Every running request at its current step (`fair`: those whose credit covers their rows). Call it
        once per iteration: under `fair` it spends the credits."""
        b = Batch()
        quantum = min((j.rows for j in self.running), default=0)
        for job in self.running:
            if self.policy == "fair":
                job.credit += quantum
                if job.credit < job.rows:
                    continue
                job.credit -= job.rows
            st = job.current
            enc, dec = step_rows(st, job.spec.num)
            b.jobs.append(job)
            b.steps.append(st)
            b.encoder_rows += enc
            b.decoder_rows += dec
        return b

    def advance(self, batch: Batch, now: float, failed: dict[int, Exception] | None = None) -> None:
        """After the model step: each request of the batch did its step, or failed (`failed`: by job id)."""
        failed = failed or {}
        for job in batch.jobs:
            if job.id in failed:
                job.status, job.error = FAILED, failed[job.id]
                continue
            job.step += 1
            if job.step == job.total_steps:
                job.status, job.sampled = SAMPLED, now

    def fail(self, jobs: Sequence[Job], error: Exception) -> None:
        """An engine failure: every request of the iteration fails with it."""
        for job in jobs:
            job.status, job.error = FAILED, error

    # ------------------------------------------------------------------------------------------- retirement

    def retire(self, now: float) -> list[Job]:
        """Remove the running requests that are finished (status `sampled`: the caller's VAE call makes them
        `done`), failed, or cancelled (their rows are free from the next iteration on)."""
        out, keep = [], []
        for job in self.running:
            if job.cancel_requested and job.status == RUNNING:
                job.status = CANCELLED
            (keep if job.status == RUNNING else out).append(job)
        self.running = keep
        return out

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
