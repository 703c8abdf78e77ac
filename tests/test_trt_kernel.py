"""The device loop's kernels without a GPU: NVRTC compiles them to a cubin for every architecture the project
targets (`core.precision.GPU_ARCHS`), their PTX has the host loop's operation order and no FMA, and the numpy
restatement of each kernel's order (tests/kernel_restatements.py), driven by the arguments the loop passes
(`trt_update.update_launch`, `state_ops`), equals the host loop's own arithmetic bit for bit: `step.update` (CFG
combine, then Euler or `adams:K`) and `step.decoder_feeds` (the forecast state of each CFG half). NVRTC and
cuda-python come with the [cuda-check] extra (CI installs it through [dev]); where they are missing the NVRTC tests
skip with the reason, except under CI (CI=true), where a missing NVRTC fails them: the kernels are compiled in CI
or CI fails.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from ddt_export.core.precision import GPU_ARCHS
from ddt_export.core.config import SamplerConfig
from ddt_export.core.sampling import cfg_combine, multistep_coefficients, ode
from ddt_export.runtime.graphs.trt_plan import KernelTarget, kernel_target
from ddt_export.runtime.graphs.trt_update import state_ops, update_launch
from ddt_export.runtime.sampling.plan import Step
from ddt_export.runtime.sampling.step import Rows, decoder_feeds, update
from ddt_export.runtime.sampling.trt_loop import KERNEL_SOURCE, KERNELS
from kernel_restatements import FlatMemory, cfg_adams_reference, cfg_euler_reference, nvrtc_reason, run_launch


WHY = nvrtc_reason()
needs_nvrtc = pytest.mark.skipif(bool(WHY) and not os.environ.get("CI"), reason=WHY or "ok")


@needs_nvrtc
@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_kernel_compiles_to_a_cubin_for_each_target_gpu(arch):
    from ddt_export.runtime.sampling.trt_loop import compile_kernel, supported_archs

    supported = supported_archs()
    target = kernel_target(f"{arch // 10}.{arch % 10}", supported)
    if arch not in supported:  # an older NVRTC than CI's: the fallback is what loads, and it is said
        assert target.note, target
    else:
        assert (target.kind, target.arch, target.note) == ("cubin", arch, "")
    image = compile_kernel(target)  # a compile error raises BackendError with NVRTC's log: the test fails
    if target.kind == "cubin":
        assert image[:4] == b"\x7fELF" and image[18:20] == b"\xbe\x00"  # ELF for EM_CUDA (190)
        assert all(k.encode() in image for k in KERNELS)
    else:
        assert f".target sm_{target.arch}".encode() in image


def _body(ptx: str, entry: str) -> str:
    """One kernel's PTX: from its .entry to the next one."""
    body = ptx[ptx.index(f".entry {entry}("):]
    nxt = body.find(".entry", 1)
    return body if nxt < 0 else body[:nxt]


def _ops(body: str) -> list[tuple[str, str]]:
    return re.findall(r"^\s*(fma|mad|sub|mul|add|neg|div)\.(rn\.)?f32\b", body, flags=re.M)


@needs_nvrtc
def test_ptx_keeps_the_host_loops_operation_order():
    """cfg_euler: sub, mul, add (the CFG combine), mul, add (x + v dt), each rounded (.rn), no fma. cfg_adams:
    the same CFG combine, then k products and sums from zero and x + u dt; forecast: up to 3 products and sums
    from zero. Every float operation rounds on its own (.rn: ptxas contracts none of them into an FMA), and the
    sum starts at +0.0 (`add ... 0f00000000` kept: folding 0 + p to p would keep a -0.0 that numpy's zeros +
    p turns into +0.0)."""
    from ddt_export.runtime.sampling.trt_loop import kernel_ptx

    ptx = kernel_ptx(90).decode()
    assert "fma" not in ptx and "mad.rn.f32" not in ptx and ".ftz" not in ptx
    assert _ops(_body(ptx, "cfg_euler")) == [("sub", "rn."), ("mul", "rn."), ("add", "rn."), ("mul", "rn."),
                                             ("add", "rn.")]
    for entry, counts in (("cfg_adams", {"sub": 1, "mul": 6, "add": 6}), ("forecast", {"mul": 3, "add": 3})):
        body = _body(ptx, entry)
        ops = _ops(body)
        assert all(rn for _, rn in ops), ops
        assert {op: sum(o == op for o, _ in ops) for op in counts} == counts and len(ops) == sum(counts.values())
        assert re.search(r"add\.rn\.f32\s+%f\d+, (%f\d+, 0f00000000|0f00000000, %f\d+);", body), entry


@needs_nvrtc
def test_a_compile_error_is_raised_with_nvrtcs_log(monkeypatch):
    from ddt_export.core.errors import BackendError
    from ddt_export.runtime.sampling import trt_loop

    monkeypatch.setattr(trt_loop, "KERNEL_SOURCE", KERNEL_SOURCE.replace(b"float vi", b"flot vi"))
    with pytest.raises(BackendError, match="identifier \"flot\" is undefined"):
        trt_loop.compile_kernel(KernelTarget("cubin", 90))


def _edge_values(rng, n) -> np.ndarray:
    a = rng.standard_normal(n).astype(np.float32) * np.float32(3)
    a[::7] *= np.float32(1e-30)  # subnormal products
    a[1::11] *= np.float32(1e30)
    a[2::13] = np.float32(-0.0)
    return a


def test_numpy_restatement_equals_the_host_update_bit_for_bit():
    """The kernel's order restated in numpy (`cfg_euler_reference`) against the host loop's own functions
    (`core.sampling.cfg_combine`, `ode`): equal bits, guided and cond-only, over random and edge values."""
    rng = np.random.default_rng(0)
    n = 4 * 8 * 8 * 3
    for scale, dt in ((1.5, -0.02), (3.0, -0.0196), (1.0, -0.04), (2.0, 1e-3)):
        x, vu, vc = (_edge_values(rng, n) for _ in range(3))
        host = ode(x, cfg_combine(vu, vc, scale), dt)
        assert np.array_equal(cfg_euler_reference(x, np.concatenate([vu, vc]), n, np.float32(scale),
                                                  np.float32(dt), 1).view(np.uint32), host.view(np.uint32))
        host = ode(x, vc, dt)
        assert np.array_equal(cfg_euler_reference(x, vc, n, np.float32(1.0), np.float32(dt), 0).view(np.uint32),
                              host.view(np.uint32))
    # with FMA (one rounding for vi * dt + x) the result differs somewhere: the restatement can tell
    x, vu = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    fused = (x.astype(np.float64) + vu.astype(np.float64) * np.float64(np.float32(-0.0196))).astype(np.float32)
    assert not np.array_equal(fused, cfg_euler_reference(x, vu, n, 1.0, np.float32(-0.0196), 0))


B, SHAPE = 2, (4, 6, 6)  # two samples of 4 x 6 x 6 latents
N = B * int(np.prod(SHAPE))


def _step(coeffs=(1.0,), scale=3.0, guided=True, dt=-0.0196, s_cond=(1.0,), s_uncond=None) -> Step:
    f = np.float32
    return Step(5, f(0.4), f(dt), scale, False, False, guided, False, tuple(f(c) for c in coeffs),
                tuple(f(w) for w in s_cond), tuple(f(w) for w in (s_uncond if s_uncond is not None else
                                                                   ((1.0,) if guided else ()))))


def _adams_on_memory(x, v, older, st, order, entry) -> tuple[np.ndarray, np.ndarray]:
    """The device loop's update of step `st` on FlatMemory: the velocity ring of `order` slots holds `older`
    (oldest first) at the slots of entries entry - k + 1 .. entry - 1, the launch is `update_launch`'s, run by
    the restatement. (x after, the slot the guided velocity went to)."""
    mem = FlatMemory()
    ring = [mem.alloc(N) for _ in range(order)]
    k = len(st.coeffs)
    read = [ring[(entry - k + 1 + j) % order] for j in range(k)]
    for ptr, a in zip(read[:-1], older):
        mem.view(ptr, N)[:] = a.ravel()
    xp, vp = mem.alloc(x), mem.alloc(v)
    what = update_launch(st, xp, vp, N, read[-1], read)
    assert what.kernel == "cfg_adams"
    run_launch(what, mem.view)
    return mem.view(xp, N).reshape(x.shape).copy(), mem.view(read[-1], N).reshape(x.shape).copy()


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def test_cfg_adams_restatement_equals_the_host_update_bit_for_bit():
    """adams:K for K = 2..4 and every number of velocities k = 1..K (the first steps have fewer), guided and
    cond-only, with the plan's own weights and random ones, over random and edge values: `update_launch` +
    the restatement of `cfg_adams` on emulated memory against `step.update` (the host loop's), equal bits for
    x and for the velocity kept in the ring (the host's newest history entry)."""
    rng = np.random.default_rng(1)
    with np.errstate(all="ignore"):
        for order in (2, 3, 4):
            sampler = SamplerConfig(num_steps=12, solver=f"adams:{order}")
            plan_w = [c for c in multistep_coefficients(sampler) if len(c) > 1]
            for k in range(1, order + 1):
                weights = [(1.0,)] if k == 1 else [next(c for c in plan_w if len(c) == k),
                                                   rng.standard_normal(k).astype(np.float32)]
                for coeffs in weights:
                    for guided, scale, dt in ((True, 3.0, -0.0196), (False, 1.0, 0.04), (True, 1.5, 1e-3)):
                        x = _edge_values(rng, N).reshape(B, *SHAPE)
                        v = _edge_values(rng, (2 if guided else 1) * N).reshape(-1, *SHAPE)
                        older = [_edge_values(rng, N).reshape(B, *SHAPE) for _ in range(k - 1)]
                        st = _step(coeffs, scale, guided, dt)
                        rows = Rows(sampler, np.arange(B), x.copy(), np.random.default_rng(0), v=list(older))
                        want = update(rows, st, v.copy())
                        got, kept = _adams_on_memory(x, v, older, st, order, entry=k - 1 + order)
                        assert np.array_equal(_bits(got), _bits(want)), (order, k, guided)
                        assert np.array_equal(_bits(kept), _bits(rows.v[-1])), (order, k, guided)
    # the control: the same sum newest first (or fused) differs somewhere, so the test can fail
    x, older = rng.standard_normal(N).astype(np.float32), [rng.standard_normal(N).astype(np.float32)
                                                          for _ in range(2)]
    v = rng.standard_normal(N).astype(np.float32)
    c = np.float32([0.41, -1.33, 1.92])
    kernel, _ = cfg_adams_reference(x, v, older, N, 1.0, np.float32(0.04), 0, 3, c[:2], c[2])
    reversed_sum = np.zeros(N, np.float32) + c[2] * v + c[1] * older[1] + c[0] * older[0]
    assert not np.array_equal(kernel, x + reversed_sum * np.float32(0.04))


def test_forecast_restatement_equals_the_host_decoder_state_bit_for_bit():
    """The decoder's s of a forecast step, each CFG half from its own ring: `state_ops` (a copy for a plain
    reuse, else the `forecast` launch) run on emulated memory against `step.decoder_feeds`, equal bits, for 2
    and 3 states with the plan's kind of weights and random ones, guided and cond-only, over random and edge
    values (-0.0 included: a plain reuse keeps it)."""
    rng = np.random.default_rng(2)
    L, D = 5, 12
    half = B * L * D
    cases = [((1.0,), (-1.0, 2.0)), ((-1.0, 2.0), (1.0,)), ((0.5, -1.5, 2.0), (-1.0, 2.0)),
             (tuple(rng.standard_normal(3)), tuple(rng.standard_normal(3))), ((-0.25, 1.25), None)]
    with np.errstate(all="ignore"):
        for w_cond, w_uncond in cases:
            guided = w_uncond is not None
            cond = [_edge_values(rng, half).reshape(B, L, D) for _ in range(3)]
            uncond = [_edge_values(rng, half).reshape(B, L, D) for _ in range(3)]
            sampler = SamplerConfig(num_steps=12, forecast=2)
            rows = Rows(sampler, np.arange(B), np.zeros((B, *SHAPE), np.float32), np.random.default_rng(0),
                        s=np.concatenate([uncond[-1], cond[-1]]), s_uncond=True, cond=cond, uncond=uncond)
            st = _step(guided=guided, s_cond=w_cond, s_uncond=w_uncond if guided else ())
            want = decoder_feeds(rows, st)["s"]
            mem = FlatMemory(1 << 14)
            dst = mem.alloc(2 * half)
            halves = ([(st.s_uncond, uncond)] if guided else []) + [(st.s_cond, cond)]
            for h, (weights, states) in enumerate(halves):
                srcs = [mem.alloc(a) for a in states[-len(weights):]]
                copies, launches = state_ops(weights, srcs, dst + h * 4 * half, 4 * half)
                assert (len(copies), len(launches)) == ((1, 0) if len(weights) == 1 else (0, 1))
                for c in copies:
                    mem.copy(*c)
                for what in launches:
                    run_launch(what, mem.view)
            got = mem.view(dst, len(halves) * half).reshape(want.shape)
            assert np.array_equal(_bits(got), _bits(want)), (w_cond, w_uncond)
    # the control: a lone weight 1.0 through the kernel's sum (0 + 1 * s) turns -0.0 into +0.0; hence the copy
    s0 = np.float32([-0.0, 1.0])
    assert _bits(np.zeros(2, np.float32) + np.float32(1.0) * s0)[0] != _bits(s0)[0]


def _signature(kernel: str) -> list[tuple[str, str]]:
    """(numpy dtype of its C type, name) of each parameter of `kernel` in KERNEL_SOURCE."""
    sig = re.search(rb"void " + kernel.encode() + rb"\(([^)]*)\)", KERNEL_SOURCE).group(1).decode()
    c_types = {"int": "int32", "float": "float32"}
    return [("uint64" if "*" in p else c_types[p.split()[-2]], p.split()[-1].lstrip("*")) for p in sig.split(",")]


def test_every_launch_matches_its_kernels_signature():
    """Each launch the loop makes passes one numpy scalar per parameter, of the parameter's C type (a pointer:
    uint64), in the order of the kernel's parameters."""
    adams = _step((0.5, -1.0, 1.5), 2.0, True, -0.02)
    launches = [update_launch(_step(), 0x1000, 0x2000, 96),
                update_launch(adams, 0x1000, 0x2000, 96, 0x3000, [0x4000, 0x5000, 0x3000]),
                *state_ops((-1.0, 2.0), [0x6000, 0x7000], 0x8000, 400)[1]]
    assert [w.kernel for w in launches] == list(KERNELS)
    for what in launches:
        assert [t for t, _ in _signature(what.kernel)] == [a.dtype.name for a in what.args], what.kernel
    values = [int(a) if a.dtype.kind in "iu" else float(a) for a in launches[1].args]
    assert [n for _, n in _signature("cfg_adams")] == ["x", "v", "put", "h0", "h1", "h2", "n", "scale", "dt", "cfg",
                                                        "k", "c0", "c1", "c2", "cn"]
    f = lambda v: float(np.float32(v))  # noqa: E731
    assert values == [0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x3000, 96, 2.0, f(-0.02), 1, 3, 0.5, -1.0, 0.0, 1.5]
    values = [int(a) if a.dtype.kind in "iu" else float(a) for a in launches[2].args]
    assert [n for _, n in _signature("forecast")] == ["s", "s0", "s1", "s2", "n", "k", "w0", "w1", "w2"]
    assert values == [0x8000, 0x6000, 0x7000, 0x6000, 100, 2, -1.0, 2.0, 0.0]


def test_update_launch_passes_the_steps_scale_and_dt_as_float32():
    st = Step(3, np.float32(0.8), np.float32(-0.02), 3.0, False, True, True)
    launch = update_launch(st, 0x1000, 0x2000, 96)
    assert launch.kernel == "cfg_euler" and launch.kernel in KERNELS and launch.n == 96
    assert [a.dtype.name for a in launch.args] == ["uint64", "uint64", "int32", "float32", "float32", "int32"]
    assert [int(a) if a.dtype.kind in "iu" else float(a) for a in launch.args] == \
        [0x1000, 0x2000, 96, 3.0, float(np.float32(-0.02)), 1]
    cond = update_launch(Step(9, np.float32(0.1), np.float32(-0.02), 1.0, False, False, False), 0x1000, 0x2000, 96)
    assert int(cond.args[5]) == 0  # cond-only: v holds B rows
    # the kernel's signature is the order update_launch passes
    sig = re.search(rb"cfg_euler\(([^)]*)\)", KERNEL_SOURCE).group(1).decode()
    assert [p.split()[-1].lstrip("*") for p in sig.split(",")] == ["x", "v", "n", "scale", "dt", "cfg"]
