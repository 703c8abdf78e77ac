"""TensorRT backend: the plans of a `ddt-export build` folder, run through cuda-python. Never imports torch.

Imported only by `load_engines` (through `backends.REGISTRY`) for folders whose manifest says backend
"tensorrt" (tensorrt and cuda.bindings are imported here, lazily, inside functions). `TrtBackend` runs:
- `open(folder, manifest)`: one runner per plan with the host loop's contract
  (`run(feeds) -> outputs`, numpy in and out): inputs are copied into device buffers allocated once for the
  manifest's max batch, `execute_async_v3` on one stream, outputs copied back.
- `device_sampler(engines)` -> `sample_on_device(engines, ...)`, which `runtime.sample` calls on a TensorRT
  folder (the loop is chosen once, at load): the same sampler (same plan of steps, `host.plan_steps`) with the state
  on the GPU: x stays on the device in float32, the encoder's output buffer s is bound as the decoder's input
  (its conditional half by pointer offset, no copy), and CFG + Euler is one small NVRTC kernel. Optional CUDA
  graph per (engine, batch, bindings). Only the ODE step function (the FID configs' sampler).
Every CUDA runtime / driver / NVRTC status and every TensorRT return value goes through `check`.

Plans are tied to the TensorRT version and the GPU they were built on; `check_compatible` compares the
manifest with the running ones and refuses with a hint to rebuild.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import ArtifactError, BackendError, InputError, NumericsError
from ..core.manifest import Manifest
from ..core.specs import SPECS, GraphSpec
from .backends import Capabilities

_STATUS_TYPES = ("cudaError_t", "CUresult", "nvrtcResult")


def _describe(status) -> str:
    from cuda.bindings import driver, nvrtc
    from cuda.bindings import runtime as cudart

    kind = type(status).__name__
    try:
        if kind == "cudaError_t":
            return cudart.cudaGetErrorString(status)[1].decode()
        if kind == "CUresult":
            return driver.cuGetErrorString(status)[1].decode()
        if kind == "nvrtcResult":
            return nvrtc.nvrtcGetErrorString(status)[1].decode()
    except Exception:  # the description is a courtesy; the status name is already in the message
        pass
    return ""


def check(result, what: str):
    """The one status check. cuda-python returns (status, *values): raise unless status is success (0), return
    the value(s). TensorRT returns an object, True, or False/None on failure: raise on the latter."""
    if isinstance(result, tuple) and result and type(result[0]).__name__ in _STATUS_TYPES:
        status, values = result[0], result[1:]
        if int(status) != 0:  # cudaSuccess, CUDA_SUCCESS and NVRTC_SUCCESS are all 0
            raise BackendError(what, "success", f"{getattr(status, 'name', status)} {_describe(status)}".strip())
        return values[0] if len(values) == 1 else (values or None)
    if result is None or result is False:
        raise BackendError(what, "success", "TensorRT reported a failure (see its log above)")
    return result


def _handle(obj) -> int:
    """The address behind a cuda-python object (stream), as TensorRT's execute_async_v3 takes it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # cuda-bindings >= 12.9.1; int() is deprecated there
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


# ------------------------------------------------------------------------------------------ compatibility


def running_platform() -> dict:
    """{"tensorrt", "gpu", "compute_capability"} of this process, as TensorRT provenance records its platform."""
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    dev = check(cudart.cudaGetDevice(), "cudaGetDevice")
    prop = check(cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return {"tensorrt": trt.__version__, "gpu": name, "compute_capability": f"{prop.major}.{prop.minor}"}


def check_compatible(folder: Path, man: Manifest) -> None:
    """TensorRT plans run only on the TensorRT version and GPU they were built with: the provenance decides."""
    running = man.provenance.replace(platform=running_platform())
    diffs = man.provenance.diff(running, ("platform",))
    if diffs:
        raise BackendError(f"TensorRT plans in {folder}", "the TensorRT version and GPU they were built with",
                           "; ".join(diffs), f"rebuild: ddt-export build --precision {man.precision} --force")


# ------------------------------------------------------------------------------------------ device memory


class DeviceBuffer:
    def __init__(self, nbytes: int):
        from cuda.bindings import runtime as cudart

        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart.cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        from cuda.bindings import runtime as cudart

        if self.ptr:
            check(cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


def _copy(dst: int, src: int, nbytes: int, kind: str, stream) -> None:
    from cuda.bindings import runtime as cudart

    k = {"h2d": cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, "d2h": cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
         "d2d": cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice}[kind]
    check(cudart.cudaMemcpyAsync(dst, src, nbytes, k, stream), f"cudaMemcpyAsync {kind} ({nbytes} bytes)")


def _nbytes(spec_tensor, dims, batch: int) -> int:
    return int(np.prod(spec_tensor.shape(dims, batch))) * np.dtype(spec_tensor.dtype).itemsize


# ------------------------------------------------------------------------------------------ one plan


class TrtGraph:
    """One deserialized plan: an execution context, device buffers for max batch, optional CUDA graphs."""

    def __init__(self, runtime, plan: bytes, spec: GraphSpec, dims, max_batch: int, stream,
                 cuda_graphs: bool = False):
        self.spec, self.dims, self.max_batch, self.stream, self.cuda_graphs = spec, dims, max_batch, stream, cuda_graphs
        self.engine = check(runtime.deserialize_cuda_engine(plan), f"deserialize {spec.name}.plan")
        self.context = check(self.engine.create_execution_context(), f"{spec.name}: create_execution_context")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = set(spec.input_names() + spec.output_names())
        if names != want:
            raise ArtifactError(f"{spec.name}.plan", f"I/O tensors {sorted(want)}", sorted(names), "rebuild it")
        self.buffers = {t.name: DeviceBuffer(_nbytes(t, dims, max_batch)) for t in spec.inputs + spec.outputs}
        self._graphs: dict[tuple, tuple] = {}

    def enqueue(self, batch: int, addresses: dict[str, int] | None = None) -> None:
        """Run on the stream with `batch` rows; `addresses` overrides buffers (device pointers owned elsewhere)."""
        from cuda.bindings import runtime as cudart

        if not 1 <= batch <= self.max_batch:
            raise InputError(f"{self.spec.name} batch", f"1..{self.max_batch}", batch)
        addrs = {name: buf.ptr for name, buf in self.buffers.items()}
        addrs.update(addresses or {})
        for t in self.spec.inputs:
            check(self.context.set_input_shape(t.name, t.shape(self.dims, batch)),
                  f"{self.spec.name}: set_input_shape {t.name}")
        for name, ptr in addrs.items():
            check(self.context.set_tensor_address(name, ptr), f"{self.spec.name}: set_tensor_address {name}")
        handle = _handle(self.stream)
        if not self.cuda_graphs:
            check(self.context.execute_async_v3(handle), f"{self.spec.name}: execute_async_v3")
            return
        key = (batch, tuple(sorted(addrs.items())))
        if key not in self._graphs:
            # one ordinary run first, so TensorRT's deferred work (shape-dependent setup) is not captured
            check(self.context.execute_async_v3(handle), f"{self.spec.name}: execute_async_v3")
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            check(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
            check(self.context.execute_async_v3(handle), f"{self.spec.name}: execute_async_v3 (capture)")
            graph = check(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            self._graphs[key] = (graph, check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate"))
        check(cudart.cudaGraphLaunch(self._graphs[key][1], self.stream), "cudaGraphLaunch")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The host loop's runner contract: numpy in, numpy out (one host copy each way)."""
        from cuda.bindings import runtime as cudart

        batch = len(feeds[self.spec.inputs[0].name])
        if batch > self.max_batch:
            raise InputError(f"{self.spec.name} batch", f"<= {self.max_batch}", batch)
        keep = []  # host arrays must outlive the async copies
        for t in self.spec.inputs:
            a = np.ascontiguousarray(feeds[t.name], dtype=t.dtype)
            keep.append(a)
            _copy(self.buffers[t.name].ptr, a.ctypes.data, a.nbytes, "h2d", self.stream)
        self.enqueue(batch)
        outs = {t.name: np.empty(t.shape(self.dims, batch), t.dtype) for t in self.spec.outputs}
        for name, a in outs.items():
            _copy(a.ctypes.data, self.buffers[name].ptr, a.nbytes, "d2h", self.stream)
        check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outs

    def close(self) -> None:
        from cuda.bindings import runtime as cudart

        for graph, exe in self._graphs.values():
            check(cudart.cudaGraphExecDestroy(exe), "cudaGraphExecDestroy")
            check(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
        self._graphs.clear()
        for buf in self.buffers.values():
            buf.free()


class TrtBackend:
    """The `tensorrt` backend: one runner per plan on one CUDA stream; a device-resident sampler (ODE)."""

    name = "tensorrt"
    capabilities = Capabilities(device_loop=True, device_step_fns=("ode",))

    def __init__(self, folder: Path, manifest: Manifest):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        check_compatible(Path(folder), manifest)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = check(trt.Runtime(self.logger), "trt.Runtime")
        self.stream = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                            "cudaStreamCreateWithFlags")

    def open(self, folder: Path, manifest: Manifest) -> dict[str, "TrtGraph"]:
        return {name: TrtGraph(self.runtime, (Path(folder) / rec.file).read_bytes(), SPECS[name], manifest.dims,
                               manifest.batch.max, self.stream)
                for name, rec in manifest.graphs.items() if name in SPECS}

    def describe(self) -> str:
        return "tensorrt"

    def device_sampler(self, engines) -> "DeviceSampler":
        return DeviceSampler(engines)

    def close(self) -> None:
        from cuda.bindings import runtime as cudart

        if self.stream is not None:
            check(cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None


class DeviceSampler:
    """`runtime.sample` on a TensorRT `Engines` with x and s resident on the GPU (see `sample_on_device`)."""

    def __init__(self, engines):
        self.engines = engines

    def sample(self, noise, labels, sampler, schedule, *, cond_only_outside: bool = True, progress=None):
        return sample_on_device(self.engines, noise, labels, sampler, schedule,
                                cond_only_outside=cond_only_outside, progress=progress)

    def close(self) -> None:
        self.engines = None


# ------------------------------------------------------------------------------------------ device-resident loop

_KERNEL = rb"""
extern "C" __global__ void cfg_euler(float* x, const float* v, int n, float scale, float dt, int cfg) {
    // x (B rows) += dt * v, v = v_u + scale * (v_c - v_u) with v = [v_u; v_c] when cfg, else v (B rows).
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float vi = cfg ? v[i] + scale * (v[i + n] - v[i]) : v[i];
    x[i] = x[i] + vi * dt;
}
"""


def kernel_ptx(arch: str) -> bytes:
    """The CFG/Euler kernel as PTX for compute_<arch> (e.g. "90"), by NVRTC (no GPU needed), without fused
    multiply-add, so it rounds as the numpy host loop does."""
    from cuda.bindings import nvrtc

    try:
        prog = check(nvrtc.nvrtcCreateProgram(_KERNEL, b"ddt_cfg_euler.cu", 0, [], []), "nvrtcCreateProgram")
    except (OSError, RuntimeError) as e:  # libnvrtc not found
        raise BackendError("NVRTC (device sampling)", "libnvrtc loadable", repr(e),
                           "pip install nvidia-cuda-nvrtc-cu12 (or a CUDA toolkit), or use runtime.sample")
    opts = [b"--fmad=false", f"--gpu-architecture=compute_{arch}".encode()]
    status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if int(status[0]) != 0:
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        raise BackendError("NVRTC compile of the CFG/Euler kernel", "success", log.decode(errors="replace").strip())
    size = check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
    ptx = b" " * size
    check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    return ptx


@functools.cache
def _load_kernel():
    """PTX for this GPU -> CUfunction, compiled and loaded once per process (in the primary context, which every
    call here uses): loading it per `sample_on_device` call compiled again and leaked a module each time."""
    from cuda.bindings import driver

    ptx = kernel_ptx(running_platform()["compute_capability"].replace(".", ""))
    image = np.char.array(ptx)  # as cuda-python's own examples hand PTX to the driver
    module = check(driver.cuModuleLoadData(image.ctypes.data), "cuModuleLoadData")
    return check(driver.cuModuleGetFunction(module, b"cfg_euler"), "cuModuleGetFunction")


def sample_on_device(engines, noise: np.ndarray, labels: np.ndarray, sampler, schedule: Sequence[int], *,
                     cond_only_outside: bool = True, cuda_graphs: bool = True, progress=None) -> np.ndarray:
    """`runtime.sample` for a TensorRT `Engines`, with x and s resident on the GPU (ODE sampler only)."""
    from cuda.bindings import driver
    from cuda.bindings import runtime as cudart

    from .host import check_inputs, plan_steps

    enc, dec = engines.runner("encoder"), engines.runner("decoder")
    if not isinstance(enc, TrtGraph) or not isinstance(dec, TrtGraph):
        raise BackendError("device sampling", "engines loaded from a TensorRT folder", engines.backend_name)
    if sampler.step_fn != "ode":
        raise InputError("sampler.step_fn for device sampling", "ode", sampler.step_fn, "use runtime.sample")
    x_host, labels = check_inputs(engines, noise, labels)
    b, m = len(labels), engines.config.model
    if 2 * b > enc.max_batch:
        raise InputError("batch for device sampling", f"2 x B <= {enc.max_batch} (engine max batch)", 2 * b)
    enc.cuda_graphs = dec.cuda_graphs = cuda_graphs
    stream, kernel = enc.stream, _load_kernel()
    row = int(np.prod(m.latent_shape)) * 4  # bytes of one latent row, float32
    s_row = m.num_tokens * m.hidden_size * 4
    x = DeviceBuffer(b * row)
    y_cfg = np.concatenate([np.full(b, m.null_class, np.int64), labels])  # [uncond; cond]
    y_dev = DeviceBuffer(y_cfg.nbytes)
    try:
        _copy(x.ptr, x_host.ctypes.data, x_host.nbytes, "h2d", stream)
        _copy(y_dev.ptr, y_cfg.ctypes.data, y_cfg.nbytes, "h2d", stream)
        s_uncond = False
        t_host = np.empty(2 * b, np.float32)
        for st in plan_steps(sampler, schedule, cond_only_outside):
            if st.recompute:
                rows = 2 * b if st.enc_uncond else b
                t_host[:] = st.t
                _copy(enc.buffers["t"].ptr, t_host.ctypes.data, rows * 4, "h2d", stream)
                for half in range(rows // b):  # x into every half of the encoder's x buffer
                    _copy(enc.buffers["x"].ptr + half * b * row, x.ptr, b * row, "d2d", stream)
                enc.enqueue(rows, {"y": y_dev.ptr if st.enc_uncond else y_dev.ptr + b * 8})
                s_uncond = st.enc_uncond
                check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")  # t_host is reused next step
            s_ptr = enc.buffers["s"].ptr
            if st.dec_uncond:
                for half in range(2):
                    _copy(dec.buffers["x"].ptr + half * b * row, x.ptr, b * row, "d2d", stream)
                dec.enqueue(2 * b, {"s": s_ptr})  # s: (2B, L, D), the encoder's own output buffer
            else:
                dec.enqueue(b, {"x": x.ptr, "s": s_ptr + (b * s_row if s_uncond else 0)})  # cond half, by offset
            n = b * row // 4
            values = [np.array([x.ptr], np.uint64), np.array([dec.buffers["v"].ptr], np.uint64),
                      np.array([n], np.int32), np.array([st.scale], np.float32), np.array([st.dt], np.float32),
                      np.array([int(st.dec_uncond)], np.int32)]  # cfg_euler's arguments, in order
            params = np.array([v.ctypes.data for v in values], np.uint64)  # kernelParams: pointers to them
            check(driver.cuLaunchKernel(kernel, (n + 255) // 256, 1, 1, 256, 1, 1, 0, stream, params.ctypes.data, 0),
                  "cuLaunchKernel cfg_euler")
            if progress is not None:
                progress(st.i + 1, sampler.num_steps)
        out = np.empty_like(x_host)
        _copy(out.ctypes.data, x.ptr, out.nbytes, "d2h", stream)
        check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
    finally:
        x.free()
        y_dev.free()
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise NumericsError("device sampling: final latents", "finite values", f"{bad} NaN/Inf")
    return out
