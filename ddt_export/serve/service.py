"""The batch loop: one asyncio task drives the serving engine (`runtime.batching.engine.Engine`), running each
`step()` (schedule, the model runner's graph calls, update) in a worker thread. Handlers only submit and await a
`Ticket`.

The engine serializes its scheduler calls under its own lock, so a handler's submit or cancel on the event loop
never races an iteration in the thread. After each step the loop tells each stepped request's stream its
progress and answers every request the step finished (done, failed, cancelled). An engine failure fails that
iteration's requests (the runner turns it into their BackendError, 500); a fault in the loop itself fails what
is running and the loop goes on. `halt` (the server's immediate stop) answers every request still held with a
ShuttingDown (503) at once, and the loop ends after the iteration in progress.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..core.errors import DDTExportError
from ..runtime.batching.engine import Engine, Iteration
from ..runtime.batching.scheduler import Request, Status
from ..runtime.batching.slo import Terms
from ..runtime.sampling.request import SampleRequest
from .metrics import Metrics

log = logging.getLogger("ddt_export.serve")

RETRY_AFTER_S = 1  # Retry-After of a 503 (queue full, shutting down)


class ShuttingDown(DDTExportError):
    """The server is draining (SIGTERM): it finishes what it holds and takes nothing new (HTTP 503)."""


@dataclass
class Outcome:
    """How a request ended: images (num, H, W, C) uint8, or an error; and its timings in seconds."""

    status: Status
    images: np.ndarray | None = None
    error: Exception | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class Ticket:
    """What a handler holds: the final outcome (a future) and, for streams, the progress events."""

    spec: SampleRequest
    future: asyncio.Future
    events: asyncio.Queue | None
    request: Request | None = None
    id: str = ""

    def progress(self, step: int, req: Request) -> None:
        """A step done: the step, the steps of the plan it runs (a move to another plan changes them), the plan."""
        if self.events is not None:
            self.events.put_nowait(("progress", {"step": step, "steps": req.total_steps, "plan": req.plan,
                                                 "fid_delta": req.dfid}))

    def end(self, outcome: Outcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)
        if self.events is not None:
            self.events.put_nowait(("end", outcome))


class Service:
    """The serving engine, the metrics and the task that runs the batch loop."""

    def __init__(self, engine: Engine, metrics: Metrics, *, trace: Callable[[dict], None] | None = None):
        self.engine, self.metrics = engine, metrics
        self.trace = trace  # one record per iteration (--trace FILE)
        self.draining = False
        self.loop_error: BaseException | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stop = False
        self._halted = False
        self._held: set[Ticket] = set()  # submitted, not answered yet

    # ----------------------------------------------------------------------------------------- handlers' side

    def submit(self, spec: SampleRequest, stream: bool = False, terms: Terms = Terms()) -> Ticket:
        """Queue a resolved request with its service terms (QueueFull and SloUnreachable, ShuttingDown,
        InputError raise here, before anything is held)."""
        if self.draining:
            raise ShuttingDown("server", "accepting requests", "shutting down (SIGTERM): finishing the requests "
                               "it holds")
        loop = asyncio.get_running_loop()
        ticket = Ticket(spec, loop.create_future(), asyncio.Queue() if stream else None)
        ticket.request = self.engine.submit(spec, context=ticket, terms=terms)
        ticket.id = f"req-{ticket.request.id}"
        self._held.add(ticket)
        self.metrics.waiting.set(len(self.engine.scheduler.waiting))
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: out of the queue now, out of the batch at the next step boundary."""
        if ticket.future.done() or ticket.request is None:
            return
        if self.engine.cancel(ticket.request):
            self._answer(ticket.request)
        self._wake.set()

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done() and not self.draining

    @property
    def idle(self) -> bool:
        return self.engine.idle

    def drain(self) -> None:
        """Refuse new requests from now on; the loop finishes the ones it holds."""
        self.draining = True
        self._wake.set()

    def halt(self, why: str) -> int:
        """Stop at once: every request held (waiting or running) is answered ShuttingDown (503) now, and the
        loop ends after the iteration in progress (its results are dropped). Returns how many were answered."""
        self.draining = self._halted = True
        held, self._held = list(self._held), set()
        for ticket in held:
            ticket.end(Outcome(Status.CANCELLED, error=ShuttingDown("server", "to finish the request", why)))
        self.metrics.requests.labels("rejected").inc(len(held))
        self._wake.set()
        return len(held)

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ddt-batch-loop")

    async def close(self) -> None:
        """Drain, then stop the loop once it holds nothing."""
        self.drain()
        if self._task is not None:
            self._stop = True
            self._wake.set()
            await self._task

    # ----------------------------------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        while not self._halted and not (self._stop and self.engine.idle):
            try:
                it = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # a bug, not a request's fault: fail what the engine held, keep serving
                log.exception("batch loop iteration failed")
                self.loop_error = e
                for req in self.engine.abort(e):
                    self._answer(req)
                continue
            if self._halted:  # answered by `halt` already
                return
            if it is not None:
                self._report(it)
                continue
            wake = self.engine.wakeup()
            timeout = None if wake is None else max(0.0, wake - self.engine.clock())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _report(self, it: Iteration) -> None:
        """After a step: metrics, each stepped request's progress, the answers of the finished ones."""
        m, out, res = self.metrics, it.out, it.res
        for req in it.admitted:
            m.queue_seconds.observe(req.admitted - req.arrival)
        if out.batch:
            m.iteration_requests.observe(len(out.batch))
            if out.encoder_rows:
                m.iteration_rows.labels("encoder").observe(out.encoder_rows)
            m.iteration_rows.labels("decoder").observe(out.decoder_rows)
            m.iteration_seconds.observe(res.step_s)
        if res.vae_rows:
            m.iteration_rows.labels("vae_decoder").observe(res.vae_rows)
        for req in it.stepped:
            if req.status in (Status.RUNNING, Status.DONE):
                req.context.progress(req.done_steps, req)
        for req in it.finished:
            self._answer(req)
        m.waiting.set(len(self.engine.scheduler.waiting))
        m.active.set(len(self.engine.scheduler.running))
        if self.trace is not None and out.batch:
            self.trace({"start": it.start, "step_s": res.step_s, "end": it.end, "requests": len(out.batch),
                        "encoder_rows": out.encoder_rows, "decoder_rows": out.decoder_rows,
                        "vae_rows": res.vae_rows, "vae_s": res.vae_s, "failed": len(res.failed)})

    def _answer(self, req: Request) -> None:
        ticket: Ticket = req.context
        self._held.discard(ticket)
        end = req.ended if req.ended is not None else self.engine.clock()
        admitted = req.admitted if req.admitted is not None else end
        sampled = req.sampled if req.sampled is not None else end
        timings = {"queue_s": admitted - req.arrival, "sampling_s": max(0.0, sampled - admitted),
                   "vae_s": end - sampled if req.status is Status.DONE else 0.0, "total_s": end - req.arrival}
        images, req.images = req.images, None  # the arrays go with the answer
        metric = {Status.DONE: "ok", Status.FAILED: "failed", Status.CANCELLED: "cancelled"}[req.status]
        self.metrics.requests.labels(metric).inc()
        if req.status is Status.DONE:
            self.metrics.request_seconds.observe(timings["total_s"])
            self.metrics.images.inc(req.num)
            if req.dfid is not None:
                self.metrics.served_fid_delta.observe(req.dfid)
            if req.degraded:
                self.metrics.degraded.inc()
        if req.slo_met:
            self.metrics.met()
        elif req.slo_met is False:
            self.metrics.slo_missed.inc()
        ticket.end(Outcome(req.status, images, req.error, timings))
