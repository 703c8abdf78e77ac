"""The device-resident sampling loop of a TensorRT `Engines`: x and s stay on the GPU. Never imports torch.

`DeviceSampler` is what `runtime.sample` runs on a TensorRT folder (chosen once, at load: `Engines.loop`), made
once per engine set and attached to it (`device_sampler`). It runs the host loop's plan of steps
(`plan.plan_steps`, so the same rows and the same CFG) and the step's update rule (`step.update`) in a kernel,
with:
- its buffers allocated once per engine set, at load, and freed in `close()`: x (B rows), the labels
  `[uncond; cond]` and the conditional labels alone, each on a 256-byte aligned offset (`trt_plan.pack`),
  and the step-time table (grown when a longer trajectory asks for more);
- all step times uploaded once per call (`trt_plan.time_table`); each recompute step copies its row
  device-to-device into the encoder's t, with no host sync inside the loop;
- the encoder's s buffer bound as the decoder's input, its conditional half by pointer offset where that offset
  is aligned, else copied device-to-device (`trt_plan.s_half`);
- the batch padded to the engines' batch.min (copies of the last sample, dropped after) or refused past
  batch.max before anything runs (`trt_plan.device_batch`);
- CFG + Euler in one NVRTC kernel compiled without FMA (it rounds as the numpy host loop does), loaded once per
  process and device, after `cudaSetDevice` (a fresh thread has no current context);
- CUDA graphs per (rows, bindings) key on the runners' own contexts (`TrtGraph.enqueue(graphs=True)`), asked
  per call: the runners' other users (the host loop contract) never see them switched on.
Only the ODE step function (the FID configs' sampler).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from ...core.errors import BackendError, InputError, NumericsError
from ..graphs.trt import DeviceBuffer, TrtGraph, check, compute_capability, copy, set_device
from ..graphs.trt_plan import device_batch, pack, s_half, time_table
from .plan import plan_steps
from .step import check_inputs

_KERNEL = rb"""
extern "C" __global__ void cfg_euler(float* x, const float* v, int n, float scale, float dt, int cfg) {
    // x (B rows) += dt * v, v = v_u + scale * (v_c - v_u) with v = [v_u; v_c] when cfg, else v (B rows).
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float vi = cfg ? v[i] + scale * (v[i + n] - v[i]) : v[i];
    x[i] = x[i] + vi * dt;
}
"""
THREADS = 256


def kernel_ptx(arch: str) -> bytes:
    """The CFG/Euler kernel as PTX for compute_<arch> (e.g. "90"), by NVRTC (no GPU needed), without fused
    multiply-add, so it rounds as the numpy host loop does. The program is destroyed whatever happens."""
    from cuda.bindings import nvrtc

    try:
        prog = check(nvrtc.nvrtcCreateProgram(_KERNEL, b"ddt_cfg_euler.cu", 0, [], []), "nvrtcCreateProgram")
    except (OSError, RuntimeError) as e:  # libnvrtc not found
        raise BackendError("NVRTC (device sampling)", "libnvrtc loadable", repr(e),
                           "install the NVRTC wheel of your CUDA major (the [tensorrt-cu12] / [tensorrt-cu13] extra)")
    try:
        opts = [b"--fmad=false", f"--gpu-architecture=compute_{arch}".encode()]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(status[0]) != 0:
            size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            text = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, text), "nvrtcGetProgramLog")
            raise BackendError("NVRTC compile of the CFG/Euler kernel", "success",
                               text.decode(errors="replace").strip())
        size = check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        ptx = b" " * size
        check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx
    finally:
        check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")


@functools.cache
def load_kernel(device: int):
    """PTX for this GPU -> CUfunction, once per process and device, in the device's primary context (made
    current first: cuModuleLoadData is a driver call and a fresh thread has no current context)."""
    from cuda.bindings import driver

    set_device(device)
    ptx = kernel_ptx(compute_capability(device).replace(".", ""))
    image = np.char.array(ptx)  # as cuda-python's own examples hand PTX to the driver
    module = check(driver.cuModuleLoadData(image.ctypes.data), "cuModuleLoadData")
    return check(driver.cuModuleGetFunction(module, b"cfg_euler"), "cuModuleGetFunction")


class DeviceSampler:
    """`runtime.sample` on a TensorRT `Engines` with x and s resident on the GPU; owns its device buffers."""

    def __init__(self, engines):
        enc, dec = engines.runner("encoder"), engines.runner("decoder")
        if not isinstance(enc, TrtGraph) or not isinstance(dec, TrtGraph):
            raise BackendError("device sampling", "engines loaded from a TensorRT folder", engines.backend_name)
        self.engines, self.enc, self.dec, self.device = engines, enc, dec, engines.backend.device
        m = engines.config.model
        self.samples = engines.max_batch // 2  # the CFG batch is 2 rows per sample
        self.row = int(np.prod(m.latent_shape)) * 4  # bytes of one latent row, float32
        self.tokens, self.hidden = m.num_tokens, m.hidden_size
        self.offsets, total = pack({"x": self.samples * self.row, "y_cfg": 2 * self.samples * 8,
                                    "y_cond": self.samples * 8})
        set_device(self.device)
        self.memory = DeviceBuffer(total)
        self.times: DeviceBuffer | None = None  # the step-time table, grown on demand

    def ptr(self, region: str) -> int:
        return self.memory.ptr + self.offsets[region]

    def sample(self, noise, labels, sampler, schedule: Sequence[int], *, cond_only_outside: bool = True,
               progress=None, cuda_graphs: bool = True) -> np.ndarray:
        from cuda.bindings import driver
        from cuda.bindings import runtime as cudart

        if sampler.step_fn != "ode":
            raise InputError("sampler.step_fn for device sampling", "ode", sampler.step_fn, "use the host loop")
        if sampler.order != 1 or sampler.forecast != 0:  # the kernel is CFG + Euler; the rest is the host loop's
            raise InputError("solver and forecast for device sampling", "euler with forecast 0",
                             f"{sampler.solver} with forecast {sampler.forecast}", "pass --no-device-loop")
        x_host, labels = check_inputs(self.engines, noise, labels)
        asked = len(labels)
        b = device_batch(asked, self.engines.min_batch, self.engines.max_batch)
        if b > asked:  # rows are independent: the copies change nothing for the real samples
            x_host = np.concatenate([x_host, np.repeat(x_host[-1:], b - asked, axis=0)])
            labels = np.concatenate([labels, np.repeat(labels[-1:], b - asked)])
        set_device(self.device)  # this thread may be new
        kernel, stream, enc, dec = load_kernel(self.device), self.enc.stream, self.enc, self.dec
        steps = plan_steps(sampler, schedule, cond_only_outside)
        table, stride = time_table([st.t for st in steps if st.recompute], 2 * b)
        if self.times is None or self.times.nbytes < table.nbytes:
            if self.times is not None:
                self.times.free()
            self.times = DeviceBuffer(table.nbytes)
        y_cfg = np.concatenate([np.full(b, self.engines.config.model.null_class, np.int64), labels])
        x = self.ptr("x")
        half = s_half(b, self.tokens, self.hidden)
        s_bytes = enc.buffers["s"].nbytes
        for dst, src in ((x, x_host), (self.ptr("y_cfg"), y_cfg), (self.ptr("y_cond"), labels),
                         (self.times.ptr, table)):
            copy(dst, src.ctypes.data, src.nbytes, "h2d", stream)  # host arrays live until the sync below
        s_uncond, k = False, 0
        for st in steps:
            if st.recompute:
                rows = 2 * b if st.enc_uncond else b
                copy(enc.buffers["t"].ptr, self.times.ptr + k * stride, rows * 4, "d2d", stream)
                k += 1
                for h in range(rows // b):  # x into every half of the encoder's x buffer
                    copy(enc.buffers["x"].ptr + h * b * self.row, x, b * self.row, "d2d", stream)
                y = (self.ptr("y_cfg"), 2 * b * 8) if st.enc_uncond else (self.ptr("y_cond"), b * 8)
                enc.enqueue(rows, {"y": y}, graphs=cuda_graphs)
                s_uncond = st.enc_uncond
            s = enc.buffers["s"].ptr
            if st.dec_uncond:
                for h in range(2):
                    copy(dec.buffers["x"].ptr + h * b * self.row, x, b * self.row, "d2d", stream)
                dec.enqueue(2 * b, {"s": (s, s_bytes)}, graphs=cuda_graphs)  # s (2B, L, D): the encoder's buffer
            elif not s_uncond:
                dec.enqueue(b, {"x": (x, b * self.row), "s": (s, s_bytes)}, graphs=cuda_graphs)
            elif half.by_pointer:  # the cond half of a 2B state, by offset
                dec.enqueue(b, {"x": (x, b * self.row), "s": (s + half.offset, s_bytes - half.offset)},
                            graphs=cuda_graphs)
            else:  # an unaligned offset cannot be bound: copy the half into the decoder's own s
                copy(dec.buffers["s"].ptr, s + half.offset, half.offset, "d2d", stream)
                dec.enqueue(b, {"x": (x, b * self.row)}, graphs=cuda_graphs)
            n = b * self.row // 4
            values = [np.array([x], np.uint64), np.array([dec.buffers["v"].ptr], np.uint64), np.array([n], np.int32),
                      np.array([st.scale], np.float32), np.array([st.dt], np.float32),
                      np.array([int(st.dec_uncond)], np.int32)]  # cfg_euler's arguments, in order
            params = np.array([v.ctypes.data for v in values], np.uint64)  # kernelParams: pointers to them
            check(driver.cuLaunchKernel(kernel, (n + THREADS - 1) // THREADS, 1, 1, THREADS, 1, 1, 0, stream,
                                        params.ctypes.data, 0), "cuLaunchKernel cfg_euler")
            if progress is not None:
                progress(st.i + 1, sampler.num_steps)
        out = np.empty_like(x_host)
        copy(out.ctypes.data, x, out.nbytes, "d2h", stream)
        check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        out = out[:asked]
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise NumericsError("device sampling: final latents", "finite values", f"{bad} NaN/Inf")
        return out

    def close(self) -> None:
        for buf in (self.memory, self.times):
            if buf is not None:
                buf.free()
        self.times = None
        self.engines = self.enc = self.dec = None


def device_sampler(engines) -> DeviceSampler:
    """The engines' device loop, made once per engine set (its buffers, hence its CUDA-graph keys, are fixed)
    and closed with them."""
    return engines.attach("device_loop", lambda: DeviceSampler(engines))


def sample_on_device(engines, noise: np.ndarray, labels: np.ndarray, sampler, schedule: Sequence[int], *,
                     cond_only_outside: bool = True, cuda_graphs: bool = True, progress=None) -> np.ndarray:
    """The device loop on a TensorRT `Engines`, with or without CUDA graphs (whatever loop they chose at load)."""
    return device_sampler(engines).sample(noise, labels, sampler, schedule, cond_only_outside=cond_only_outside,
                                          progress=progress, cuda_graphs=cuda_graphs)
