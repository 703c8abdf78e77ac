"""The device loop on every sampling plan (solvers, forecasts, schedules, cond-only rows), on CPU:
- the plain decisions (runtime.graphs.trt_update, trt_plan.loop_calls / loop_updates) against the host loop's own
  bookkeeping: `step.Rows.take_state` and `step.update` run on tagged arrays say which velocities and states the
  host combines at each step; the ring slots the device plan reads must hold the same ones, for every step count,
  `all`, `uniform:R`, an irregular (dp-like) schedule, cond-only rows, solvers 1-4 and forecast 0-2;
- the whole device loop (`DeviceSampler`) over a STAND-IN for TensorRT and the device (tests/trt_standin.py:
  emulated memory, the kernels replaced by their numpy restatements) against the host loop on the same stand-in
  engines: equal bits. That checks the loop's slots, offsets, copies and launches, not TensorRT or CUDA, which
  this machine does not have (docs/gpu.md lists what a GPU still has to confirm).
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

from ddt_export.core.config import SamplerConfig, load_config
from ddt_export.runtime.graphs.trt_plan import LoopLayout, graph_key, loop_calls, loop_updates, s_half
from ddt_export.runtime.graphs.trt_update import History, history_regions, history_slots, reuses_state
from ddt_export.runtime.sampling import trt_loop
from ddt_export.runtime.sampling.grammar import uniform_steps
from ddt_export.runtime.sampling.host import sample
from ddt_export.runtime.sampling.plan import plan_steps
from ddt_export.runtime.sampling.step import Rows, decoder_feeds, update
from trt_standin import EmulatedGPU, standin_engines, standin_tensorrt_singleton

SOLVERS = ("euler", "adams:2", "adams:3", "adams:4")
FORECASTS = (0, 1, 2)


def irregular(n: int) -> list[int]:
    """A dp-like schedule: dense recomputes early, sparse late."""
    return sorted({0} | {i for i in (1, 2, 4, 7, 11, 16, 22) if i < n})


def schedules(n: int) -> dict[str, list[int]]:
    return {"all": list(range(n)), "uniform:2": uniform_steps(n, 2), "uniform:3": uniform_steps(n, 3),
            "irregular": irregular(n), "first only": [0]}


def samplers(n: int):
    """Every solver and forecast, with cond-only rows outside the guidance interval and without (and a shift)."""
    for solver in SOLVERS:
        for forecast in FORECASTS:
            for interval, shift in (((0.3, 1.0), 1.0), ((0.0, 0.7), 3.0)):
                yield SamplerConfig(num_steps=n, guidance=3.0, guidance_interval=interval, timeshift=shift,
                                    solver=solver, forecast=forecast)


# ------------------------------------------------------------------------------------------ plain decisions


def _host_reads(sampler: SamplerConfig, steps) -> list[dict]:
    """What the host loop combines at each step, as tags: Rows' own take_state / decoder_feeds / update on arrays
    whose value names them (cond state of step i: i + 1, uncond: 1000 + i, guided velocity: 2000 + i)."""
    f = np.float32
    rows = Rows(sampler, np.zeros(1, np.int64), np.zeros((1, 1, 1, 1), f), np.random.default_rng(0))
    out = []
    for st in steps:
        if st.recompute:
            tags = [1000 + st.i, st.i + 1] if st.enc_uncond else [st.i + 1]
            rows.take_state(np.array(tags, f).reshape(-1, 1, 1), st.enc_uncond)
        s = decoder_feeds(rows, st)["s"]
        rec = {"reuse": s is rows.s or s is rows.cond[-1], "last_both": rows.s_uncond,
               "cond": [a.item() for a in rows.cond[-len(st.s_cond):]],
               "uncond": [a.item() for a in rows.uncond[-len(st.s_uncond):]] if st.s_uncond else []}
        v = np.full((2 if st.dec_uncond else 1, 1, 1, 1), 2000 + st.i, f)  # v_c = v_u: the guided v keeps the tag
        update(rows, st, v)
        rec["v"] = [a.item() for a in rows.v[-len(st.coeffs):]] if sampler.order > 1 else []
        out.append(rec)
    return out


def _device_reads(sampler: SamplerConfig, steps) -> list[dict]:
    """The same, from the device plan: rings of tags written and read at the slots `history_slots` gives."""
    order, keep = sampler.order, sampler.forecast + 1
    ring_v, ring_c, ring_u = [None] * order, [None] * keep, [None] * keep
    out, last_both = [], False
    for st, sl in zip(steps, history_slots(steps, order, sampler.forecast)):
        if st.recompute:
            last_both = st.enc_uncond
        if sl.cond_put >= 0:
            ring_c[sl.cond_put] = float(st.i + 1)
        if sl.uncond_put >= 0:
            ring_u[sl.uncond_put] = float(1000 + st.i)
        if sl.v_put >= 0:
            ring_v[sl.v_put] = float(2000 + st.i)
        out.append({"reuse": reuses_state(st, last_both), "last_both": last_both,
                    "cond": [ring_c[j] for j in sl.cond_read], "uncond": [ring_u[j] for j in sl.uncond_read],
                    "v": [ring_v[j] for j in sl.v_read]})
    return out


def test_ring_slots_hold_what_the_host_loop_combines():
    checked = 0
    for n in range(1, 11):
        for sampler in samplers(n):
            for name, sched in schedules(n).items():
                for co in (True, False):
                    steps = plan_steps(sampler, sched, co)
                    host, device = _host_reads(sampler, steps), _device_reads(sampler, steps)
                    for st, h, d in zip(steps, host, device):
                        if sampler.forecast == 0:  # no state ring: the last output is reused as it is
                            assert d["reuse"] and h["reuse"], (sampler, name, st.i)
                            d = {**d, "cond": h["cond"], "uncond": h["uncond"]}
                        assert d == h, (sampler.solver, sampler.forecast, n, name, co, st.i)
                    checked += len(steps)
    assert checked > 10000


def _layout(b: int, hist: History = History(), base: int = 0x100000) -> LoopLayout:
    enc = {"x": (base + 0x10000, 8192), "t": (base + 0x20000, 256), "y": (base + 0x30000, 512),
           "s": (base + 0x40000, 65536)}
    dec = {"x": (base + 0x60000, 8192), "s": (base + 0x70000, 65536), "v": (base + 0x80000, 8192)}
    return LoopLayout(b, 128, base, base + 4096, base + 8192, base + 12288, 256, enc, dec, s_half(b, 5, 12), hist)


def _rings(order: int, forecast: int) -> History:
    return History(tuple(0x900000 + 0x1000 * j for j in range(order if order > 1 else 0)),
                   tuple(0xA00000 + 0x1000 * j for j in range(forecast + 1 if forecast else 0)),
                   tuple(0xB00000 + 0x1000 * j for j in range(forecast + 1 if forecast else 0)))


def test_euler_and_reuse_run_todays_path():
    """Forecast 0 (any solver): no state ring, no kernel before the decoder, no copy beyond today's (x, t and an
    unaligned cond half of s); the graph calls do not depend on the solver. Euler: every update is cfg_euler."""
    for n in (1, 5, 12):
        for sampler in samplers(n):
            if sampler.forecast:
                continue
            for b in (1, 3, 16):
                lay = _layout(b, _rings(sampler.order, 0))
                for sched in schedules(n).values():
                    steps = plan_steps(sampler, sched)
                    calls = loop_calls(steps, lay)
                    euler = plan_steps(dataclasses.replace(sampler, solver="euler"), sched)
                    assert calls == loop_calls(euler, _layout(b))
                    ok_dst = {lay.enc["t"][0], lay.dec["s"][0]} | {lay.enc["x"][0] + h * b * 128 for h in (0, 1)} \
                        | {lay.dec["x"][0] + h * b * 128 for h in (0, 1)}
                    for c in (c for cs in calls for c in cs):
                        assert c.kernels == () and all(dst in ok_dst for dst, _, _ in c.copies), c
                    kinds = {u.kernel for u in loop_updates(steps, lay)}
                    assert kinds == ({"cfg_euler"} if sampler.order == 1 else {"cfg_adams"})


def test_forecast_assembles_s_from_the_rings_and_keys_stay_bounded():
    """Forecast 1 / 2: a recompute step copies its halves into the rings (one copy per half), a forecast step
    feeds the decoder its own s buffer, filled by the forecast kernel or, for a half with a plain weight, a copy
    from the ring. Every address comes from the fixed layout: the CUDA-graph keys of every plan of one engine
    set stay within a small fixed set."""
    keys = set()
    for sampler in samplers(12):
        if not sampler.forecast:
            continue
        for b in (1, 16):
            lay = _layout(b, _rings(sampler.order, sampler.forecast))
            for sched in schedules(12).values():
                steps = plan_steps(sampler, sched)
                ring_ptrs = set(lay.hist.cond) | set(lay.hist.uncond)
                for st, calls in zip(steps, loop_calls(steps, lay)):
                    dec = calls[-1]
                    kept = [c for c in dec.copies if c[0] in ring_ptrs]
                    assert len(kept) == (1 + st.enc_uncond if st.recompute else 0), (st.i, dec)
                    forecast = len(st.s_cond) > 1 or len(st.s_uncond) > 1
                    assert len(dec.kernels) == (len(st.s_cond) > 1) + (len(st.s_uncond) > 1)
                    if forecast:
                        assert "s" not in dec.bind  # the decoder's own s, written by the kernels / copies
                    for c in calls:
                        keys.add((b, c.graph, graph_key(c.rows, {**(lay.enc if c.graph == "encoder" else lay.dec),
                                                                 **c.bind})))
    # per batch size: the encoder on 2b or b rows; the decoder on 2b rows with the encoder's s or its own, on b
    # rows with the encoder's s, its cond half by offset (aligned b only) or its own s
    assert [sum(k[0] == b for k in keys) for b in (1, 16)] == [2 + 4, 2 + 5]


def test_history_bytes_at_ddt_xl():
    """docs/gpu.md's table: bytes per sample of the rings at DDT-XL, from the hand-derived sizes (latents
    4 x 32 x 32 / 4 x 64 x 64 float32; s of L x 1152 float32 with L = 256 / 1024)."""
    hand = {"ddt-xl-256": (4 * 32 * 32 * 4, 256 * 1152 * 4), "ddt-xl-512": (4 * 64 * 64 * 4, 1024 * 1152 * 4)}
    assert hand == {"ddt-xl-256": (16384, 1179648), "ddt-xl-512": (65536, 4718592)}
    for name, (row, state) in hand.items():
        m = load_config(name).model
        got = (int(np.prod(m.latent_shape)) * 4, m.num_tokens * m.hidden_size * 4)
        assert got == (row, state)
        for order in (1, 2, 3, 4):
            for forecast in FORECASTS:
                regions = history_regions(1, row, state, order, forecast)
                want = (order * row if order > 1 else 0) + (2 * (forecast + 1) * state if forecast else 0)
                assert sum(regions.values()) == want
    assert sum(history_regions(1, 16384, 1179648, 4, 2).values()) == 7143424  # adams:4 + forecast 2, XL 256
    assert sum(history_regions(1, 65536, 4718592, 4, 2).values()) == 28573696  # ... XL 512


# ------------------------------------------------------------------------------------------ on the stand-in


@pytest.fixture
def emu(monkeypatch) -> EmulatedGPU:
    monkeypatch.setitem(sys.modules, "tensorrt", standin_tensorrt_singleton)
    return EmulatedGPU().install(monkeypatch)


def _pair(emu, monkeypatch):
    from ddt_export.runtime.graphs.engines import Engines

    engines = standin_engines(emu, monkeypatch)
    runners = {g: engines.runner(g) for g in ("encoder", "decoder")}
    return engines, Engines(engines.folder, engines.manifest, engines.backend, runners, device_loop=False)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize("b", [1, 16])  # 1: the cond half of s is unaligned (copied); 16: bound by offset
def test_device_loop_equals_host_loop_on_every_plan(emu, monkeypatch, b):
    """Every solver x forecast x schedule, with and without cond-only rows: the device loop's final latents have
    the host loop's bits. Euler with forecast 0 launches cfg_euler only and allocates no ring."""
    engines, host = _pair(emu, monkeypatch)
    noise = np.random.default_rng(b).standard_normal((b, 2, 4, 4), dtype=np.float32)
    labels = np.arange(b) % 10
    launched = set()
    for sampler in samplers(12):
        for name, sched in schedules(12).items():
            for co in (True, False):
                if name not in ("uniform:3", "irregular") and not co:
                    continue  # the full CFG batch on the two schedules with the most transitions is enough
                emu.launched.clear()
                want = sample(host, noise, labels, sampler, sched, cond_only_outside=co)
                got = sample(engines, noise, labels, sampler, sched, cond_only_outside=co)
                assert np.array_equal(_bits(got), _bits(want)), (sampler.solver, sampler.forecast, name, co)
                launched |= set(emu.launched)
                if sampler.order == 1 and sampler.forecast == 0:
                    assert set(emu.launched) == {"cfg_euler"} and trt_loop.device_sampler(engines).history is None
    assert launched == set(trt_loop.KERNELS)
    engines.close()
    assert emu.allocs == {}


def test_every_step_count_on_the_standin(emu, monkeypatch):
    """Step counts 1..12 (first steps with fewer velocities and states than the order asks), every solver and
    forecast, on uniform:2, three samples."""
    engines, host = _pair(emu, monkeypatch)
    noise = np.random.default_rng(7).standard_normal((3, 2, 4, 4), dtype=np.float32)
    for n in range(1, 13):
        for solver in SOLVERS:
            for forecast in FORECASTS:
                sampler = SamplerConfig(num_steps=n, guidance=3.0, guidance_interval=(0.3, 1.0), solver=solver,
                                        forecast=forecast)
                want = sample(host, noise, np.array([1, 4, 9]), sampler, uniform_steps(n, 2))
                got = sample(engines, noise, np.array([1, 4, 9]), sampler, uniform_steps(n, 2))
                assert np.array_equal(_bits(got), _bits(want)), (n, solver, forecast)
    engines.close()


def test_rings_allocated_once_and_keys_bounded_across_plans(emu, monkeypatch):
    """The rings grow to the highest order and forecast asked, once; a second pass over every plan allocates
    nothing and adds no CUDA-graph key or context."""
    engines, _ = _pair(emu, monkeypatch)
    noise = np.random.default_rng(3).standard_normal((2, 2, 4, 4), dtype=np.float32)

    def every_plan():
        for solver in SOLVERS:
            for forecast in FORECASTS:
                sampler = SamplerConfig(num_steps=8, guidance=3.0, guidance_interval=(0.3, 1.0), solver=solver,
                                        forecast=forecast)
                sample(engines, noise, np.array([1, 2]), sampler, irregular(8))

    every_plan()
    loop = trt_loop.device_sampler(engines)
    assert loop.history_size == (4, 2)
    mallocs = emu.mallocs
    keys = {g: set(engines.runner(g).plan.captured) for g in ("encoder", "decoder")}
    every_plan()
    assert emu.mallocs == mallocs and {g: set(engines.runner(g).plan.captured) for g in keys} == keys
    engines.close()
    assert emu.allocs == {}


def test_a_failed_ring_allocation_leaves_the_loop_usable(emu, monkeypatch):
    """An OOM on the rings (a forecast plan at a large batch) raises; the sampler keeps no half-made rings, and
    the next call allocates them and equals the host loop."""
    from ddt_export.core.errors import BackendError

    engines, host = _pair(emu, monkeypatch)
    noise = np.random.default_rng(5).standard_normal((2, 2, 4, 4), dtype=np.float32)
    sampler = SamplerConfig(num_steps=8, guidance=3.0, guidance_interval=(0.3, 1.0), solver="adams:2")
    sample(engines, noise, np.array([1, 2]), sampler, [0, 2, 4, 6])  # the velocity ring: (2, 0)
    loop = trt_loop.device_sampler(engines)
    emu.fail_malloc_at = emu.mallocs + 1  # the rings' reallocation for forecast 2
    bigger = dataclasses.replace(sampler, forecast=2)
    with pytest.raises(BackendError, match="cudaErrorMemoryAllocation"):
        sample(engines, noise, np.array([1, 2]), bigger, [0, 2, 4, 6])
    assert loop.history is None and loop.history_size == (1, 0)
    want = sample(host, noise, np.array([1, 2]), bigger, [0, 2, 4, 6])
    assert np.array_equal(_bits(sample(engines, noise, np.array([1, 2]), bigger, [0, 2, 4, 6])), _bits(want))
    assert loop.history_size == (2, 2)
    engines.close()
    assert emu.allocs == {}
