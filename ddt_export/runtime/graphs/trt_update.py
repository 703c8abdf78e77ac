"""The device loop's update rule as plain decisions over plain values: no tensorrt, no cuda-python.

Beside `trt_plan` (the device loop's graph calls, `loop_calls`), this says what the loop computes between those
calls, so that all of it is tested on CPU (tests/test_trt_history.py, tests/test_trt_kernel.py) and only the
launches themselves need a GPU:

- the history rings of the fast-sampling plans (`History`, sized by `history_regions`): the last `order` guided
  velocities of a multistep solver and the last `forecast + 1` recomputed encoder states of each CFG half, one
  slot each, kept as `step.Rows` keeps them (`history_slots`: which slot each step writes and reads);
- which kernel of `trt_loop.KERNEL_SOURCE` a step runs and with which arguments (`Launch`): the update of x
  (`update_launch`: `cfg_euler` for Euler, today's kernel; `cfg_adams` for `adams:K`), and the decoder's s
  where the state is forecast (`state_ops`: a device-to-device copy for a plain reuse, `forecast` otherwise);
- whether the decoder reads the encoder's last output as it is (`reuses_state`, the test of
  `step.decoder_feeds`): then nothing is copied, as before the fast-sampling plans.

Euler with forecast 0 allocates no ring and runs exactly what it ran before: `cfg_euler`, and s bound in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

MAX_OLDER = 3  # cfg_adams reads up to 3 older velocities (adams:4), forecast up to 3 states (forecast 2)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the entry point of `trt_loop.KERNEL_SOURCE`, its arguments in parameter order (numpy
    scalars: their dtypes are the parameters' C types) and the number of elements (one thread each)."""

    kernel: str
    args: tuple
    n: int


@dataclass(frozen=True)
class History:
    """The rings of one device-loop call: slot addresses in ring order, each slot 256-byte aligned, all in one
    allocation per engine set. `v`: `order` slots of b latent rows (a multistep solver; () for Euler);
    `cond`, `uncond`: `forecast + 1` slots of b x L x D each (() for forecast 0)."""

    v: tuple[int, ...] = ()
    cond: tuple[int, ...] = ()
    uncond: tuple[int, ...] = ()

    @property
    def order(self) -> int:
        return max(len(self.v), 1)

    @property
    def forecast(self) -> int:
        return max(len(self.cond) - 1, 0)


def history_regions(samples: int, row: int, state: int, order: int, forecast: int) -> dict[str, int]:
    """The rings' slots as `trt_plan.pack` regions ({name: bytes}) for `samples` samples of `row` latent bytes
    and `state` encoder-state bytes (L x D x 4) each: v0.. (`order` of them when order > 1), c0.. and u0..
    (`forecast + 1` per CFG half when forecast > 0). Empty for Euler with forecast 0: nothing is allocated."""
    out = {}
    if order > 1:
        out.update({f"v{j}": samples * row for j in range(order)})
    if forecast > 0:
        for half in "cu":
            out.update({f"{half}{j}": samples * state for j in range(forecast + 1)})
    return out


def history_of(base: int, offsets: dict[str, int], order: int, forecast: int) -> History:
    """The rings of a call with this order and forecast inside an allocation at `base` laid out by `pack` for
    at least those (one made for a higher order or forecast serves: its first slots are used)."""

    def ring(prefix: str, n: int) -> tuple[int, ...]:
        return tuple(base + offsets[f"{prefix}{j}"] for j in range(n))

    return History(ring("v", order) if order > 1 else (), ring("c", forecast + 1) if forecast else (),
                   ring("u", forecast + 1) if forecast else ())


@dataclass(frozen=True)
class StepSlots:
    """The ring slots (indices) one step writes and reads, oldest first."""

    v_put: int = -1  # where the step's guided velocity goes (-1: no velocity ring, Euler)
    v_read: tuple[int, ...] = ()  # the velocities of `Step.coeffs` (the last one is v_put)
    cond_put: int = -1  # a recompute step: where the encoder's conditional half is copied (-1: none)
    uncond_put: int = -1  # ... and its unconditional half (a recompute on both halves)
    cond_read: tuple[int, ...] = ()  # the states of `Step.s_cond`
    uncond_read: tuple[int, ...] = ()  # the states of `Step.s_uncond`


def _last(count: int, size: int, k: int) -> tuple[int, ...]:
    """The slots of the last k of `count` entries written round a ring of `size` (entry j in slot j % size)."""
    assert 0 <= k <= min(count, size), f"{k} entries asked of a ring of {size} holding {count}"
    return tuple((count - k + j) % size for j in range(k))


def history_slots(steps: Sequence, order: int, forecast: int) -> list[StepSlots]:
    """`step.Rows`' bookkeeping, step by step (`Step`: recompute, enc_uncond, coeffs, s_cond, s_uncond): a
    multistep solver (order > 1) appends the guided velocity at every step and keeps `order`; forecasting
    (forecast > 0) appends the conditional state at every recompute step and the unconditional one where the
    encoder ran both halves, and keeps `forecast + 1` of each. Entry j of a ring lives in slot j % its size."""
    nv = nc = nu = 0
    keep, out = forecast + 1, []
    for st in steps:
        cond_put = uncond_put = v_put = -1
        if forecast and st.recompute:
            cond_put, nc = nc % keep, nc + 1
            if st.enc_uncond:
                uncond_put, nu = nu % keep, nu + 1
        v_read: tuple[int, ...] = ()
        if order > 1:
            v_put, nv = nv % order, nv + 1
            v_read = _last(nv, order, len(st.coeffs))
        reads = (_last(nc, keep, len(st.s_cond)), _last(nu, keep, len(st.s_uncond))) if forecast else ((), ())
        out.append(StepSlots(v_put, v_read, cond_put, uncond_put, *reads))
    return out


def plain(weights: Sequence) -> bool:
    """One weight 1.0: `core.sampling.combine` returns the value itself (a reuse; Euler's one velocity)."""
    return len(weights) == 1 and weights[0] == 1.0


def reuses_state(st, last_both: bool) -> bool:
    """`step.decoder_feeds`' test: the decoder's s is the encoder's last output as it is (bound in place, no
    copy) when every weight is a plain reuse and, for a guided step, that output holds both halves
    (`last_both`). Otherwise s is assembled from the rings (`state_ops`)."""
    reuse = plain(st.s_cond) and (not st.dec_uncond or plain(st.s_uncond))
    return reuse and (last_both or not st.dec_uncond)


def state_ops(weights: Sequence, srcs: Sequence[int], dst: int, nbytes: int) -> tuple[tuple, tuple]:
    """One CFG half of the decoder's s (`nbytes` at `dst`) from its ring slots `srcs` (oldest first, one per
    weight): (copies, launches). A plain reuse is a device-to-device copy of the last state (combine returns it
    bit for bit: no 0 + v, which would turn -0.0 into +0.0); else the `forecast` kernel, sum_j w_j s_j from
    zero, oldest first."""
    assert len(weights) == len(srcs) >= 1, (len(weights), len(srcs))
    if plain(weights):
        return ((dst, srcs[-1], nbytes),), ()
    k, n = len(weights), nbytes // 4
    assert 2 <= k <= MAX_OLDER and n < 2 ** 31, (k, n)
    ptrs = [np.uint64(p) for p in list(srcs) + [srcs[0]] * (MAX_OLDER - k)]  # the padding is never read
    w = [np.float32(c) for c in weights] + [np.float32(0.0)] * (MAX_OLDER - k)
    return (), (Launch("forecast", (np.uint64(dst), *ptrs, np.int32(n), np.int32(k), *w), n),)


def update_launch(st, x: int, v: int, n: int, put: int = 0, read: Sequence[int] = ()) -> Launch:
    """The update of step `st` (a `plan.Step`) over the n floats of x (device pointer) from the decoder's
    velocities v ([v_u; v_c] when the step is guided: the CFG combine first). The one place that decides the
    device loop's arithmetic; its numpy twin is `step.update`:
    - Euler (no velocity ring: `put` 0): `cfg_euler`, x + v dt (the ODE step function);
    - `adams:K`: `cfg_adams` keeps the guided velocity in slot `put` and adds (sum_j c_j v_j) dt over the slots
      `read` (oldest first; the last is `put`, whose velocity it has in hand), the sum from zero; one weight
      (the first step) is x + v dt, as combine returns that velocity itself."""
    scale, dt, cfg = np.float32(st.scale), np.float32(st.dt), np.int32(int(st.dec_uncond))
    assert n < 2 ** 31, n
    if not put:
        assert plain(st.coeffs), f"step {st.i}: weights {st.coeffs} without a velocity ring"
        return Launch("cfg_euler", (np.uint64(x), np.uint64(v), np.int32(n), scale, dt, cfg), n)
    c = [np.float32(w) for w in st.coeffs]
    k = len(c)
    assert 1 <= k <= MAX_OLDER + 1 and len(read) == k and read[-1] == put, (k, read, put)
    older = [np.uint64(p) for p in list(read[:-1]) + [put] * (MAX_OLDER + 1 - k)]  # the padding is never read
    weights = c[:-1] + [np.float32(0.0)] * (MAX_OLDER + 1 - k)
    return Launch("cfg_adams", (np.uint64(x), np.uint64(v), np.uint64(put), *older, np.int32(n), scale, dt, cfg,
                                np.int32(k), *weights, c[-1]), n)
