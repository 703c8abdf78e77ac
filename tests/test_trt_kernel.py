"""The device loop's kernel without a GPU: NVRTC compiles it to a cubin for every architecture the project targets
(`core.precision.GPU_ARCHS`), its PTX has the host loop's operation order and no FMA, and the numpy restatement
of that order equals the host loop's update bit for bit. NVRTC and cuda-python come with the [cuda-check] extra
(CI installs it through [dev]); where they are missing the NVRTC tests skip with the reason, except under CI
(CI=true), where a missing NVRTC fails them: the kernel is compiled in CI or CI fails.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from ddt_export.core.precision import GPU_ARCHS
from ddt_export.core.sampling import cfg_combine, ode
from ddt_export.runtime.graphs.trt_plan import KernelTarget, kernel_target
from ddt_export.runtime.sampling.plan import Step
from ddt_export.runtime.sampling.trt_loop import KERNEL_SOURCE, KERNELS, update_launch
from trt_standin import cfg_euler_reference


def _nvrtc_reason() -> str:
    try:
        from cuda.bindings import nvrtc

        nvrtc.nvrtcVersion()
    except ImportError as e:
        return f"cuda-python is not installed (the [cuda-check] extra): {e}"
    except (OSError, RuntimeError) as e:
        return f"libnvrtc is not loadable (the [cuda-check] extra): {e}"
    return ""


WHY = _nvrtc_reason()
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


@needs_nvrtc
def test_ptx_keeps_the_host_loops_operation_order():
    """cfg_euler's PTX: sub, mul, add (the CFG combine), mul, add (x + v dt), each rounded (.rn), no fma."""
    from ddt_export.runtime.sampling.trt_loop import kernel_ptx

    ptx = kernel_ptx(90).decode()
    body = ptx[ptx.index(".entry cfg_euler"):]
    ops = re.findall(r"^\s*(fma|mad|sub|mul|add|neg)\.(rn\.)?f32\b", body, flags=re.M)
    assert [(op, rn) for op, rn in ops] == [("sub", "rn."), ("mul", "rn."), ("add", "rn."), ("mul", "rn."),
                                            ("add", "rn.")], ops
    assert "fma" not in body and "mad.rn.f32" not in body


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
