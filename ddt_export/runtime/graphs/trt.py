"""TensorRT backend: the plans of a `ddt-export build` folder, run through cuda-python. Never imports torch.

Imported only by `load_engines` (through `backends.REGISTRY`) for folders whose manifest says backend
"tensorrt" (tensorrt and cuda.bindings are imported here, lazily, inside functions). `TrtBackend` runs:
- `open(folder, manifest)`: one `TrtGraph` per plan with the host loop's contract (`run(feeds) -> outputs`,
  numpy in and out). Each engine is checked against its spec before anything runs (`trt_plan.engine_problems`:
  names, dtypes, I/O modes, locations, profile batch range); buffers are allocated once for the manifest's max
  batch; the context's output shapes are checked against the buffers before every enqueue.
- and declares `Capabilities(device_loop=True)`: the sampling layer then runs its device-resident loop over
  these graphs (`runtime.sampling.trt_loop.DeviceSampler`, chosen once, at load): x and s stay on the GPU.
CUDA graphs (`enqueue(..., graphs=True)`, the device loop's): one execution context per captured (rows,
bindings) key, all of an engine's contexts sharing one activation-memory allocation (they run in order on one
stream); a capture that fails is ended, its key marked not capturable, and that key runs `execute_async_v3`.
Every CUDA runtime / driver / NVRTC status and every TensorRT return value goes through `check`. The decisions
(alignment, the spec check, the graph plan) are plain functions in `trt_plan`, tested on CPU.

Plans are tied to the TensorRT version and the GPU they were built on; `check_compatible` compares the
manifest with the running ones and refuses with a hint to rebuild.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ...core.errors import ArtifactError, BackendError, InputError
from ...core.manifest import Manifest
from ...core.specs import SPECS, BatchProfile, GraphSpec
from .backends import Capabilities
from .trt_plan import GraphPlan, TensorDesc, aligned, engine_problems, output_problem

log = logging.getLogger("ddt_export.tensorrt")

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


def set_device(device: int) -> None:
    """Make `device`'s primary context current on this thread (a fresh thread has none; driver-API calls such as
    cuModuleLoadData and cuLaunchKernel need one)."""
    from cuda.bindings import runtime as cudart

    check(cudart.cudaSetDevice(device), f"cudaSetDevice({device})")


def compute_capability(device: int) -> str:
    from cuda.bindings import runtime as cudart

    prop = check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return f"{prop.major}.{prop.minor}"


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


def copy(dst: int, src: int, nbytes: int, kind: str, stream) -> None:
    from cuda.bindings import runtime as cudart

    k = {"h2d": cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, "d2h": cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
         "d2d": cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice}[kind]
    check(cudart.cudaMemcpyAsync(dst, src, nbytes, k, stream), f"cudaMemcpyAsync {kind} ({nbytes} bytes)")


def _nbytes(spec_tensor, dims, batch: int) -> int:
    return int(np.prod(spec_tensor.shape(dims, batch))) * np.dtype(spec_tensor.dtype).itemsize


# ------------------------------------------------------------------------------------------ one plan


def engine_io(engine) -> list[TensorDesc]:
    """TensorRT's description of an engine's I/O tensors, in the plain values `trt_plan.engine_problems` reads."""
    import tensorrt as trt

    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        kind = {trt.TensorIOMode.INPUT: "input", trt.TensorIOMode.OUTPUT: "output"}.get(mode, "none")
        dt = engine.get_tensor_dtype(name)
        try:
            dtype = np.dtype(trt.nptype(dt)).name
        except TypeError:  # a TensorRT type numpy has no name for (bf16, fp8): never a runtime I/O dtype here
            dtype = str(dt)
        location = "device" if engine.get_tensor_location(name) == trt.TensorLocation.DEVICE else "host"
        profile = (tuple(tuple(int(v) for v in shape) for shape in engine.get_tensor_profile_shape(name, 0))
                   if kind == "input" else None)
        out.append(TensorDesc(name, dtype, kind, location, tuple(int(v) for v in engine.get_tensor_shape(name)),
                              profile))
    return out


class TrtGraph:
    """One deserialized plan: checked against its spec, device buffers for max batch, execution contexts (a
    shared one for plain enqueues, one per captured CUDA-graph key) over one activation-memory allocation."""

    def __init__(self, runtime, plan: bytes, spec: GraphSpec, dims, batch: BatchProfile, stream):
        import tensorrt as trt

        self.spec, self.dims, self.max_batch, self.stream = spec, dims, batch.max, stream
        self.engine = check(runtime.deserialize_cuda_engine(plan), f"deserialize {spec.name}.plan")
        problems = engine_problems(spec, dims, batch.min, batch.max, engine_io(self.engine))
        if problems:
            raise ArtifactError(f"{spec.name}.plan", f"an engine with the {spec.name} I/O spec and batch {batch}",
                                "; ".join(problems), "rebuild it: ddt-export build --force")
        self._strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.scratch = DeviceBuffer(self.engine.device_memory_size_v2)
        self.buffers: dict[str, DeviceBuffer] = {}
        self._keyed: dict[tuple, tuple] = {}  # graph key -> (its context, cudaGraphExec_t)
        self.plan = GraphPlan()
        self.context = self._new_context()
        self.buffers = {t.name: DeviceBuffer(_nbytes(t, dims, batch.max)) for t in spec.inputs + spec.outputs}

    def _new_context(self):
        ctx = check(self.engine.create_execution_context(self._strategy), f"{self.spec.name}: create_execution_context")
        ctx.set_device_memory(self.scratch.ptr, self.scratch.nbytes)  # shared: every context runs on self.stream
        return ctx

    def _bind(self, ctx, rows: int, addrs: dict[str, tuple[int, int]]) -> None:
        """Input shapes for `rows`, every tensor's address (aligned, checked), outputs checked against buffers."""
        for t in self.spec.inputs:
            check(ctx.set_input_shape(t.name, t.shape(self.dims, rows)), f"{self.spec.name}: set_input_shape {t.name}")
        for name, (ptr, _) in addrs.items():
            if not aligned(ptr):
                raise BackendError(f"{self.spec.name}: address of {name}", "256-byte aligned", hex(ptr))
            check(ctx.set_tensor_address(name, ptr), f"{self.spec.name}: set_tensor_address {name}")
        for t in self.spec.outputs:
            why = output_problem(t.name, tuple(ctx.get_tensor_shape(t.name)), t.shape(self.dims, rows),
                                 addrs[t.name][1], np.dtype(t.dtype).itemsize)
            if why:
                raise ArtifactError(f"{self.spec.name}.plan", "outputs that fit their buffers", why, "rebuild it")

    def enqueue(self, rows: int, addresses: dict[str, tuple[int, int]] | None = None, graphs: bool = False) -> None:
        """Run on the stream with `rows` rows; `addresses` overrides buffers: {name: (device pointer, bytes)} owned
        elsewhere. `graphs`: capture once per (rows, bindings) and replay (the device loop's buffers are fixed)."""
        from cuda.bindings import runtime as cudart

        if not 1 <= rows <= self.max_batch:
            raise InputError(f"{self.spec.name} batch", f"1..{self.max_batch}", rows)
        addrs = {name: (buf.ptr, buf.nbytes) for name, buf in self.buffers.items()}
        addrs.update(addresses or {})
        key = (rows, tuple(sorted((name, ptr) for name, (ptr, _) in addrs.items())))
        action = self.plan.action(key) if graphs else "plain"
        if action == "capture":
            ctx = self._new_context()
            self._bind(ctx, rows, addrs)  # once: this context keeps these shapes and addresses
            # one ordinary run first, so TensorRT's deferred shape-dependent work is not what gets captured
            check(ctx.execute_async_v3(_handle(self.stream)), f"{self.spec.name}: execute_async_v3")
            action = self._capture(key, ctx)
        if action == "replay":
            check(cudart.cudaGraphLaunch(self._keyed[key][1], self.stream), "cudaGraphLaunch")
            return
        self._bind(self.context, rows, addrs)
        check(self.context.execute_async_v3(_handle(self.stream)), f"{self.spec.name}: execute_async_v3")

    def _capture(self, key: tuple, ctx) -> str:
        """Capture one enqueue of `ctx`. The capture is ended whatever happens (a stream left capturing fails every
        later call and hides the first error); the cudaGraph_t is destroyed once instantiated. Returns the plan's
        verdict: "replay", or "plain" with the key marked not capturable."""
        from cuda.bindings import runtime as cudart

        errors = {"enqueue_error": "", "end_error": "", "instantiate_error": ""}
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        graph = exe = None
        try:
            if not ctx.execute_async_v3(_handle(self.stream)):
                errors["enqueue_error"] = "execute_async_v3 returned False during capture"
        except Exception as e:  # noqa: BLE001 - decided below: the key falls back, the stream must leave capture
            errors["enqueue_error"] = repr(e)
        finally:
            err, graph = cudart.cudaStreamEndCapture(self.stream)
            if int(err) != 0:
                errors["end_error"], graph = getattr(err, "name", str(err)), None
        if graph is not None and not errors["enqueue_error"]:
            err, exe = cudart.cudaGraphInstantiate(graph, 0)
            if int(err) != 0:
                errors["instantiate_error"], exe = getattr(err, "name", str(err)), None
        if graph is not None:
            check(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")  # the executable graph stands alone
        verdict = self.plan.capture_result(key, **errors)
        if verdict == "replay":
            self._keyed[key] = (ctx, exe)
        else:
            cudart.cudaGetLastError()  # clear the (non-sticky) capture error before the plain enqueue
            log.warning("%s: CUDA graph capture failed for %d rows (%s); running execute_async_v3 for it",
                        self.spec.name, key[0], self.plan.failed[key])
        return verdict

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
            copy(self.buffers[t.name].ptr, a.ctypes.data, a.nbytes, "h2d", self.stream)
        self.enqueue(batch)
        outs = {t.name: np.empty(t.shape(self.dims, batch), t.dtype) for t in self.spec.outputs}
        for name, a in outs.items():
            copy(a.ctypes.data, self.buffers[name].ptr, a.nbytes, "d2h", self.stream)
        check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outs

    def close(self) -> None:
        """Graphs, then contexts, then the memory they used, then the engine; idempotent."""
        from cuda.bindings import runtime as cudart

        for _, exe in self._keyed.values():
            check(cudart.cudaGraphExecDestroy(exe), "cudaGraphExecDestroy")
        self._keyed.clear()
        self.context = None  # the last reference: TensorRT destroys the context
        for buf in [*self.buffers.values(), self.scratch]:
            buf.free()
        self.engine = None


class TrtBackend:
    """The `tensorrt` backend: one runner per plan on one CUDA stream; a device-resident sampler (ODE)."""

    name = "tensorrt"
    capabilities = Capabilities(device_loop=True, device_step_fns=("ode",))

    def __init__(self, folder: Path, manifest: Manifest):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        check_compatible(Path(folder), manifest)
        self.device = int(check(cudart.cudaGetDevice(), "cudaGetDevice"))  # every later call sets it current
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = check(trt.Runtime(self.logger), "trt.Runtime")
        self.stream = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                            "cudaStreamCreateWithFlags")

    def open(self, folder: Path, manifest: Manifest) -> dict[str, TrtGraph]:
        runners: dict[str, TrtGraph] = {}
        try:
            for name, rec in manifest.graphs.items():
                if name in SPECS:
                    runners[name] = TrtGraph(self.runtime, (Path(folder) / rec.file).read_bytes(), SPECS[name],
                                             manifest.dims, manifest.batch, self.stream)
        except BaseException:
            for r in runners.values():
                r.close()
            raise
        return runners

    def describe(self) -> str:
        return "tensorrt"

    def close(self) -> None:
        from cuda.bindings import runtime as cudart

        if self.stream is not None:
            check(cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None
        self.runtime = None
