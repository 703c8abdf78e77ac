"""The sampling loop, in numpy with no torch: the official DDT sharing sampler over engine calls.

`sample()` runs the loop the engines chose at load (`Engines.loop`): the device-resident loop of a backend
that has one (`trt_loop`, TensorRT: x and s stay on the GPU) or the host loop here, which plans every step
(`plan.plan_steps`) and then takes them one by one with the one step function (`step.run_step`): an encoder
call on recompute steps, a decoder call every step, the CFG combine and the update rule in float32. CFG runs
the batch [uncond; cond] (2B rows, null class = num_classes), as the official. An observer (calibration,
validate's parity capture) needs host arrays, so it always runs the host loop.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ...core.config import SamplerConfig
from ...core.log import Progress
from ..graphs.engines import Engines, Graphs, Observer
from .plan import Step, plan_steps
from .step import Rows, check_inputs, run_step
from .trt_loop import device_sampler


def host_loop(graphs: Graphs, rows: Rows, steps: Sequence[Step], observer: Observer | None = None,
              progress: Progress | None = None, after: Callable[[Step, Rows], None] | None = None) -> np.ndarray:
    """Take every planned step on `rows` (in place); the final latents. A non-finite tensor raises its
    NumericsError. `after(step, rows)` sees the rows after each step (record_states keeps the encoder's s)."""
    for st in steps:
        failed = run_step(graphs, [(rows, st)], observer)
        if failed:
            raise failed[0]
        if after is not None:
            after(st, rows)
        if progress is not None:
            progress(st.i + 1, len(steps))
    return rows.x


def sample(engines: Engines, noise: np.ndarray, labels: np.ndarray, sampler: SamplerConfig,
           schedule: Sequence[int], *, observer: Observer | None = None, progress: Progress | None = None,
           cond_only_outside: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
    """Final latents (B, C, H, W) float32 from noise (B, C, H, W) and labels (B,), encoder on `schedule` steps.

    Runs the loop the engines chose at load: the device loop (TensorRT) or the host loop. An `observer` sees
    graph inputs as host arrays, so it always runs the host loop. rng draws the SDE step functions' noise: a
    `core.noise.StepNoise` (per sample, what every command passes) or any numpy Generator (default: one
    seeded with 0).
    """
    if engines.loop == "device" and observer is None:
        return device_sampler(engines).sample(noise, labels, sampler, schedule, cond_only_outside=cond_only_outside,
                                              progress=progress)
    return sample_host(engines, noise, labels, sampler, schedule, observer=observer, progress=progress,
                       cond_only_outside=cond_only_outside, rng=rng)


def sample_host(graphs: Graphs, noise: np.ndarray, labels: np.ndarray, sampler: SamplerConfig,
                schedule: Sequence[int], *, observer: Observer | None = None, progress: Progress | None = None,
                cond_only_outside: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
    """`sample` on the host loop, whatever loop the graphs' engines chose (bench times both)."""
    x, labels = check_inputs(graphs, noise, labels)
    rows = Rows(sampler, labels, x, rng or np.random.default_rng(0))
    return host_loop(graphs, rows, plan_steps(sampler, schedule, cond_only_outside), observer, progress)


def record_states(graphs: Graphs, noise: np.ndarray, labels: np.ndarray, sampler: SamplerConfig, *,
                  observer: Observer | None = None, progress: Progress | None = None) -> np.ndarray:
    """Encoder states (N, 2B, L, D) float32 of the official full-batch trajectory, every step recomputed."""
    x, labels = check_inputs(graphs, noise, labels)
    states: list[np.ndarray] = []
    host_loop(graphs, Rows(sampler, labels, x, np.random.default_rng(0)),
              plan_steps(sampler, range(sampler.num_steps), cond_only_outside=False), observer, progress,
              after=lambda st, rows: states.append(rows.s))
    return np.stack(states)  # N 2B L D
