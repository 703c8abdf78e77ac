"""The batch loop: one asyncio task drives the runtime's scheduler (`runtime.batching`) and runs each model step
(`runtime.batch_step`) in a worker thread. Handlers only submit and await a `Ticket`.

Per iteration, on the event loop: admit (initial noise for the admitted), hand the batch to a thread for the
graph calls, advance, tell each request's stream its progress, retire, one VAE call (thread) for the finished,
answer. Submissions and cancellations happen on the event loop between those steps, so the scheduler needs no
lock. An engine failure fails that iteration's requests (500); the loop goes on.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..core.errors import BackendError, DDTExportError
from ..runtime import batch_step
from ..runtime.batching import CANCELLED, DONE, FAILED, SAMPLED, Job, RequestSpec, Scheduler
from .metrics import Metrics

log = logging.getLogger("ddt_export.serve")

RETRY_AFTER_S = 1  # Retry-After of a 503 (queue full, shutting down)


class ShuttingDown(DDTExportError):
    """The server is draining (SIGTERM): it finishes what it holds and takes nothing new (HTTP 503)."""


@dataclass
class Outcome:
    """How a request ended: images (num, H, W, C) uint8, or an error; and its timings in seconds."""

    status: str  # done | failed | cancelled
    images: np.ndarray | None = None
    error: Exception | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class Ticket:
    """What a handler holds: the final outcome (a future) and, for streams, the progress events."""

    spec: RequestSpec
    future: asyncio.Future
    events: asyncio.Queue | None
    job: Job | None = None
    id: str = ""

    def progress(self, step: int, total: int) -> None:
        if self.events is not None:
            self.events.put_nowait(("progress", {"step": step, "steps": total}))

    def end(self, outcome: Outcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)
        if self.events is not None:
            self.events.put_nowait(("end", outcome))


class Service:
    """The engines, the scheduler, the metrics and the task that runs the batch loop."""

    def __init__(self, engines, scheduler: Scheduler, metrics: Metrics, *, clock=time.monotonic,
                 trace: Callable[[dict], None] | None = None):
        self.engines, self.scheduler, self.metrics, self.clock = engines, scheduler, metrics, clock
        self.trace = trace  # one record per iteration (--trace FILE)
        self.draining = False
        self.loop_error: BaseException | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stop = False
        self.schedule_lock = threading.Lock()  # one dp:K template trajectory at a time

    # ----------------------------------------------------------------------------------------- handlers' side

    def submit(self, spec: RequestSpec, stream: bool = False) -> Ticket:
        """Queue a request (QueueFull, ShuttingDown, InputError raise here, before anything is held)."""
        if self.draining:
            raise ShuttingDown("server", "accepting requests", "shutting down (SIGTERM): finishing the requests "
                               "it holds")
        loop = asyncio.get_running_loop()
        ticket = Ticket(spec, loop.create_future(), asyncio.Queue() if stream else None)
        ticket.job = self.scheduler.submit(spec, self.clock(), context=ticket)
        ticket.id = f"req-{ticket.job.id}"
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: out of the queue now, out of the batch at the next step boundary."""
        if ticket.future.done() or ticket.job is None:
            return
        was_waiting = ticket.job.status == "waiting"
        self.scheduler.cancel(ticket.job)
        if was_waiting:
            self._answer(ticket.job, CANCELLED)
        self._wake.set()

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done() and not self.draining

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def drain(self) -> None:
        """Refuse new requests from now on; the loop finishes the ones it holds."""
        self.draining = True
        self._wake.set()

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
        while not (self._stop and self.scheduler.idle):
            try:
                ran = await self._iteration()
            except Exception as e:  # a bug, not a request's fault: fail what the batch held, keep serving
                log.exception("batch loop iteration failed")
                self.loop_error = e
                for job in list(self.scheduler.running):
                    job.status, job.error = FAILED, e
                for job in self.scheduler.retire(self.clock()):
                    self._answer(job, job.status)
                ran = True
            if not ran:
                wake = self.scheduler.wakeup()
                timeout = None if wake is None else max(0.0, wake - self.clock())
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass

    async def _iteration(self) -> bool:
        sch, m = self.scheduler, self.metrics
        now = self.clock()
        for job in sch.admit(now):
            batch_step.start(self.engines, job)
            m.queue_seconds.observe(now - job.arrival)
        m.waiting.set(len(sch.waiting))
        m.active.set(len(sch.running))
        batch = sch.batch()
        if not batch.jobs:
            return False
        m.iteration_requests.observe(len(batch))
        if batch.encoder_rows:
            m.iteration_rows.labels("encoder").observe(batch.encoder_rows)
        m.iteration_rows.labels("decoder").observe(batch.decoder_rows)
        t0 = self.clock()
        t1 = None
        try:
            failed = await asyncio.to_thread(batch_step.run_iteration, self.engines, batch)
            t1 = self.clock()
        except Exception as e:  # the engines failed: every request of this iteration fails, the server stays up
            log.error("engine failure at an iteration of %d requests: %r", len(batch), e)
            sch.fail(batch.jobs, engine_failure(e, "encoder/decoder"))
        else:
            m.iteration_seconds.observe(t1 - t0)
            sch.advance(batch, t1, failed)
            for job in batch.jobs:
                if job.status in ("running", SAMPLED):
                    job.context.progress(job.step, job.total_steps)
        vae_rows, vae_s = await self._finish(sch.retire(self.clock()))
        if self.trace is not None:
            self.trace({"start": now, "step_s": None if t1 is None else t1 - t0, "end": self.clock(),
                        "requests": len(batch), "encoder_rows": batch.encoder_rows,
                        "decoder_rows": batch.decoder_rows, "vae_rows": vae_rows, "vae_s": vae_s})
        return True

    async def _finish(self, retired: list[Job]) -> tuple[int, float]:
        """One VAE call for every retired request that finished its steps, then answer every retired one.
        Returns (the VAE call's rows, its seconds)."""
        sampled = [j for j in retired if j.status == SAMPLED]
        images, vae_s = {}, 0.0
        if sampled:
            self.metrics.iteration_rows.labels("vae_decoder").observe(sum(j.spec.num for j in sampled))
            t0 = self.clock()
            try:
                images, failed = await asyncio.to_thread(batch_step.finish, self.engines, sampled)
            except Exception as e:
                log.error("engine failure in the VAE call of %d requests: %r", len(sampled), e)
                failed = {j.id: engine_failure(e, "vae_decoder") for j in sampled}
            vae_s = self.clock() - t0
            for j in sampled:
                if j.id in failed:
                    j.status, j.error = FAILED, failed[j.id]
                else:
                    j.status = DONE
        for job in retired:
            self._answer(job, job.status, images.get(job.id), vae_s if job in sampled else 0.0)
        self.metrics.active.set(len(self.scheduler.running))
        return sum(j.spec.num for j in sampled), vae_s

    def _answer(self, job: Job, status: str, images: np.ndarray | None = None, vae_s: float = 0.0) -> None:
        ticket: Ticket = job.context
        now = self.clock()
        admitted = job.admitted if job.admitted is not None else now
        sampled = job.sampled if job.sampled is not None else now
        timings = {"queue_s": admitted - job.arrival, "sampling_s": max(0.0, sampled - admitted), "vae_s": vae_s,
                   "total_s": now - job.arrival}
        job.state = None  # the arrays go with the answer
        metric = {DONE: "ok", FAILED: "failed", CANCELLED: "cancelled"}[status]
        self.metrics.requests.labels(metric).inc()
        if status == DONE:
            self.metrics.request_seconds.observe(timings["total_s"])
            self.metrics.images.inc(job.spec.num)
        ticket.end(Outcome(status, images, job.error, timings))


def engine_failure(e: Exception, graphs: str) -> BackendError:
    return BackendError(f"engine call ({graphs})", "a successful graph call", f"{type(e).__name__}: {str(e)[:300]}")
