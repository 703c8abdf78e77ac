"""What every step of a trajectory computes, planned before the first graph call. Torch-free.

`plan_steps(sampler, recompute)` gives one `Step` per sampling step: its time and increment (`core.sampling`,
float64 then float32 at the edge), its CFG scale (the guidance inside the interval, 1.0 outside), whether the
encoder runs, and which CFG halves each graph needs. The host loop, the serving batch and the device loop all
read the same plan (`runtime.sampling.step` says what a step does with it).

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
from ...core.sampling import guidance_scale, step_times
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
    return [Step(i, t[i], dt[i], scale[i], i in steps, enc_uncond[i], need[i], i == n - 1) for i in range(n)]


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
