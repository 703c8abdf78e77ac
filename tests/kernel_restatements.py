"""The device loop's kernels (`trt_loop.KERNEL_SOURCE`) restated in numpy, one float32 operation at a time in each
kernel's order (--fmad=false: each operation rounds once), and `run_launch`, which runs a `trt_update.Launch` with
them on any memory that gives float32 views by address. tests/test_trt_kernel.py checks each restatement, driven
by the loop's own launch arguments, against the host loop's arithmetic (`step.update`, `step.decoder_feeds`) bit
for bit; the stand-in device (trt_standin.py) and FlatMemory below run them in place of the kernels. None of this
is CUDA: a GPU still has to run the kernels themselves (scripts/gpu_check.py, nvrtc-kernel).
"""
from __future__ import annotations

import numpy as np

from ddt_export.runtime.graphs.trt_plan import align_up


def _cfg(v: np.ndarray, n: int, scale, cfg: int) -> np.ndarray:
    """vi of the update kernels: v_u + scale * (v_c - v_u) over v = [v_u; v_c] when cfg, else v itself."""
    f = np.float32
    if not cfg:
        return np.asarray(v, f)[:n]
    v = np.asarray(v, f)
    d = (v[n:2 * n] - v[:n]).astype(f)
    p = (f(scale) * d).astype(f)
    return (v[:n] + p).astype(f)


def cfg_euler_reference(x: np.ndarray, v: np.ndarray, n: int, scale, dt, cfg: int) -> np.ndarray:
    """KERNEL_SOURCE's cfg_euler restated in numpy, one float32 operation at a time, in the kernel's order
    (--fmad=false: each rounds once): d = v_c - v_u; p = scale * d; vi = v_u + p; q = vi * dt; x + q."""
    f = np.float32
    vi = _cfg(v, n, scale, cfg)
    q = (vi * f(dt)).astype(f)
    return (np.asarray(x, f)[:n] + q).astype(f)


def cfg_adams_reference(x: np.ndarray, v: np.ndarray, older: list, n: int, scale, dt, cfg: int, k: int,
                        c_older, cn) -> tuple[np.ndarray, np.ndarray]:
    """KERNEL_SOURCE's cfg_adams restated in numpy, one float32 operation at a time in the kernel's order:
    vi as in cfg_euler (what goes to the history slot); u = vi when k = 1, else u = 0, then u = u + c_j * h_j
    for the k - 1 older velocities h_j (oldest first), then u = u + cn * vi; q = u * dt; x + q. (x, vi)."""
    f = np.float32
    vi = _cfg(v, n, scale, cfg)
    u = vi
    if k > 1:
        u = np.zeros(n, f)
        for j in range(k - 1):
            u = (u + (f(c_older[j]) * np.asarray(older[j], f)[:n]).astype(f)).astype(f)
        u = (u + (f(cn) * vi).astype(f)).astype(f)
    q = (u * f(dt)).astype(f)
    return (np.asarray(x, f)[:n] + q).astype(f), vi


def forecast_reference(states: list, n: int, k: int, weights) -> np.ndarray:
    """KERNEL_SOURCE's forecast restated in numpy: u = 0, then u = u + w_j * s_j for the k states, oldest
    first, each product and sum rounded to float32 on its own."""
    f = np.float32
    u = np.zeros(n, f)
    for j in range(k):
        u = (u + (f(weights[j]) * np.asarray(states[j], f)[:n]).astype(f)).astype(f)
    return u


def run_launch(what, view) -> None:
    """One `trt_update.Launch` run by the numpy restatement of its kernel, on memory read through `view(ptr,
    count)` (a writable float32 array at that address): the stand-in's kernels. Reads what the kernel reads
    (its k), writes what it writes."""
    a = [int(v) if np.asarray(v).dtype.kind in "iu" else v for v in what.args]
    if what.kernel == "cfg_euler":
        x_ptr, v_ptr, n, scale, dt, cfg = a
        x = view(x_ptr, n)
        x[:] = cfg_euler_reference(x, view(v_ptr, (2 if cfg else 1) * n), n, scale, dt, cfg)
    elif what.kernel == "cfg_adams":
        x_ptr, v_ptr, put, h0, h1, h2, n, scale, dt, cfg, k, c0, c1, c2, cn = a
        older = [view(p, n).copy() for p in (h0, h1, h2)[:k - 1]]
        x = view(x_ptr, n)
        new_x, vi = cfg_adams_reference(x, view(v_ptr, (2 if cfg else 1) * n), older, n, scale, dt, cfg, k,
                                        (c0, c1, c2), cn)
        view(put, n)[:] = vi
        x[:] = new_x
    elif what.kernel == "forecast":
        dst, s0, s1, s2, n, k, w0, w1, w2 = a
        states = [view(p, n).copy() for p in (s0, s1, s2)[:k]]
        view(dst, n)[:] = forecast_reference(states, n, k, (w0, w1, w2))
    else:
        raise AssertionError(f"no restatement of kernel {what.kernel}")


class FlatMemory:
    """A STAND-IN for device memory in the kernel tests: one float32 heap, addresses as byte offsets from a
    made-up base (allocations 256-byte aligned), `view` and device-to-device `copy` as the loop uses them."""

    BASE = 0x7000_0000

    def __init__(self, nfloats: int = 1 << 16):
        self.heap, self.end = np.zeros(nfloats, np.float32), 0

    def alloc(self, a: np.ndarray | int) -> int:
        """Room for `a` floats (or a copy of the float32 array `a`); its address."""
        n = a if isinstance(a, int) else np.asarray(a).size
        ptr, self.end = self.BASE + self.end, self.end + align_up(4 * n)
        assert self.end <= 4 * self.heap.size, "FlatMemory heap too small"
        if not isinstance(a, int):
            self.view(ptr, n)[:] = np.asarray(a, np.float32).ravel()
        return ptr

    def view(self, ptr: int, count: int) -> np.ndarray:
        off = int(ptr) - self.BASE
        assert off % 4 == 0 and 0 <= off and off + 4 * count <= 4 * self.heap.size, (hex(ptr), count)
        return self.heap[off // 4:off // 4 + int(count)]

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self.view(dst, nbytes // 4)[:] = self.view(src, nbytes // 4).copy()


def nvrtc_reason() -> str:
    """'' when NVRTC compiles here; else why not (the tests that compile the kernels skip with it)."""
    try:
        from cuda.bindings import nvrtc

        nvrtc.nvrtcVersion()
    except ImportError as e:
        return f"cuda-python is not installed (the [cuda-check] extra): {e}"
    except (OSError, RuntimeError) as e:
        return f"libnvrtc is not loadable (the [cuda-check] extra): {e}"
    return ""
