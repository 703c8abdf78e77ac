"""The one sampling step: what a step does to the rows that take it, written once. Torch-free.

The host loop (one `Rows`, every step), the serving model step (many requests' `Rows`, each at its own step,
in one batch) and the calibration and validate captures all call `run_step`; the device loop runs the same
plan (`runtime.sampling.plan`) with the same update rule in its kernel (`trt_loop`).

One step of a list of (rows, plan step) items:
1. one encoder call over the items at a recompute step, each row with its own item's t, both CFG halves
   `[uncond; cond]` where the plan says a guided step will reuse the state (`Step.enc_uncond`);
2. one decoder call over every item: both halves inside the guidance interval, the conditional half outside;
3. per item, in float32: the CFG combine `v_u + scale (v_c - v_u)` (official `simple_guidance_fn`), then the
   update rule: Euler, the sampler's step function (the last step is the official `last_step_fn`, ode) with its
   own SDE noise; or `adams:K`, x + dt sum_j c_j v_j over the last K guided velocities (the official
   AdamLMSampler; its weights are the plan's, `Step.coeffs`).
The encoder state the decoder gets at a step that does not recompute is the last one (forecast 0, the official
reuse) or the forecast from the last 2 or 3 recomputed states, each CFG half from its own states (`Step.s_cond`,
`Step.s_uncond`: weights over them). A request carries what those need, bounded: `forecast + 1` states per half
and `K` velocities (`Rows`).
The graphs compute every row on its own, so an item's result does not depend on what shares its calls. A
non-finite tensor fails its item only; an engine error propagates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ...core.config import SamplerConfig
from ...core.errors import InputError, NumericsError
from ...core.noise import StepNoise, sample_noise
from ...core.sampling import F32, cfg_combine, combine, euler_step
from ..graphs.engines import Graphs, Observer, call_graph
from .plan import Step


@dataclass
class Rows:
    """The sampler state of B samples that step together (one request, one chunk, one host-loop batch)."""

    sampler: SamplerConfig
    labels: np.ndarray  # (B,) int64
    x: np.ndarray  # (B, C, H, W) float32, the latents: kept in float32 across steps
    noise: StepNoise | np.random.Generator  # SDE step noise (`core.noise`: per sample)
    s: np.ndarray | None = None  # ((2B | B), L, D) float32: the last encoder output
    s_uncond: bool = False  # s holds both halves [uncond; cond]
    cond: list[np.ndarray] = field(default_factory=list)  # the last recomputed conditional states (B, L, D) ...
    uncond: list[np.ndarray] = field(default_factory=list)  # ... and unconditional ones, oldest first (views of s)
    v: list[np.ndarray] = field(default_factory=list)  # the last guided velocities (B, C, H, W), oldest first

    @property
    def num(self) -> int:
        return len(self.labels)

    def take_state(self, s: np.ndarray, both: bool) -> None:
        """A new encoder output: ((2B | B), L, D), [uncond; cond] when `both`. Keeps forecast + 1 per half."""
        keep = self.sampler.forecast + 1
        self.s, self.s_uncond = s, both
        if both:
            self.uncond = (self.uncond + [s[:self.num]])[-keep:]
        self.cond = (self.cond + [s[self.num:] if both else s])[-keep:]


def check_inputs(graphs: Graphs, noise: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """noise (B, C, H, W) float -> float32 copy; labels (B,) int -> int64 in [0, num_classes)."""
    m = graphs.config.model
    noise = np.asarray(noise)
    if noise.ndim != 4 or noise.shape[1:] != m.latent_shape or noise.shape[0] < 1:
        raise InputError("noise", f"(B, {', '.join(map(str, m.latent_shape))}) for {graphs.config.name}",
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


def start_rows(sampler: SamplerConfig, labels: np.ndarray, seed: int, indices: Sequence[int],
               latent_shape: Sequence[int]) -> Rows:
    """Rows at step 0 for samples `indices` of seed `seed`: the one noise function's latents and step noise."""
    return Rows(sampler, np.asarray(labels, np.int64), sample_noise(seed, indices, latent_shape),
                StepNoise(seed, indices))


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _split(a: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Rows of one graph call back to their items (copies where shared: an item keeps its s for later steps)."""
    if len(sizes) == 1:
        return [a]
    return [p.copy() for p in np.split(a, np.cumsum(sizes)[:-1])]


def _bad(a: np.ndarray, step: int, what: str) -> NumericsError | None:
    if np.isfinite(a).all():
        return None
    return NumericsError(f"step {step}: {what}", "finite values", f"{int((~np.isfinite(a)).sum())} NaN/Inf of {a.size}")


def encoder_feeds(rows: Rows, st: Step, null_class: int) -> dict[str, np.ndarray]:
    """x, t, y of the encoder at a recompute step: 2B rows [uncond; cond] when `st.enc_uncond`, else B."""
    x, y = rows.x, rows.labels
    if st.enc_uncond:
        x, y = np.concatenate([x, x]), np.concatenate([np.full(len(y), null_class, np.int64), y])
    return {"x": x, "t": np.full(len(y), st.t, np.float32), "y": y}


def decoder_feeds(rows: Rows, st: Step) -> dict[str, np.ndarray]:
    """x, s of the decoder: 2B rows [uncond; cond] inside the guidance interval, else B; s is the last state of
    each half (reuse) or its forecast."""
    assert len(rows.cond) >= len(st.s_cond) and len(rows.uncond) >= len(st.s_uncond), \
        f"step {st.i}: no usable encoder state"
    reuse = len(st.s_cond) == 1 and st.s_cond[0] == 1.0 and (not st.dec_uncond or st.s_uncond == (1.0,))
    if reuse and (rows.s_uncond or not st.dec_uncond):  # the last encoder output as it is (no copy)
        s = rows.s if st.dec_uncond else rows.cond[-1]
    else:
        s = combine(st.s_cond, rows.cond[-len(st.s_cond):])  # (B, L, D) float32
        if st.dec_uncond:
            s = np.concatenate([combine(st.s_uncond, rows.uncond[-len(st.s_uncond):]), s])  # (2B, L, D)
    x = np.concatenate([rows.x, rows.x]) if st.dec_uncond else rows.x
    return {"x": x, "s": s}


def update(rows: Rows, st: Step, v: np.ndarray) -> np.ndarray:
    """x after step `st` from the decoder's velocities v ((2B | B), C, H, W): CFG combine, then the update rule
    (keeps the guided velocity for a multistep solver)."""
    if st.dec_uncond:
        v = cfg_combine(v[:rows.num], v[rows.num:], st.scale)
    if rows.sampler.order == 1:  # Euler: the sampler's step function (SDE noise included)
        return euler_step(rows.sampler, st.i, rows.x, v, st.t, st.dt, rows.noise)
    rows.v = (rows.v + [v])[-rows.sampler.order:]
    return rows.x + combine(st.coeffs, rows.v[-len(st.coeffs):]) * F32(st.dt)


def run_step(graphs: Graphs, items: Sequence[tuple[Rows, Step]], observer: Observer | None = None
             ) -> dict[int, NumericsError]:
    """One step of every item, in place on its Rows; returns {item index: error} for the items whose tensors
    went non-finite (the others have stepped). `observer` sees every graph call's inputs (one item's loop)."""
    failed: dict[int, NumericsError] = {}
    step = items[0][1].i if items else -1
    enc = [(k, rows, st) for k, (rows, st) in enumerate(items) if st.recompute]
    if enc:
        feeds = [encoder_feeds(rows, st, graphs.config.model.null_class) for _, rows, st in enc]
        s_all = call_graph(graphs, "encoder", {n: _cat([f[n] for f in feeds]) for n in ("x", "t", "y")}, step,
                           observer)  # (sum of rows, L, D)
        for (k, rows, st), s in zip(enc, _split(s_all, [len(f["y"]) for f in feeds])):
            failed[k] = _bad(s, st.i, "encoder output s")
            if failed[k] is None:
                rows.take_state(s, st.enc_uncond)
    dec = [(k, rows, st) for k, (rows, st) in enumerate(items) if failed.get(k) is None]
    if dec:
        feeds = [decoder_feeds(rows, st) for _, rows, st in dec]
        v_all = call_graph(graphs, "decoder", {n: _cat([f[n] for f in feeds]) for n in ("x", "s")}, step, observer)
        for (k, rows, st), v in zip(dec, _split(v_all, [len(f["x"]) for f in feeds])):
            failed[k] = _bad(v, st.i, "decoder output v")
            if failed[k] is None:
                x = update(rows, st, v)
                failed[k] = _bad(x, st.i, "latents x after the step")
                if failed[k] is None:
                    rows.x = x
    return {k: e for k, e in failed.items() if e is not None}


def switch_point(ran: Sequence[Step], old: SamplerConfig, target: Sequence[Step], new: SamplerConfig) -> int:
    """The last step boundary at which samples that took `ran` (under `old`) can go on with `target` (under `new`)
    and end exactly as `target` run from the start would: the number of leading steps the two plans share.

    Sound at boundary k exactly when the first k steps of both plans are equal (times, increments, CFG scales,
    recompute steps and halves, solver and forecast weights), the step function is the same (its noise draws
    then match), and the state carried holds what `target` reads next: at most `old.forecast + 1` encoder states
    per half and `old.order` velocities are kept (`Rows`), so `new` may need no more. Boundary 0 (nothing run
    yet) is always sound. Two plans with another step count or timeshift differ from step 0 (its increment),
    so for them only 0 is."""
    if new.step_fn != old.step_fn or new.forecast > old.forecast or (new.order > 1 and new.order > old.order):
        return 0
    k = 0
    for a, b in zip(ran, target[:-1]):  # the target's last step is never skipped: it makes the image
        if a != b:
            break
        k += 1
    return k
