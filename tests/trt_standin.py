"""A STAND-IN for TensorRT and the CUDA device: the TensorRT adapter's own logic, run on CPU.

Nothing here is TensorRT or CUDA, and no test that uses it counts as TensorRT or CUDA tested. What it stands in
for, and how:
- device memory: host bytearrays at made-up, 256-byte aligned addresses (`EmulatedGPU`), on the device current
  on the allocating thread; every access checks that the calling thread has made that device current (a fresh
  thread is on device 0, as cudart binds it);
- the stream: every copy and every engine run happens at once, in call order; `synchronize` only records;
- CUDA graphs: a capture records the engine runs as closures; a launch runs them again (reading the memory of
  the moment, as a real graph reads its bound addresses);
- TensorRT: `StandInTensorRT` (the few names `trt.py` imports), engines that describe the spec's I/O and
  compute a made-up row-wise function (`encoder_ref`, `decoder_ref`: gathers, no reductions, so a row's result
  does not depend on what shares its call), contexts that keep shapes and addresses as TensorRT's do.
- the device loop's kernels: their numpy restatements (tests/kernel_restatements.py, checked against the host
  loop's arithmetic bit for bit in tests/test_trt_kernel.py), run on the emulated memory (`run_launch`).
It exists to test what the adapter decides: its lock, close order, constructor cleanup, device-current calls,
one engine run per call, CUDA-graph keys, and the device loop's bindings, offsets, copies, history rings and
launches.
"""
from __future__ import annotations

import ctypes
import threading
import types
from pathlib import Path

import numpy as np

from ddt_export.core.errors import BackendError
from ddt_export.core.specs import BatchProfile, Dims
from ddt_export.runtime.graphs import gpu as gpu_module
from ddt_export.runtime.graphs.trt_plan import align_up
from kernel_restatements import run_launch


def encoder_ref(x: np.ndarray, t: np.ndarray, y: np.ndarray, L: int, D: int) -> np.ndarray:
    """The stand-in encoder: s[b, l, d] = x[b].flat[(l*D + d) % CHW] * (1 + l/16) + t[b] + y[b] / 8, float32."""
    flat = x.reshape(len(x), -1)
    idx = np.arange(L * D) % flat.shape[1]
    scale = np.repeat(np.float32(1) + np.arange(L, dtype=np.float32) / np.float32(16), D)
    s = flat[:, idx] * scale[None] + t[:, None] + (y.astype(np.float32) / np.float32(8))[:, None]
    return s.reshape(len(x), L, D).astype(np.float32)


def decoder_ref(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The stand-in decoder: v[b].flat[i] = s[b].flat[i % LD] - x[b].flat[i] / 2, float32."""
    flat = x.reshape(len(x), -1)
    sf = s.reshape(len(s), -1)
    idx = np.arange(flat.shape[1]) % sf.shape[1]
    return (sf[:, idx] - flat / np.float32(2)).reshape(x.shape).astype(np.float32)


class _Enum:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


def standin_tensorrt() -> types.ModuleType:
    """The names `runtime/graphs/trt.py` imports from tensorrt, as a module (a stand-in: no TensorRT inside)."""
    m = types.ModuleType("tensorrt")
    m.__version__ = "stand-in"
    m.TensorIOMode = types.SimpleNamespace(INPUT=_Enum("INPUT"), OUTPUT=_Enum("OUTPUT"))
    m.TensorLocation = types.SimpleNamespace(DEVICE=_Enum("DEVICE"), HOST=_Enum("HOST"))
    m.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED=_Enum("USER_MANAGED"))
    m.nptype = lambda dt: np.dtype(dt)
    return m


class EmulatedGPU:
    """Emulated device memory, stream and CUDA graphs (a stand-in), installed into `ddt_export.runtime.graphs.gpu`
    by `install(monkeypatch)`. `events` records the lifecycle (malloc, free, sync, graph and context destruction)
    in order; `engine_runs` counts engine executions (plain, warm-up, and each replayed one)."""

    def __init__(self):
        self.allocs: dict[int, tuple[bytearray, int]] = {}
        self.events: list[str] = []
        self.next_ptr = 0x10000
        self.mallocs = 0
        self.fail_malloc_at: int | None = None  # the n-th cudaMalloc (1-based) fails with an OOM
        self.fail_capture = ""  # an error name end_capture reports
        self.engine_runs = 0
        self.launched: list[str] = []  # kernel launches by name, in order (`standin_engines`)
        self.capturing: dict[int, list | None] = {}
        self.pause: tuple[str, threading.Event, threading.Event] | None = None  # (thread name, started, resume)
        self._tls = threading.local()
        self.lock = threading.Lock()  # the emulation's own bookkeeping, not the adapter's

    # ---------------------------------------------------------------- the gpu module's functions
    def install(self, monkeypatch) -> "EmulatedGPU":
        emu = self

        class Buffer:
            def __init__(self, nbytes: int):
                self.nbytes = int(nbytes)
                self.ptr = emu.malloc(max(self.nbytes, 1))

            def free(self):
                if self.ptr:
                    ptr, self.ptr = self.ptr, 0
                    emu.free(ptr)

        funcs = {"DeviceBuffer": Buffer, "copy": self.copy, "synchronize": self.synchronize,
                 "set_device": self.set_device, "current_device": self.device, "native_handle": int,
                 "create_stream": self.create_stream,
                 "destroy_stream": lambda s: self.events.append("stream destroyed"),
                 "begin_capture": self.begin_capture, "end_capture": self.end_capture, "instantiate": self.instantiate,
                 "destroy_graph": lambda g: None, "launch_graph": self.launch_graph,
                 "destroy_graph_exec": lambda e: self.events.append("graph exec destroyed"),
                 "clear_error": lambda: None, "compute_capability": lambda d: "9.0"}
        for name, fn in funcs.items():
            monkeypatch.setattr(gpu_module, name, fn)
        return self

    def device(self) -> int:
        return getattr(self._tls, "device", 0)

    def set_device(self, device: int) -> None:
        self._tls.device = int(device)

    def create_stream(self) -> int:
        return 7

    def malloc(self, nbytes: int) -> int:
        with self.lock:
            self.mallocs += 1
            if self.fail_malloc_at == self.mallocs:
                raise BackendError(f"cudaMalloc({nbytes})", "success", "cudaErrorMemoryAllocation (stand-in)")
            ptr = self.next_ptr
            self.next_ptr += align_up(nbytes) + 256
            self.allocs[ptr] = (bytearray(nbytes), self.device())
            self.events.append(f"malloc {ptr:#x}")
            return ptr

    def free(self, ptr: int) -> None:
        with self.lock:
            data, dev = self.allocs.pop(ptr)
            self.events.append(f"free {ptr:#x}")

    def _find(self, ptr: int, nbytes: int) -> tuple[bytearray, int]:
        for base, (data, dev) in self.allocs.items():
            if base <= ptr and ptr + nbytes <= base + len(data):
                if dev != self.device():
                    raise BackendError(f"device memory {ptr:#x}", f"device {dev} current on this thread",
                                       f"device {self.device()} (stand-in of cudaErrorInvalidValue)")
                return data, ptr - base
        raise BackendError(f"device address {ptr:#x}+{nbytes}", "inside an allocation", "outside every one")

    def view(self, ptr: int, dtype, count: int) -> np.ndarray:
        """A numpy view of `count` elements of device memory at `ptr`."""
        dtype = np.dtype(dtype)
        data, off = self._find(ptr, count * dtype.itemsize)
        return np.frombuffer(data, dtype, count, off)

    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream) -> None:
        if kind == "h2d":
            data, off = self._find(dst, nbytes)
            data[off:off + nbytes] = ctypes.string_at(src, nbytes)
        elif kind == "d2h":
            data, off = self._find(src, nbytes)
            ctypes.memmove(dst, bytes(data[off:off + nbytes]), nbytes)
        else:
            sdata, soff = self._find(src, nbytes)
            chunk = bytes(sdata[soff:soff + nbytes])
            ddata, doff = self._find(dst, nbytes)
            ddata[doff:doff + nbytes] = chunk

    def synchronize(self, stream) -> None:
        self.events.append("sync")

    def begin_capture(self, stream) -> None:
        self.capturing[int(stream)] = []

    def end_capture(self, stream):
        ops = self.capturing.pop(int(stream))
        return (self.fail_capture, None) if self.fail_capture else ("", ops)

    def instantiate(self, graph):
        return "", list(graph)

    def launch_graph(self, exe, stream) -> None:
        for op in exe:
            op()

    # ---------------------------------------------------------------- engine runs
    def run_engine(self, stream: int, op) -> None:
        """An engine enqueue: recorded while the stream captures, else run now (one engine run)."""
        if self.capturing.get(int(stream)) is not None:
            self.capturing[int(stream)].append(op)
        else:
            op()


class StandInEngine:
    """A stand-in for an ICudaEngine of one `GraphSpec`: describes its I/O like TensorRT (dynamic batch, profile
    0 over [batch_min, batch_max]) and computes `encoder_ref` / `decoder_ref`."""

    def __init__(self, emu: EmulatedGPU, spec, dims, batch_min: int, batch_max: int):
        self.emu, self.spec, self.dims, self.lo, self.hi = emu, spec, dims, batch_min, batch_max
        self.tensors = [(t, "input") for t in spec.inputs] + [(t, "output") for t in spec.outputs]
        self.num_io_tensors = len(self.tensors)
        self.device_memory_size_v2 = 4096
        self.fail_context = False

    def _t(self, name):
        return next((t, m) for t, m in self.tensors if t.name == name)

    def get_tensor_name(self, i):
        return self.tensors[i][0].name

    def get_tensor_mode(self, name):
        trt = standin_tensorrt_singleton
        return trt.TensorIOMode.INPUT if self._t(name)[1] == "input" else trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self._t(name)[0].dtype

    def get_tensor_location(self, name):
        return standin_tensorrt_singleton.TensorLocation.DEVICE

    def get_tensor_shape(self, name):
        return (-1,) + self._t(name)[0].shape(self.dims, 1)[1:]

    def get_tensor_profile_shape(self, name, profile):
        t = self._t(name)[0]
        return [t.shape(self.dims, b) for b in (self.lo, self.hi, self.hi)]

    def create_execution_context(self, strategy):
        return None if self.fail_context else StandInContext(self)


class StandInContext:
    """A stand-in for an IExecutionContext: keeps input shapes and tensor addresses; `execute_async_v3` runs the
    stand-in function on the emulated memory (or is recorded by a capture)."""

    def __init__(self, engine: StandInEngine):
        self.engine, self.shapes, self.addrs = engine, {}, {}

    def __del__(self):
        self.engine.emu.events.append("context destroyed")

    def set_device_memory(self, ptr, nbytes):
        self.scratch = (ptr, nbytes)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addrs[name] = int(ptr)
        return True

    def get_tensor_shape(self, name):
        rows = next(iter(self.shapes.values()))[0]
        return self.engine._t(name)[0].shape(self.engine.dims, rows)

    def execute_async_v3(self, stream):
        shapes, addrs = dict(self.shapes), dict(self.addrs)  # what a captured graph keeps
        self.engine.emu.run_engine(stream, lambda: self._run(shapes, addrs))
        return True

    def _run(self, shapes, addrs):
        eng, emu = self.engine, self.engine.emu
        emu.engine_runs += 1
        pause = emu.pause
        if pause is not None and threading.current_thread().name == pause[0]:
            pause[1].set()  # "this engine run has started": another thread may act now
            pause[2].wait(10)  # until the test resumes it; the inputs are read after (while the kernel runs)
        ins = {t.name: emu.view(addrs[t.name], t.dtype, int(np.prod(shapes[t.name]))).reshape(shapes[t.name]).copy()
               for t in eng.spec.inputs}
        if eng.spec.name == "encoder":
            out = {"s": encoder_ref(ins["x"], ins["t"], ins["y"], eng.dims.L, eng.dims.D)}
        else:
            out = {"v": decoder_ref(ins["x"], ins["s"])}
        for name, a in out.items():
            emu.view(addrs[name], a.dtype, a.size)[:] = a.ravel()


class StandInRuntime:
    """A stand-in for trt.Runtime: `deserialize_cuda_engine(b"encoder")` gives that spec's stand-in engine."""

    def __init__(self, engines: dict):
        self.engines = engines

    def deserialize_cuda_engine(self, plan: bytes):
        return self.engines.get(bytes(plan).decode())


standin_tensorrt_singleton = standin_tensorrt()


# ------------------------------------------------------------------------------------------ engines on the stand-in

DIMS = Dims(C=2, H=4, W=4, L=5, D=12, IC=2, IH=4)  # s rows of 240 bytes: the cond half of s is unaligned for b=1
BATCH = BatchProfile(1, 8, 32)


def graph(emu: EmulatedGPU, spec, *, device=0, lock=None, engine=None):
    """The project's `TrtGraph` of `spec` over a stand-in engine on the emulated device."""
    from ddt_export.runtime.graphs.trt import SharedStream, TrtGraph

    engine = engine or StandInEngine(emu, spec, DIMS, BATCH.min, BATCH.max)
    shared = SharedStream(7, device, lock if lock is not None else threading.RLock())
    return TrtGraph(StandInRuntime({spec.name: engine}), spec.name.encode(), spec, DIMS, BATCH, shared)


def standin_engines(emu: EmulatedGPU, monkeypatch, device_loop: bool = True):
    """Real `Engines` over stand-in TensorRT runners, each kernel launch of the device loop replaced by the numpy
    restatement of that kernel on the emulated memory (`run_launch`; the names land in `emu.launched`)."""
    from ddt_export.core.config import SamplerConfig
    from ddt_export.core.specs import DECODER, ENCODER
    from ddt_export.runtime.graphs.backends import Capabilities
    from ddt_export.runtime.graphs.engines import Engines
    from ddt_export.runtime.sampling import trt_loop

    def launch(kernels, what, stream):
        emu.launched.append(what.kernel)
        run_launch(what, lambda ptr, count: emu.view(int(ptr), np.float32, int(count)))

    monkeypatch.setattr(trt_loop, "launch", launch)
    monkeypatch.setattr(trt_loop, "load_kernel", lambda device: ({k: None for k in trt_loop.KERNELS}, None))
    lock = threading.RLock()
    runners = {s.name: graph(emu, s, lock=lock) for s in (ENCODER, DECODER)}
    model = types.SimpleNamespace(latent_shape=(DIMS.C, DIMS.H, DIMS.W), num_tokens=DIMS.L, hidden_size=DIMS.D,
                                  null_class=10, num_classes=10)
    cfg = types.SimpleNamespace(name="stand-in", model=model,
                                sampler=SamplerConfig(num_steps=12, guidance=3.0, guidance_interval=(0.3, 1.0)))
    backend = types.SimpleNamespace(capabilities=Capabilities(device_loop=True, device_step_fns=("ode",)),
                                    describe=lambda: "tensorrt (stand-in)", close=lambda: None)
    return Engines(Path("stand-in"), types.SimpleNamespace(dims=DIMS, config=cfg, batch=BATCH), backend, runners,
                   device_loop)

