"""The scheduler's records: a request's status, the request itself, and one iteration's input and output as plain
data. Torch-free. Only the scheduler (`scheduler.Scheduler`) changes a `Request`."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ...core.errors import DDTExportError
from ..sampling.plan import Step
from ..sampling.request import SampleRequest
from .slo import NORMAL, Option


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


class SloUnreachable(QueueFull):
    """A request that allows a quality trade would miss its SLO on every plan within its budget, given what the
    server holds (HTTP 503 with Retry-After, as a full queue)."""


@dataclass(eq=False)
class Request:
    """One request in the scheduler. Only the scheduler changes it; `context` is whatever the caller attaches
    (the server's ticket), `images` the result once done ((num, H, W, C) uint8; None in simulation).

    `options[0]` is the plan asked for, the others the frontier within its budget (`slo.frontier`), least dFID
    first; `plans[k]` their (steps, peak rows). Empty `options`: it allows no trade and runs what it asked."""

    id: int
    sample: SampleRequest  # what it runs: resolved, with its recompute steps (another option's once moved)
    steps: Sequence[Step]  # its plan, one entry per sampling step
    rows: int  # peak rows, reserved while running
    arrival: float
    priority: int = NORMAL
    asked: Option | None = None  # the plan asked for (its dFID where known)
    options: tuple[Option, ...] = ()
    plans: tuple[tuple[Sequence[Step], int], ...] = ()
    rests: tuple[tuple[float, ...], ...] = ()  # per option: `costs.rest_seconds` of its plan
    rest: tuple[float, ...] = ()  # rest[k]: its steps k.. and its VAE call alone on the machine (with an SLO)
    option: int = 0  # which option it runs
    adaptive: bool = False  # it allows a quality trade (refused with 503 when no option meets its SLO)
    due: float | None = None  # its SLO: done by then (None: no SLO accounting)
    solo_s: float | None = None  # the predicted solo latency of the plan asked for
    switched_at: int | None = None  # the step boundary of its last move (0: before its first step)
    slo_met: bool | None = None  # once finished: done by `due` (failed: False; cancelled: None)
    admitted: float | None = None
    sampled: float | None = None  # when its last step finished (before the VAE call)
    ended: float | None = None  # when it finished (done, failed or cancelled)
    done_steps: int = 0
    status: Status = Status.WAITING
    error: Exception | None = None
    cancel_requested: bool = False
    credit: int = 0  # the `fair` policy's deficit counter, in rows
    checked: int = -1  # the scheduler's epoch at its last SLO check while running
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

    @property
    def running_option(self) -> Option | None:
        return self.options[self.option] if self.options else self.asked

    @property
    def plan(self) -> str | None:
        """The stored plan it runs (None: the settings it gave)."""
        return self.sample.plan

    @property
    def dfid(self) -> float | None:
        """The measured dFID of what it runs (0.0 for the model's own sampler; None where unknown)."""
        opt = self.running_option
        return None if opt is None else opt.dfid

    @property
    def degraded(self) -> bool:
        return self.option != 0


@dataclass(frozen=True)
class SchedulerOutput:
    """One iteration, as plain data: what the model runner needs and nothing it could change."""

    new: tuple[tuple[int, SampleRequest], ...] = ()  # admitted at this boundary: the runner starts their rows
    batch: tuple[tuple[int, Step], ...] = ()  # who steps this iteration, and at which step
    freed: tuple[int, ...] = ()  # left without finishing their steps (cancelled): the runner drops their rows
    encoder_rows: int = 0
    decoder_rows: int = 0
    switched: tuple[tuple[int, SampleRequest], ...] = ()  # running requests moved to another plan at this
    # boundary (sound there: `sampling.step.switch_point`): the runner goes on with their state under it

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
