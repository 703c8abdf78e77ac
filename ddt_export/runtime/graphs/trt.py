"""TensorRT backend: the plans of a `ddt-export build` folder, run through cuda-python. Never imports torch.

Imported only by `load_engines` (through `backends.REGISTRY`) for folders whose manifest says backend
"tensorrt" (tensorrt is imported here, lazily, inside functions; every CUDA call goes through `gpu`).
`TrtBackend` runs:
- `open(folder, manifest)`: one `TrtGraph` per plan with the host loop's contract (`run(feeds) -> outputs`,
  numpy in and out, safe from several threads). Each engine is checked against its spec before anything runs
  (`trt_plan.engine_problems`: names, dtypes, I/O modes, locations, profile batch range); buffers are
  allocated once for the manifest's max batch; the context's output shapes are checked against the buffers
  before every enqueue;
- and declares `Capabilities(device_loop=True)`: the sampling layer then runs its device-resident loop over
  these graphs (`runtime.sampling.trt_loop.DeviceSampler`, chosen once, at load): x and s stay on the GPU.
Threads: all runners of a backend share one CUDA stream, one device and one lock (`SharedStream`); every
`run`, `enqueue`, `close` and the whole device loop hold that lock (why one lock and not a context per thread:
`SharedStream`).
CUDA graphs (`enqueue(..., graphs=True)`, the device loop's): one execution context per captured (rows,
bindings) key, all of an engine's contexts sharing one activation-memory allocation (they run in order on one
stream); a capture that fails is ended, its key marked not capturable, and that key runs `execute_async_v3`.
Every CUDA runtime / driver / NVRTC status and every TensorRT return value goes through `gpu.check`. The
decisions (alignment, the spec check, the graph plan) are plain functions in `trt_plan`, tested on CPU.

Plans are tied to the TensorRT version and the GPU they were built on; `check_compatible` compares the
manifest with the running ones and refuses with a hint to rebuild.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...core.errors import ArtifactError, BackendError, InputError
from ...core.manifest import Manifest
from ...core.specs import SPECS, BatchProfile, GraphSpec
from . import gpu
from .backends import Capabilities
from .gpu import check
from .trt_plan import GraphPlan, TensorDesc, aligned, engine_problems, graph_key, output_problem

log = logging.getLogger("ddt_export.tensorrt")


# ------------------------------------------------------------------------------------------ compatibility


def running_platform() -> dict:
    """{"tensorrt", "gpu", "compute_capability"} of this process, as TensorRT provenance records its platform."""
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    prop = check(cudart.cudaGetDeviceProperties(gpu.current_device()), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return {"tensorrt": trt.__version__, "gpu": name, "compute_capability": f"{prop.major}.{prop.minor}"}


def check_compatible(folder: Path, man: Manifest) -> None:
    """TensorRT plans run only on the TensorRT version and GPU they were built with: the provenance decides."""
    running = man.provenance.replace(platform=running_platform())
    diffs = man.provenance.diff(running, ("platform",))
    if diffs:
        raise BackendError(f"TensorRT plans in {folder}", "the TensorRT version and GPU they were built with",
                           "; ".join(diffs), f"rebuild: ddt-export build --precision {man.precision} --force")


# ------------------------------------------------------------------------------------------ one plan


def _nbytes(spec_tensor, dims, batch: int) -> int:
    return int(np.prod(spec_tensor.shape(dims, batch))) * np.dtype(spec_tensor.dtype).itemsize


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



@dataclass(frozen=True)
class SharedStream:
    """What a backend's runners share: one CUDA stream, the device it lives on, and the lock that serializes them.

    `GraphRunner.run` must be safe from several threads (serve's batch loop and a `dp:K` template trajectory
    call the same runners). A TensorRT execution context, its bound I/O buffers and its stream are not: two
    unsynchronized callers read each other's inputs and outputs with no error raised. One re-entrant lock per
    backend serializes every `run`, `enqueue`, `close` and the whole device loop, rather than a context, buffer
    set and stream per thread, because: all runners already share one stream, so the GPU runs their work in
    order anyway and a per-runner lock would buy only host-side overlap; the device loop writes into the
    runners' own I/O buffers across several graph calls, so it must exclude every runner of the backend at once;
    and per-thread contexts would multiply the activation memory (`device_memory_size_v2`), the buffers for the
    max batch and the CUDA graphs by the number of threads that ever call, for a server whose second caller is
    an occasional template trajectory."""

    handle: object  # cudaStream_t
    device: int
    lock: object  # threading.RLock


class TrtGraph:
    """One deserialized plan: checked against its spec, device buffers for max batch, execution contexts (a
    shared one for plain enqueues, one per captured CUDA-graph key) over one activation-memory allocation.
    A `GraphRunner`: `run` and `close` take the backend's lock (`SharedStream`)."""

    def __init__(self, runtime, plan: bytes, spec: GraphSpec, dims, batch: BatchProfile, shared: SharedStream):
        import tensorrt as trt

        self.spec, self.dims, self.max_batch = spec, dims, batch.max
        self.stream, self.device, self.lock = shared.handle, shared.device, shared.lock
        self.engine = self.context = self.scratch = None
        self.buffers: dict[str, gpu.DeviceBuffer] = {}
        self._keyed: dict[tuple, tuple] = {}  # graph key -> (its context, cudaGraphExec_t or None: capture failed)
        self.plan = GraphPlan()
        try:  # a failure part-way (a bad plan, an OOM on a later buffer) frees what was made before it
            self.engine = check(runtime.deserialize_cuda_engine(plan), f"deserialize {spec.name}.plan")
            problems = engine_problems(spec, dims, batch.min, batch.max, engine_io(self.engine))
            if problems:
                raise ArtifactError(f"{spec.name}.plan", f"an engine with the {spec.name} I/O spec and batch {batch}",
                                    "; ".join(problems), "rebuild it: ddt-export build --force")
            self._strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            self.scratch = gpu.DeviceBuffer(self.engine.device_memory_size_v2)
            self.context = self._new_context()
            for t in spec.inputs + spec.outputs:
                self.buffers[t.name] = gpu.DeviceBuffer(_nbytes(t, dims, batch.max))
        except BaseException:
            self._release()
            raise

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

    def _execute(self, ctx) -> None:
        check(ctx.execute_async_v3(gpu.native_handle(self.stream)), f"{self.spec.name}: execute_async_v3")

    def enqueue(self, rows: int, addresses: dict[str, tuple[int, int]] | None = None, graphs: bool = False) -> None:
        """Run the engine once on the stream with `rows` rows; `addresses` overrides buffers: {name: (device
        pointer, bytes)} owned elsewhere. `graphs`: capture once per (rows, bindings) and replay (the device
        loop's buffers are fixed). The caller holds the lock across this and whatever reads the outputs."""
        if not 1 <= rows <= self.max_batch:
            raise InputError(f"{self.spec.name} batch", f"1..{self.max_batch}", rows)
        with self.lock:
            addrs = {name: (buf.ptr, buf.nbytes) for name, buf in self.buffers.items()}
            addrs.update(addresses or {})
            key = graph_key(rows, addrs)
            action = self.plan.action(key) if graphs else "plain"
            if action == "replay":
                gpu.launch_graph(self._keyed[key][1], self.stream)
            elif action == "capture":  # the warm-up is this call's run; the capture records and runs nothing
                ctx = self._new_context()
                self._bind(ctx, rows, addrs)  # once: this context keeps these shapes and addresses
                self._execute(ctx)  # first, so TensorRT's deferred shape-dependent work is not what gets captured
                self._capture(key, ctx)
            else:
                self._bind(self.context, rows, addrs)
                self._execute(self.context)

    def _capture(self, key: tuple, ctx) -> str:
        """Capture one enqueue of `ctx`. The capture is ended whatever happens; the cudaGraph_t is destroyed
        once instantiated. The key's context is kept either way (its warm-up may still be running). Returns the
        plan's verdict: "replay", or "plain" with the key marked not capturable."""
        errors = {"enqueue_error": "", "end_error": "", "instantiate_error": ""}
        gpu.begin_capture(self.stream)
        graph = exe = None
        try:
            if not ctx.execute_async_v3(gpu.native_handle(self.stream)):
                errors["enqueue_error"] = "execute_async_v3 returned False during capture"
        except Exception as e:  # noqa: BLE001 - decided below: the key falls back, the stream must leave capture
            errors["enqueue_error"] = repr(e)
        finally:
            errors["end_error"], graph = gpu.end_capture(self.stream)
        if graph is not None and errors["enqueue_error"]:
            gpu.destroy_graph(graph)
        elif graph is not None:
            errors["instantiate_error"], exe = gpu.instantiate(graph)
        verdict = self.plan.capture_result(key, **errors)
        self._keyed[key] = (ctx, exe if verdict == "replay" else None)
        if verdict != "replay":
            gpu.clear_error()  # the (non-sticky) capture error, before the next call reports it as its own
            log.warning("%s: CUDA graph capture failed for %d rows (%s); running execute_async_v3 for it",
                        self.spec.name, key[0], self.plan.failed[key])
        return verdict

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The host loop's runner contract: numpy in, numpy out (one host copy each way); thread-safe."""
        batch = len(feeds[self.spec.inputs[0].name])
        if batch > self.max_batch:
            raise InputError(f"{self.spec.name} batch", f"<= {self.max_batch}", batch)
        with self.lock:
            if self.engine is None:
                raise BackendError(f"{self.spec.name} runner", "open", "closed")
            gpu.set_device(self.device)  # this thread may be new: cudart would bind device 0
            keep = []  # host arrays must outlive the async copies
            try:
                for t in self.spec.inputs:
                    a = np.ascontiguousarray(feeds[t.name], dtype=t.dtype)
                    keep.append(a)
                    gpu.copy(self.buffers[t.name].ptr, a.ctypes.data, a.nbytes, "h2d", self.stream)
                self.enqueue(batch)
                outs = {t.name: np.empty(t.shape(self.dims, batch), t.dtype) for t in self.spec.outputs}
                for name, a in outs.items():
                    gpu.copy(a.ctypes.data, self.buffers[name].ptr, a.nbytes, "d2h", self.stream)
            except BaseException:
                gpu.drain(self.stream)
                raise
            gpu.synchronize(self.stream)
        return outs

    def close(self) -> None:
        """Wait for the stream (queued work may still use them: an exception or Ctrl-C mid-loop), then graphs,
        contexts, the memory they used, the engine; idempotent."""
        with self.lock:
            if self.engine is None and self.scratch is None and not self.buffers:
                return
            gpu.set_device(self.device)
            gpu.drain(self.stream)
            self._release()

    def _release(self) -> None:
        """Free everything this runner made, each part tried even when an earlier one fails (the first error is
        raised after)."""
        first = None
        for _, exe in self._keyed.values():
            try:
                if exe is not None:
                    gpu.destroy_graph_exec(exe)
            except Exception as e:  # noqa: BLE001
                first = first or e
        self._keyed.clear()
        self.context = None  # the last references: TensorRT destroys the contexts, then the engine below
        for buf in [*self.buffers.values(), self.scratch]:
            try:
                if buf is not None:
                    buf.free()
            except Exception as e:  # noqa: BLE001
                first = first or e
        self.buffers, self.scratch, self.engine = {}, None, None
        if first is not None:
            raise first


class TrtBackend:
    """The `tensorrt` backend: one runner per plan on one CUDA stream, serialized by one lock; a device-resident
    sampler (ODE)."""

    name = "tensorrt"
    capabilities = Capabilities(device_loop=True, device_step_fns=("ode",))

    def __init__(self, folder: Path, manifest: Manifest):
        import tensorrt as trt

        check_compatible(Path(folder), manifest)
        self.device = gpu.current_device()  # every later call sets it current on its thread
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = check(trt.Runtime(self.logger), "trt.Runtime")
        self.shared = SharedStream(gpu.create_stream(), self.device, threading.RLock())
        self.stream = self.shared.handle

    def open(self, folder: Path, manifest: Manifest) -> dict[str, TrtGraph]:
        runners: dict[str, TrtGraph] = {}
        try:
            for name, rec in manifest.graphs.items():
                if name in SPECS:
                    runners[name] = TrtGraph(self.runtime, (Path(folder) / rec.file).read_bytes(), SPECS[name],
                                             manifest.dims, manifest.batch, self.shared)
        except BaseException:
            for r in runners.values():
                r.close()
            raise
        return runners

    def describe(self) -> str:
        return "tensorrt"

    def close(self) -> None:
        with self.shared.lock:
            if self.stream is not None:
                gpu.set_device(self.device)
                gpu.drain(self.stream)
                gpu.destroy_stream(self.stream)
                self.stream = None
            self.runtime = None
