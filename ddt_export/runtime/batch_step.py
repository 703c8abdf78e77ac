"""The model step of step-level batching (`runtime.batching`): one iteration's graph calls over a `Batch`, and
the batched VAE call of the requests that retire. Torch-free.

A request's numerics are those of `runtime.host` for the same settings, row for row: its initial latents and
SDE step noise come from the one noise function (`core.noise`: image i of seed S from (S, i) alone), its plan
from `plan_steps`, its CFG combine and Euler step from `core.sampling`. What changes is only which other rows
share its graph calls, and the graphs compute every row on its own, so its images equal `ddt-export generate`'s
for the same class, num, seed, steps, cfg and schedule (tests/test_serve_equal.py compares the PNGs).

Per iteration:
1. one encoder call over the rows of the requests at a recompute step, each row with its own request's t,
   both CFG halves [uncond; cond] where the request's plan needs the unconditional half later (Step.enc_uncond);
2. one decoder call over every request's rows: 2 x num inside the guidance interval, num outside;
3. per request: CFG combine and Euler step, in float32, its own step noise.
A non-finite tensor fails its request only (NumericsError naming the step and the tensor); the others go on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..core.errors import ConfigError, InputError, NumericsError
from ..core.images import images_from_samples
from ..core.log import Say, silent
from ..core.noise import StepNoise, sample_noise
from ..core.sampling import cfg_combine, euler_step
from .batching import Batch, Job, RequestSpec
from .generate import sampler_for
from .host import call_graph
from .schedules import resolve_schedule


@dataclass
class JobState:
    """A running request's arrays: labels (num,) int64, x (num, C, H, W) float32, its last encoder state s
    ((2 num | num), L, D) float32 with `s_uncond` saying whether it has the [uncond; cond] halves."""

    labels: np.ndarray
    x: np.ndarray
    noise: StepNoise
    s: np.ndarray | None = None
    s_uncond: bool = False


def resolve_request(engines, label: int, num: int, seed: int = 0, steps: int | None = None,
                    cfg: float | None = None, schedule: str | None = None,
                    interval: tuple[float, float] | None = None, timeshift: float | None = None,
                    say: Say = silent) -> RequestSpec:
    """The manifest's sampler with the request's overrides, and its recompute steps (dp:K: the stored
    schedule, or the template trajectory run now and stored, as `generate` does)."""
    if not 0 <= label < engines.config.model.num_classes:
        raise InputError("class", f"a class id in [0, {engines.config.model.num_classes})", label)
    if num < 1:
        raise InputError("num", ">= 1", num)
    sampler = sampler_for(engines, steps, cfg)
    changes = {k: v for k, v in (("guidance_interval", tuple(interval) if interval is not None else None),
                                 ("timeshift", timeshift)) if v is not None}
    try:
        sampler = dataclasses.replace(sampler, **changes)
    except ConfigError as e:  # named by the request's field, not the config's
        raise InputError(e.thing.replace("sampler.guidance_interval", "interval").replace("sampler.", ""),
                         e.expected, e.actual)
    try:
        recompute, spec = resolve_schedule(schedule, engines, sampler, say)
    except InputError as e:  # "--schedule dp:K: ..." is the request's "schedule" field
        raise InputError(e.thing.replace("--schedule", "schedule"), e.expected, e.actual, e.hint)
    return RequestSpec(int(label), int(num), int(seed), sampler, tuple(recompute), spec)


def start(engines, job: Job) -> None:
    """A newly admitted request's arrays: generate's initial latents and step noise for (seed, 0..num-1)."""
    spec = job.spec
    idx = range(spec.num)
    job.state = JobState(np.full(spec.num, spec.label, np.int64),
                         sample_noise(spec.seed, idx, engines.config.model.latent_shape), StepNoise(spec.seed, idx))


def _bad(a: np.ndarray, step: int, what: str) -> NumericsError | None:
    if np.isfinite(a).all():
        return None
    return NumericsError(f"step {step}: {what}", "finite values", f"{int((~np.isfinite(a)).sum())} NaN/Inf of {a.size}")


def _split(a: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Rows of one graph call back to their requests (copies: a request keeps its s for later steps)."""
    return [p.copy() for p in np.split(a, np.cumsum(sizes)[:-1])]


def run_iteration(engines, batch: Batch) -> dict[int, NumericsError]:
    """One step of every request in `batch`, in place on their states; returns the requests whose tensors went
    non-finite (by job id). An engine error propagates: the caller fails the whole iteration."""
    null = engines.config.model.null_class
    failed: dict[int, NumericsError] = {}
    pairs = list(zip(batch.jobs, batch.steps))

    enc = [(j, st) for j, st in pairs if st.recompute]
    if enc:
        xs, ts, ys = [], [], []
        for j, st in enc:
            x, y = j.state.x, j.state.labels
            if st.enc_uncond:  # (2 num) rows [uncond; cond], as the host loop's y_cfg
                x, y = np.concatenate([x, x]), np.concatenate([np.full(len(y), null, np.int64), y])
            xs.append(x)
            ys.append(y)
            ts.append(np.full(len(y), st.t, np.float32))  # this request's own t, per row
        s_all = call_graph(engines, "encoder", enc[0][1].i, None, x=np.concatenate(xs), t=np.concatenate(ts),
                           y=np.concatenate(ys))  # (sum rows, L, D)
        for (j, st), s in zip(enc, _split(s_all, [len(y) for y in ys])):
            err = _bad(s, st.i, "encoder output s")
            if err is not None:
                failed[j.id] = err
                continue
            j.state.s, j.state.s_uncond = s, st.enc_uncond

    dec = [(j, st) for j, st in pairs if j.id not in failed]
    if not dec:
        return failed
    xs, ss = [], []
    for j, st in dec:
        x, s, b = j.state.x, j.state.s, j.spec.num
        assert s is not None and (j.state.s_uncond or not st.dec_uncond), f"step {st.i}: no usable encoder state"
        if st.dec_uncond:
            xs.append(np.concatenate([x, x]))  # (2 num, C, H, W)
            ss.append(s)
        else:
            xs.append(x)
            ss.append(s[b:] if j.state.s_uncond else s)  # the conditional half
    v_all = call_graph(engines, "decoder", dec[0][1].i, None, x=np.concatenate(xs), s=np.concatenate(ss))
    for (j, st), v in zip(dec, np.split(v_all, np.cumsum([len(x) for x in xs])[:-1])):
        b = j.spec.num
        err = _bad(v, st.i, "decoder output v")
        if err is None:
            if st.dec_uncond:
                v = cfg_combine(v[:b], v[b:], st.scale)
            x = euler_step(j.spec.sampler, st.i, j.state.x, v, st.t, st.dt, j.state.noise)
            err = _bad(x, st.i, "latents x after the Euler step")
        if err is not None:
            failed[j.id] = err
            continue
        j.state.x = x
    return failed


def finish(engines, jobs: Sequence[Job]) -> tuple[dict[int, np.ndarray], dict[int, NumericsError]]:
    """One batched VAE call over the final latents of `jobs` (the latents themselves where the folder has no
    VAE graph, as `generate`): ({job id: images (num, H, W, C) uint8}, {job id: error})."""
    if not jobs:
        return {}, {}
    latents = np.concatenate([j.state.x for j in jobs])  # (sum num, C, H, W)
    pixels = (latents if engines.vae_decoder is None else
              call_graph(engines, "vae_decoder", jobs[0].total_steps, None, latent=latents))
    images, failed = {}, {}
    for j, p in zip(jobs, np.split(pixels, np.cumsum([j.spec.num for j in jobs])[:-1])):
        err = _bad(p, j.total_steps, "vae_decoder output image")
        if err is not None:
            failed[j.id] = err
        else:
            images[j.id] = images_from_samples(p)
    return images, failed
