"""The serving engine: one scheduler, one executor, one clock; `step()` is one iteration. Torch-free.

    engine = Engine(Scheduler(budget, "step"), ModelRunner(engines))      # the server
    engine = Engine(Scheduler(budget, "step"), SimulatedRunner(curve, clock), clock)   # the simulator, the tests
    req = engine.submit(sample_request, context=ticket)
    it = engine.step()          # schedule -> execute -> update; None when there was nothing to run

Everything that drives step-level batching calls this same `step()`: the server (in a worker thread, with
`time.monotonic`), the simulator (a virtual clock and a cost curve instead of engines) and the tests. The
executor is anything with `execute(SchedulerOutput) -> RunnerOutput` and `reset()`. The scheduler is not thread-safe, so
the engine holds a lock around every scheduler call (submit, cancel, schedule, update); the graph calls run
outside it, so a submission never waits for an iteration.

With a `calibrate.Calibration` (the server, on a curve measured at start-up) each busy iteration's seconds (the
step, and the loop's gap before it where the loop did not idle) are compared with what the scheduler's base curve
predicts for it, and the scheduler's `SloModel` curve is rescaled by their moving ratio (its solo latencies, dues
and projections in the machine's seconds while it serves).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..sampling.request import SampleRequest
from .calibrate import GAP_MAX_S, Calibration
from .scheduler import Request, RunnerOutput, Scheduler, SchedulerOutput
from .slo import Terms


class Executor(Protocol):
    def execute(self, out: SchedulerOutput) -> RunnerOutput: ...

    def reset(self) -> None:
        """Drop every request's state (after `Engine.abort`)."""


@dataclass
class Iteration:
    """What one `step()` did: the scheduler's output, the runner's, and the requests it touched."""

    out: SchedulerOutput
    res: RunnerOutput
    admitted: list[Request] = field(default_factory=list)
    stepped: list[Request] = field(default_factory=list)  # the batch, in batch order
    finished: list[Request] = field(default_factory=list)  # done, failed or cancelled since the last step
    start: float = 0.0
    end: float = 0.0


class Engine:
    def __init__(self, scheduler: Scheduler, executor: Executor, clock: Callable[[], float] = time.monotonic,
                 calibration: Calibration | None = None):
        self.scheduler, self.executor, self.clock = scheduler, executor, clock
        self.calibration = calibration  # needs the scheduler's SloModel; its curve is the base
        self._lock = threading.Lock()
        self._last_end: float | None = None  # the end of the last busy iteration

    def submit(self, sample: SampleRequest, context: Any = None, arrival: float | None = None,
               terms: Terms = Terms()) -> Request:
        """Queue a resolved request (`arrival`: default now) with its service terms (priority, deadline, the
        plans it may be moved to). Raises QueueFull (SloUnreachable) / InputError before holding it."""
        with self._lock:
            return self.scheduler.submit(sample, self.clock() if arrival is None else arrival, context, terms)

    def cancel(self, req: Request) -> bool:
        """True when the request is finished now (it was waiting); else it leaves at the next step boundary."""
        with self._lock:
            return self.scheduler.cancel(req, self.clock())

    def step(self) -> Iteration | None:
        """One iteration; None when nothing was scheduled."""
        with self._lock:
            start = self.clock()
            out = self.scheduler.schedule(start)
            if out.empty:
                return None
            running = self.scheduler.running
            admitted = [running[rid] for rid, _ in out.new]
            stepped = [running[rid] for rid, _ in out.batch]
        res = self.executor.execute(out)
        with self._lock:
            end = self.clock()
            finished = self.scheduler.update(out, res, end)
            if self.calibration is not None and out.batch:
                self._calibrate(out, res, start, end)
        return Iteration(out, res, admitted, stepped, finished, start, end)

    def _calibrate(self, out: SchedulerOutput, res: RunnerOutput, start: float, end: float) -> None:
        """Compare this iteration (and the loop's gap before it, where short) with the base curve; rescale the
        scheduler's curve when the calibration says so."""
        cal, gap = self.calibration, 0.0
        if self._last_end is not None and 0.0 <= start - self._last_end <= GAP_MAX_S:
            gap = start - self._last_end
        self._last_end = end
        predicted = (cal.base.iteration(len(out.batch), out.encoder_rows, out.decoder_rows)
                     + cal.base.call("vae_decoder", res.vae_rows))
        if cal.observe(predicted, end - start + gap) and self.scheduler.slo is not None:
            self.scheduler.slo = dataclasses.replace(self.scheduler.slo, curve=cal.curve)

    def abort(self, error: Exception) -> list[Request]:
        """Fail everything running (a fault outside any one request); the executor's state is dropped too."""
        with self._lock:
            failed = self.scheduler.abort(error, self.clock())
        self.executor.reset()
        return failed

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def wakeup(self) -> float | None:
        with self._lock:
            return self.scheduler.wakeup()
