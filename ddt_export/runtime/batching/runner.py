"""The model runner of step-level batching: one iteration's graph calls over a `SchedulerOutput`. Torch-free.

It holds the numerics of every running request (a `sampling.step.Rows` per request id: latents, labels, the
last encoder state, the step noise) and nothing else; statuses are the scheduler's. Per iteration:
1. drop the rows of the requests that left (`out.freed`), start the rows of the admitted (`out.new`): the
   initial latents and step noise of samples 0..num-1 of the request's seed, from the one noise function;
   a request moved to another plan (`out.switched`, at a boundary where the two plans share every step so far)
   keeps its state and goes on under the new plan's sampler;
2. one step of every request of the batch, each at its own step, with the one step function
   (`sampling.step.run_step`: one encoder call, one decoder call, the CFG combine and update rule per request);
3. one batched VAE call over the requests that took their last step (the latents themselves where the folder
   has no VAE graph, as `generate`), and their rows dropped.

A request's numerics are `generate`'s for the same settings, row for row (its noise depends on (seed, index)
alone and the graphs compute every row on its own), so its images equal `ddt-export generate`'s
(tests/test_serve_equal.py compares the PNGs). A non-finite tensor fails its request only; an engine error
fails the iteration's requests (BackendError); the runner goes on either way.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from ...core.errors import BackendError, NumericsError
from ...core.images import images_from_samples
from ..graphs.engines import Engines, call_graph
from ..sampling.step import Rows, run_step, start_rows
from .scheduler import RunnerOutput, SchedulerOutput

log = logging.getLogger("ddt_export.batching")


def engine_failure(e: Exception, graphs: str) -> BackendError:
    return BackendError(f"engine call ({graphs})", "a successful graph call", f"{type(e).__name__}: {str(e)[:300]}")


class ModelRunner:
    """`execute(out) -> RunnerOutput` on real engines; `rows` holds the running requests' state by id."""

    def __init__(self, engines: Engines, clock: Callable[[], float] = time.perf_counter):
        self.engines, self.clock = engines, clock
        self.rows: dict[int, Rows] = {}

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for rid in out.freed:
            self.rows.pop(rid, None)
        shape = self.engines.config.model.latent_shape
        for rid, req in out.new:
            self.rows[rid] = start_rows(req.sampler, req.labels, req.seed, range(req.num), shape)
        for rid, req in out.switched:  # moved to another plan at a sound boundary: same state, the new sampler
            self.rows[rid].sampler = req.sampler
        if not out.batch:
            return RunnerOutput()
        t0 = self.clock()
        try:
            failed = {out.batch[k][0]: e for k, e in
                      run_step(self.engines, [(self.rows[rid], st) for rid, st in out.batch]).items()}
        except Exception as e:  # the engines failed: every request of this iteration fails, the runner goes on
            log.error("engine failure at an iteration of %d requests: %r", len(out.batch), e)
            failed = {rid: engine_failure(e, "encoder/decoder") for rid, _ in out.batch}
        step_s = self.clock() - t0
        ids = [rid for rid, st in out.batch if st.last and rid not in failed]
        last = [self.rows[rid] for rid in ids]
        t0 = self.clock()
        images, vae_failed = self._finish(ids, [r.x for r in last]) if last else ({}, {})
        vae_s = self.clock() - t0 if last else 0.0
        for rid in [*failed, *ids]:
            self.rows.pop(rid, None)
        return RunnerOutput({**failed, **vae_failed}, images, step_s, vae_s, sum(r.num for r in last))

    def reset(self) -> None:
        self.rows.clear()

    def _finish(self, ids: list[int], final: list[np.ndarray]) -> tuple[dict[int, np.ndarray], dict[int, Exception]]:
        """One batched VAE call over the final latents of `ids`: ({id: images (num, H, W, C) uint8}, {id: error})."""
        latents = np.concatenate(final)  # (sum num, C, H, W)
        try:
            pixels = (latents if self.engines.vae_decoder is None else
                      call_graph(self.engines, "vae_decoder", {"latent": latents}))
        except Exception as e:
            log.error("engine failure in the VAE call of %d requests: %r", len(ids), e)
            return {}, {rid: engine_failure(e, "vae_decoder") for rid in ids}
        images, failed = {}, {}
        for rid, p in zip(ids, np.split(pixels, np.cumsum([len(x) for x in final])[:-1])):
            if np.isfinite(p).all():
                images[rid] = images_from_samples(p)
            else:
                failed[rid] = NumericsError("vae_decoder output image", "finite values",
                                            f"{int((~np.isfinite(p)).sum())} NaN/Inf of {p.size}")
        return images, failed
