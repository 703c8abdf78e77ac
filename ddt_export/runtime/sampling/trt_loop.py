"""The device-resident sampling loop of a TensorRT `Engines`: x and s stay on the GPU. Never imports torch.

`DeviceSampler` is what `runtime.sample` runs on a TensorRT folder (chosen once, at load: `Engines.loop`), made
once per engine set and attached to it (`device_sampler`), closed with it. It runs the host loop's plan of
steps (`plan.plan_steps`, so the same rows and the same CFG) and the step's update rule (`step.update`, and the
encoder-state forecast of `step.decoder_feeds`) in kernels, with:
- its buffers allocated once per engine set and freed in `close()` (after the stream is drained): x (B rows),
  the labels `[uncond; cond]` and the conditional labels alone, each on a 256-byte aligned offset
  (`trt_plan.pack`), and the step-time table (grown when a longer trajectory asks for more);
- the graph calls, their bindings and device-to-device copies decided by `trt_plan.loop_calls` from those
  fixed addresses (so the CUDA-graph keys are bounded per engine set); all step times uploaded once per call
  (`trt_plan.time_table`), with no host sync inside the loop;
- the encoder's s buffer bound as the decoder's input where a step reuses the last state, its conditional half
  by pointer offset where that offset is aligned, else copied device-to-device (`trt_plan.s_half`); a forecast
  state is written into the decoder's own s buffer;
- the batch padded to the engines' batch.min (copies of the last sample, dropped after) or refused past
  batch.max before anything runs (`trt_plan.device_batch`);
- the update rule in one place: `KERNEL_SOURCE` (the kernels: CFG + Euler, the ODE step function; CFG +
  `adams:K`; the encoder-state forecast) and `graphs.trt_update` (which kernel a step runs, with which
  arguments: `update_launch`, `state_ops`), so the device loop runs every sampling plan the host loop runs
  (every solver, forecast, schedule and cond-only row; the SDE step functions stay on the host loop);
- the fast-sampling histories in device rings (`trt_update.History`: `order` velocity slots of B rows and
  `forecast + 1` state slots of B x L x D per CFG half), allocated for the engine set's largest batch on the
  first call that needs them, grown (never shrunk) when a call asks a higher order or forecast, freed in
  `close()`; Euler with forecast 0 allocates none and copies nothing more than before;
- the kernels compiled by NVRTC without FMA (they round as the numpy host loop does) to a cubin for the GPU's own
  architecture (`trt_plan.kernel_target`; PTX only where this NVRTC has no cubin for it, with a warning),
  loaded once per process and device, after `cudaSetDevice` (a fresh thread has no current context);
- the backend's lock held for the whole call (the loop writes the runners' own buffers: `trt.SharedStream`);
- CUDA graphs per (rows, bindings) key on the runners' own contexts (`TrtGraph.enqueue(graphs=True)`), asked
  per call: the runners' other users (the host loop contract) never see them switched on.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np

from ...core.errors import BackendError, InputError, NumericsError
from ..graphs import gpu
from ..graphs.gpu import check
from ..graphs.trt import TrtGraph
from ..graphs.trt_plan import (KernelTarget, LoopLayout, device_batch, kernel_target, loop_calls, loop_updates, pack,
                               s_half, time_table)
from ..graphs.trt_update import History, Launch, history_of, history_regions
from .plan import plan_steps
from .step import check_inputs

log = logging.getLogger("ddt_export.tensorrt")

# The device loop's update rule: every kernel it runs. Compiled with --fmad=false, so each operation rounds once,
# in this order, as numpy does in `core.sampling` and `runtime.sampling.step` (cfg_combine: v_u + scale * (v_c -
# v_u); ode: x + v * dt; combine: zeros, then out += w_j * v_j oldest first). Which kernel a step runs, with which
# arguments: `graphs.trt_update` (update_launch, state_ops); their numpy restatements: tests/kernel_restatements.py.
KERNEL_SOURCE = rb"""
extern "C" __global__ void cfg_euler(float* x, const float* v, int n, float scale, float dt, int cfg) {
    // x (B rows) += dt * v, v = v_u + scale * (v_c - v_u) with v = [v_u; v_c] when cfg, else v (B rows).
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float vi = cfg ? v[i] + scale * (v[i + n] - v[i]) : v[i];
    x[i] = x[i] + vi * dt;
}

extern "C" __global__ void cfg_adams(float* x, const float* v, float* put, const float* h0, const float* h1,
                                     const float* h2, int n, float scale, float dt, int cfg, int k, float c0,
                                     float c1, float c2, float cn) {
    // adams:K. vi: the guided velocity, as in cfg_euler, kept in the history slot `put`. Then x += u * dt with
    // u = c0 h0 + ... + cn vi over the last k velocities oldest first (h0.. the k - 1 older ones), summed from
    // zero; k = 1 (the first step) is u = vi itself, as core.sampling.combine returns a lone velocity.
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float vi = cfg ? v[i] + scale * (v[i + n] - v[i]) : v[i];
    put[i] = vi;
    float u = vi;
    if (k > 1) {
        u = 0.0f;
        u = u + c0 * h0[i];
        if (k > 2) u = u + c1 * h1[i];
        if (k > 3) u = u + c2 * h2[i];
        u = u + cn * vi;
    }
    x[i] = x[i] + u * dt;
}

extern "C" __global__ void forecast(float* s, const float* s0, const float* s1, const float* s2, int n, int k,
                                    float w0, float w1, float w2) {
    // One CFG half of the decoder's s: w0 s0 + w1 s1 (+ w2 s2 when k = 3) over the half's last k recomputed
    // encoder states, oldest first, summed from zero.
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float u = 0.0f;
    u = u + w0 * s0[i];
    u = u + w1 * s1[i];
    if (k > 2) u = u + w2 * s2[i];
    s[i] = u;
}
"""
KERNELS = ("cfg_euler", "cfg_adams", "forecast")  # the entry points of KERNEL_SOURCE, looked up once per device
THREADS = 256


def launch(kernels: dict, what: Launch, stream) -> None:
    from cuda.bindings import driver

    values = [np.array([a]) for a in what.args]  # kernelParams: one pointer to each argument's value
    params = np.array([a.ctypes.data for a in values], np.uint64)
    check(driver.cuLaunchKernel(kernels[what.kernel], (what.n + THREADS - 1) // THREADS, 1, 1, THREADS, 1, 1, 0,
                                stream, params.ctypes.data, 0), f"cuLaunchKernel {what.kernel}")


# ------------------------------------------------------------------------------------------ NVRTC


def _nvrtc():
    try:
        from cuda.bindings import nvrtc

        nvrtc.nvrtcVersion()
    except (ImportError, OSError, RuntimeError) as e:  # no cuda-python, or libnvrtc not found
        raise BackendError("NVRTC (device sampling)", "cuda-python and libnvrtc loadable", repr(e),
                           "install the NVRTC wheel of your CUDA major (the [tensorrt-cu12] / [tensorrt-cu13] extra)")
    return nvrtc


def supported_archs() -> list[int]:
    """The architectures this NVRTC compiles for (nvrtcGetSupportedArchs: 75, 80, ...)."""
    return [int(a) for a in check(_nvrtc().nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")]


def compile_kernel(target: KernelTarget) -> bytes:
    """KERNEL_SOURCE by NVRTC (no GPU needed) for `target`: a cubin (ELF, nvrtcGetCUBIN) or PTX (nvrtcGetPTX,
    NUL-terminated), without fused multiply-add. A compile error raises with NVRTC's log; the program is
    destroyed whatever happens."""
    nvrtc = _nvrtc()
    prog = check(nvrtc.nvrtcCreateProgram(KERNEL_SOURCE, b"ddt_update.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [b"--fmad=false", target.option.encode()]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(status[0]) != 0:
            size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            text = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, text), "nvrtcGetProgramLog")
            raise BackendError(f"NVRTC compile of the device loop's kernels ({target.option})", "success",
                               text.decode(errors="replace").strip(" \x00"))
        get_size, get = ((nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if target.kind == "cubin"
                         else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
        image = b" " * check(get_size(prog), f"{get_size.__name__}")
        check(get(prog, image), get.__name__)  # writes into `image`, as cuda-python's own examples do
        return image
    finally:
        check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")


def kernel_ptx(arch: str | int) -> bytes:
    """The kernels as PTX for compute_<arch> (read by the tests: the operation order, no FMA)."""
    return compile_kernel(KernelTarget("ptx", int(arch)))


@functools.cache
def load_kernel(device: int) -> tuple[dict, KernelTarget]:
    """({entry point: CUfunction}, how it was built), once per process and device, in the device's primary
    context (made current first: cuModuleLoadData is a driver call and a fresh thread has no current context)."""
    from cuda.bindings import driver

    gpu.set_device(device)
    target = kernel_target(gpu.compute_capability(device), supported_archs())
    if target.note:
        log.warning("device loop kernel on device %d: %s", device, target.note)
    image = np.frombuffer(compile_kernel(target), np.uint8)  # kept alive until the driver has read it
    module = check(driver.cuModuleLoadData(image.ctypes.data), f"cuModuleLoadData ({target.kind})")
    return {k: check(driver.cuModuleGetFunction(module, k.encode()), f"cuModuleGetFunction {k}")
            for k in KERNELS}, target


# ------------------------------------------------------------------------------------------ the loop


class DeviceSampler:
    """`runtime.sample` on a TensorRT `Engines` with x and s resident on the GPU; owns its device buffers."""

    def __init__(self, engines):
        enc, dec = engines.runner("encoder"), engines.runner("decoder")
        if not isinstance(enc, TrtGraph) or not isinstance(dec, TrtGraph):
            raise BackendError("device sampling", "engines loaded from a TensorRT folder", engines.backend_name)
        self.engines, self.enc, self.dec, self.device = engines, enc, dec, enc.device
        m = engines.config.model
        self.samples = engines.max_batch // 2  # the CFG batch is 2 rows per sample
        self.row = int(np.prod(m.latent_shape)) * 4  # bytes of one latent row, float32
        self.tokens, self.hidden = m.num_tokens, m.hidden_size
        self.offsets, total = pack({"x": self.samples * self.row, "y_cfg": 2 * self.samples * 8,
                                    "y_cond": self.samples * 8})
        with enc.lock, dec.lock:
            gpu.set_device(self.device)
            self.memory = gpu.DeviceBuffer(total)
        self.times: gpu.DeviceBuffer | None = None  # the step-time table, grown on demand
        self.history: gpu.DeviceBuffer | None = None  # the rings of the fast-sampling plans, grown on demand
        self.history_size, self.history_offsets = (1, 0), {}  # the (order, forecast) they hold; their slots

    def ptr(self, region: str) -> int:
        return self.memory.ptr + self.offsets[region]

    def layout(self, b: int, stride: int, hist: History = History()) -> LoopLayout:
        bufs = {g: {n: (buf.ptr, buf.nbytes) for n, buf in r.buffers.items()} for g, r in
                (("encoder", self.enc), ("decoder", self.dec))}
        return LoopLayout(b, self.row, self.ptr("x"), self.ptr("y_cfg"), self.ptr("y_cond"), self.times.ptr, stride,
                          bufs["encoder"], bufs["decoder"], s_half(b, self.tokens, self.hidden), hist)

    def rings(self, order: int, forecast: int) -> History:
        """The history rings of a call with this solver order and forecast, for the engine set's largest batch:
        allocated by the first call that needs them, reallocated larger (never smaller) when a call asks more
        than any before (a bounded number of times: order <= 4, forecast <= 2), so later calls reuse them.
        Called under the lock, after the previous call's stream was synchronized."""
        have = self.history_size
        want = (max(have[0], order), max(have[1], forecast))
        if want != have:
            if self.history is not None:  # freed first: an allocation that fails leaves none, and says so
                self.history.free()
                self.history, self.history_size = None, (1, 0)
            offsets, total = pack(history_regions(self.samples, self.row, self.tokens * self.hidden * 4, *want))
            self.history = gpu.DeviceBuffer(total)
            self.history_size, self.history_offsets = want, offsets
        if order <= 1 and not forecast:
            return History()
        return history_of(self.history.ptr, self.history_offsets, order, forecast)

    def sample(self, noise, labels, sampler, schedule: Sequence[int], *, cond_only_outside: bool = True,
               progress=None, cuda_graphs: bool = True) -> np.ndarray:
        if sampler.step_fn != "ode":
            raise InputError("sampler.step_fn for device sampling", "ode", sampler.step_fn, "use the host loop")
        if self.enc is None:
            raise BackendError("device sampling", "open engines", "closed")
        x_host, labels = check_inputs(self.engines, noise, labels)
        asked = len(labels)
        b = device_batch(asked, self.engines.min_batch, self.engines.max_batch)
        if b > asked:  # rows are independent: the copies change nothing for the real samples
            x_host = np.concatenate([x_host, np.repeat(x_host[-1:], b - asked, axis=0)])
            labels = np.concatenate([labels, np.repeat(labels[-1:], b - asked)])
        steps = plan_steps(sampler, schedule, cond_only_outside)
        with self.enc.lock, self.dec.lock:  # the backend's lock (one per backend): no runner call in between
            gpu.set_device(self.device)  # this thread may be new
            stream = self.enc.stream
            try:
                out = self._run(x_host, labels, steps, b, cuda_graphs, progress, sampler)
            except BaseException:
                gpu.drain(stream)  # the queued copies read host arrays of this frame
                raise
        out = out[:asked]
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise NumericsError("device sampling: final latents", "finite values", f"{bad} NaN/Inf")
        return out

    def _run(self, x_host, labels, steps, b, cuda_graphs, progress, sampler) -> np.ndarray:
        kernels, _ = load_kernel(self.device)
        stream, runners = self.enc.stream, {"encoder": self.enc, "decoder": self.dec}
        table, stride = time_table([st.t for st in steps if st.recompute], 2 * b)
        if self.times is None or self.times.nbytes < table.nbytes:
            if self.times is not None:
                self.times.free()
                self.times = None
            self.times = gpu.DeviceBuffer(table.nbytes)
        lay = self.layout(b, stride, self.rings(sampler.order, sampler.forecast))
        y_cfg = np.concatenate([np.full(b, self.engines.config.model.null_class, np.int64), labels])
        for dst, src in ((lay.x, x_host), (lay.y_cfg, y_cfg), (lay.y_cond, labels), (lay.times, table)):
            gpu.copy(dst, src.ctypes.data, src.nbytes, "h2d", stream)  # host arrays live until the sync below
        for st, calls, update in zip(steps, loop_calls(steps, lay), loop_updates(steps, lay)):
            for c in calls:
                for dst, src, nbytes in c.copies:
                    gpu.copy(dst, src, nbytes, "d2d", stream)
                for what in c.kernels:  # the forecast of s, into the decoder's own s buffer
                    launch(kernels, what, stream)
                runners[c.graph].enqueue(c.rows, c.bind, graphs=cuda_graphs)
            launch(kernels, update, stream)  # the CFG combine and the update rule of x
            if progress is not None:
                progress(st.i + 1, sampler.num_steps)
        out = np.empty_like(x_host)
        gpu.copy(out.ctypes.data, lay.x, out.nbytes, "d2h", stream)
        gpu.synchronize(stream)
        return out

    def close(self) -> None:
        """Drain the stream (an exception or Ctrl-C may have left work queued on these buffers), then free them;
        idempotent."""
        if self.enc is None:
            return
        with self.enc.lock, self.dec.lock:
            gpu.set_device(self.device)
            gpu.drain(self.enc.stream)
            for buf in (self.memory, self.times, self.history):
                if buf is not None:
                    buf.free()
            self.times = self.history = None
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
