"""What every step of a trajectory computes, planned before the first graph call. Torch-free.

`plan_steps(sampler, recompute)` gives one `Step` per sampling step: its time and increment (`core.sampling`,
float64 then float32 at the edge), its CFG scale (the guidance inside the interval, 1.0 outside), whether the
encoder runs, which CFG halves each graph needs, the solver's weights over the last guided velocities (Euler:
[1.0]; `adams:K`: the official AdamLMSampler's) and the forecast's weights over the last encoder states of each
half (reuse: [1.0] on the last one; forecast m: the polynomial through the last m + 1 recomputed states,
evaluated at this step's t). Every weight depends on the timesteps and the schedule only, so all are computed
here, once, in float64. The host loop, the serving batch and the device loop all read the same plan
(`runtime.sampling.step` says what a step does with it).

The exact free speed-up (`cond_only_outside=True`): outside the guidance interval the official combine is
v_u + 1.0 * (v_c - v_u), which is v_c up to float rounding, so the unconditional rows are skipped there. The
encoder still computes both halves at a recompute step whose state serves any guided step (the plan walks the
schedule backwards to know), so a guided step never meets a half state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ...core.config import SamplerConfig
from ...core.sampling import extrapolation_weights, guidance_scale, multistep_coefficients, step_times
from .grammar import validate_steps


@dataclass(frozen=True)
class Step:
    i: int
    t: np.float32  # time fed to the network
    dt: np.float32  # increment to step i + 1
    scale: float  # the official CFG scale here: guidance inside the interval, else 1.0
    recompute: bool  # the encoder runs at this step
    enc_uncond: bool  # ... on both halves (its state serves a step that needs the unconditional half)
    dec_uncond: bool  # the decoder runs both halves
    last: bool = False  # the trajectory's last step (the official last_step_fn: ode)
    coeffs: tuple[np.float32, ...] = (np.float32(1.0),)  # solver weights over the last len() velocities, oldest first
    s_cond: tuple[np.float32, ...] = (np.float32(1.0),)  # forecast weights over the last len() conditional states
    s_uncond: tuple[np.float32, ...] = ()  # ... over the last len() unconditional states (when dec_uncond)


def plan_steps(sampler: SamplerConfig, recompute: Sequence[int], cond_only_outside: bool = True) -> list[Step]:
    """What every step computes. With cond_only_outside=False every call takes the full 2B batch (official)."""
    n = sampler.num_steps
    steps = set(validate_steps(recompute, n))
    t, dt = step_times(sampler)
    scale = [guidance_scale(t[i], sampler) for i in range(n)]
    need = [not cond_only_outside or scale[i] != 1.0 for i in range(n)]  # step i needs v_uncond
    enc_uncond, pending = [False] * n, False
    for i in reversed(range(n)):  # a state serves the steps from its recompute step to the next one
        pending |= need[i]
        if i in steps:
            enc_uncond[i], pending = pending, False
    coeffs = multistep_coefficients(sampler)
    t64 = t.astype(np.float64)
    cond, uncond, plan = [], [], []  # the times of the recompute steps that computed each half, so far
    for i in range(n):
        if i in steps:
            cond.append(t64[i])
            if enc_uncond[i]:
                uncond.append(t64[i])
        w_cond = _forecast(cond, t64[i], sampler.forecast)
        w_uncond = _forecast(uncond, t64[i], sampler.forecast) if need[i] else ()
        plan.append(Step(i, t[i], dt[i], scale[i], i in steps, enc_uncond[i], need[i], i == n - 1,
                         tuple(coeffs[i]), w_cond, w_uncond))
    return plan


def _forecast(times: list[float], t: float, order: int) -> tuple[np.float32, ...]:
    """The weights of the state used at time t over the last states computed at `times`: [1.0] (the last state)
    at its own step or with order 0, else the polynomial through the last order + 1 of them, evaluated at t."""
    assert times, "step 0 recomputes every half a later step needs (plan invariant)"
    if order == 0 or times[-1] == t:
        return (np.float32(1.0),)
    return tuple(extrapolation_weights(times[-(order + 1):], t))


def step_rows(st: Step, num: int) -> tuple[int, int]:
    """(encoder rows, decoder rows) of `num` samples at step `st`."""
    enc = (2 if st.enc_uncond else 1) * num if st.recompute else 0
    return enc, (2 if st.dec_uncond else 1) * num


def peak_rows(steps: Sequence[Step], num: int) -> int:
    """The most rows `num` samples put into one graph call over the whole plan."""
    return max(max(step_rows(st, num)) for st in steps)


def work_rows(steps: Sequence[Step], batch: int) -> dict[str, int]:
    """Graph-call rows (samples through a graph) of a plan, and of the official full-batch loop."""
    enc = sum(step_rows(s, batch)[0] for s in steps)
    dec = sum(step_rows(s, batch)[1] for s in steps)
    k = sum(s.recompute for s in steps)
    return {"encoder_rows": enc, "decoder_rows": dec, "encoder_calls": k, "decoder_calls": len(steps),
            "encoder_rows_full": 2 * batch * k, "decoder_rows_full": 2 * batch * len(steps)}


def saved_fraction(rows: dict[str, int], encoder_blocks: int, decoder_blocks: int) -> float:
    """Fraction of the full-batch work saved, each row weighted by the blocks its graph runs."""
    full = encoder_blocks * rows["encoder_rows_full"] + decoder_blocks * rows["decoder_rows_full"]
    done = encoder_blocks * rows["encoder_rows"] + decoder_blocks * rows["decoder_rows"]
    return 1.0 - done / full


def network_flops(steps: Sequence[Step], encoder_flops: float, decoder_flops: float) -> float:
    """Network FLOPs per image of a plan: each graph's rows per image (CFG rows, cond-only rows, the encoder on
    its recompute steps) times its FLOPs per row (`core.flops.step_flops`, at the model's size)."""
    rows = work_rows(steps, 1)
    return rows["encoder_rows"] * encoder_flops + rows["decoder_rows"] * decoder_flops
