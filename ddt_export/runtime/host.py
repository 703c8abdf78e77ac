"""The host loop: the official DDT sharing sampler over engine calls, in numpy, with no torch.

Per step i (t from `sampling.step_times`): if i is a recompute step, the encoder makes a new state s from
(x, t, y); the decoder turns (x, s) into velocities every step; CFG combines them; an Euler step updates x
(float32 throughout). CFG runs the batch [uncond; cond] (2B rows, null class = num_classes), as the official.

The exact free speed-up (`cond_only_outside=True`): outside the guidance interval the official combine is
v_u + 1.0 * (v_c - v_u), which is v_c up to float rounding, so the unconditional rows are skipped there. The
encoder still computes both halves at a recompute step whose state serves any guided step (a planning pass,
`plan_steps`, walks the schedule backwards to know), so a guided step never meets a half state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..core.config import SamplerConfig
from ..core.errors import InputError, NumericsError
from ..core.log import Progress
from ..core.sampling import cfg_combine, euler_step, guidance_scale, step_times
from .schedules import validate_steps

Observer = Callable[[str, int, dict], None]  # (graph, step, inputs) before every graph call


@dataclass(frozen=True)
class Step:
    i: int
    t: np.float32  # time fed to the network
    dt: np.float32  # Euler increment to step i + 1
    scale: float  # the official CFG scale here: guidance inside the interval, else 1.0
    recompute: bool  # the encoder runs at this step
    enc_uncond: bool  # ... on both halves (its state serves a step that needs the unconditional half)
    dec_uncond: bool  # the decoder runs both halves


def plan_steps(sampler: SamplerConfig, schedule: Sequence[int], cond_only_outside: bool = True) -> list[Step]:
    """What every step computes. With cond_only_outside=False every call takes the full 2B batch (official)."""
    n = sampler.num_steps
    recompute = set(validate_steps(schedule, n))
    t, dt = step_times(sampler)
    scale = [guidance_scale(t[i], sampler) for i in range(n)]
    need = [not cond_only_outside or scale[i] != 1.0 for i in range(n)]  # step i needs v_uncond
    enc_uncond, pending = [False] * n, False
    for i in reversed(range(n)):  # a state serves the steps from its recompute step to the next one
        pending |= need[i]
        if i in recompute:
            enc_uncond[i], pending = pending, False
    return [Step(i, t[i], dt[i], scale[i], i in recompute, enc_uncond[i], need[i]) for i in range(n)]


def work_rows(steps: Sequence[Step], batch: int) -> dict[str, int]:
    """Graph-call rows (samples through a graph) of a plan, and of the official full-batch loop."""
    enc = sum((2 if s.enc_uncond else 1) * batch for s in steps if s.recompute)
    dec = sum((2 if s.dec_uncond else 1) * batch for s in steps)
    k = sum(s.recompute for s in steps)
    return {"encoder_rows": enc, "decoder_rows": dec, "encoder_calls": k, "decoder_calls": len(steps),
            "encoder_rows_full": 2 * batch * k, "decoder_rows_full": 2 * batch * len(steps)}


def saved_fraction(rows: dict[str, int], encoder_blocks: int, decoder_blocks: int) -> float:
    """Fraction of the full-batch work saved, each row weighted by the blocks its graph runs."""
    full = encoder_blocks * rows["encoder_rows_full"] + decoder_blocks * rows["decoder_rows_full"]
    done = encoder_blocks * rows["encoder_rows"] + decoder_blocks * rows["decoder_rows"]
    return 1.0 - done / full


def check_inputs(engines, noise: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """noise (B, C, H, W) float -> float32 copy; labels (B,) int -> int64 in [0, num_classes)."""
    m = engines.config.model
    noise = np.asarray(noise)
    if noise.ndim != 4 or noise.shape[1:] != m.latent_shape or noise.shape[0] < 1:
        raise InputError("noise", f"(B, {', '.join(map(str, m.latent_shape))}) for {engines.config.name}",
                         noise.shape)
    if noise.dtype.kind != "f":
        raise InputError("noise", "a floating-point array", noise.dtype)
    if not np.isfinite(noise).all():
        raise InputError("noise", "finite values", f"{int((~np.isfinite(noise)).sum())} NaN/Inf")
    labels = np.asarray(labels)
    if labels.shape != (noise.shape[0],) or labels.dtype.kind not in "iu":
        raise InputError("labels", f"({noise.shape[0]},) integers, one per noise sample",
                         f"{labels.dtype} {labels.shape}")
    bad = labels[(labels < 0) | (labels >= m.num_classes)]
    if bad.size:
        raise InputError("class", f"in [0, {m.num_classes})", int(bad[0]))
    return noise.astype(np.float32, copy=True), labels.astype(np.int64)


def _finite(a: np.ndarray, step: int, what: str) -> None:
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise NumericsError(f"step {step}: {what}", "finite values", f"{bad} NaN/Inf of {a.size}")


def call_graph(engines, graph: str, step: int, observer: Observer | None, **inputs: np.ndarray) -> np.ndarray:
    """One graph call per chunk of at most engines.max_batch rows (CFG rows count); outputs concatenated."""
    fn = getattr(engines, graph)
    rows = len(next(iter(inputs.values())))
    top, low = engines.max_batch, getattr(engines, "min_batch", 1)
    outs = []
    for lo in range(0, rows, top):
        chunk = {k: v[lo:lo + top] for k, v in inputs.items()}
        n = len(next(iter(chunk.values())))
        if n < low:  # engines built with a minimum batch: pad with copies of the last row, drop them after
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], low - n, axis=0)]) for k, v in chunk.items()}
        if observer is not None:
            observer(graph, step, chunk)
        outs.append(fn(**chunk)[:n])
    return outs[0] if len(outs) == 1 else np.concatenate(outs)


def _run(engines, x: np.ndarray, labels: np.ndarray, sampler: SamplerConfig, steps: list[Step],
         observer: Observer | None, progress: Progress | None, rng: np.random.Generator | None,
         states: list | None = None) -> np.ndarray:
    b = x.shape[0]
    y_cfg = np.concatenate([np.full(b, engines.config.model.null_class, np.int64), labels])  # 2B [uncond; cond]
    s, s_uncond = None, False
    for st in steps:
        both = st.dec_uncond or (st.recompute and st.enc_uncond)
        x2 = np.concatenate([x, x]) if both else None  # (2B, C, H, W) [uncond; cond] rows, built once per step
        if st.recompute:
            xe, ye = (x2, y_cfg) if st.enc_uncond else (x, labels)  # 2B or B rows
            s = call_graph(engines, "encoder", st.i, observer, x=xe, t=np.full(len(ye), st.t, np.float32), y=ye)
            _finite(s, st.i, "encoder output s")
            s_uncond = st.enc_uncond
            if states is not None:
                states.append(s)
        assert s is not None and (s_uncond or not st.dec_uncond), f"step {st.i}: no usable encoder state"
        if st.dec_uncond:
            v2 = call_graph(engines, "decoder", st.i, observer, x=x2, s=s)  # (2B, C, H, W)
            _finite(v2, st.i, "decoder output v")
            v = cfg_combine(v2[:b], v2[b:], st.scale)
        else:
            v = call_graph(engines, "decoder", st.i, observer, x=x, s=s[b:] if s_uncond else s)  # (B, C, H, W)
            _finite(v, st.i, "decoder output v")
        x = euler_step(sampler, st.i, x, v, st.t, st.dt, rng)
        _finite(x, st.i, "latents x after the Euler step")
        if progress is not None:
            progress(st.i + 1, len(steps))
    return x


def sample(engines, noise: np.ndarray, labels: np.ndarray, sampler: SamplerConfig, schedule: Sequence[int], *,
           observer: Observer | None = None, progress: Progress | None = None, cond_only_outside: bool = True,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Final latents (B, C, H, W) float32 from noise (B, C, H, W) and labels (B,), encoder on `schedule` steps.

    Runs the loop the engines chose at load: their device sampler (TensorRT: x and s stay on the GPU) or this
    module's host loop. An `observer` sees graph inputs as host arrays, so it always runs the host loop.
    rng draws the SDE step functions' noise: a `core.noise.StepNoise` (per sample, what every command passes) or
    any numpy Generator (default: one seeded with 0).
    """
    device = getattr(engines, "device_sampler", None)
    if device is not None and observer is None:
        return device.sample(noise, labels, sampler, schedule, cond_only_outside=cond_only_outside,
                             progress=progress)
    x, labels = check_inputs(engines, noise, labels)
    steps = plan_steps(sampler, schedule, cond_only_outside)
    return _run(engines, x, labels, sampler, steps, observer, progress, rng or np.random.default_rng(0))


def record_states(engines, noise: np.ndarray, labels: np.ndarray, sampler: SamplerConfig, *,
                  observer: Observer | None = None, progress: Progress | None = None) -> np.ndarray:
    """Encoder states (N, 2B, L, D) float32 of the official full-batch trajectory, every step recomputed."""
    x, labels = check_inputs(engines, noise, labels)
    steps = plan_steps(sampler, range(sampler.num_steps), cond_only_outside=False)
    states: list[np.ndarray] = []
    _run(engines, x, labels, sampler, steps, observer, progress, np.random.default_rng(0), states)
    return np.stack(states)  # N 2B L D
