"""The decisions of the TensorRT backend, as plain functions over plain values: no tensorrt, no cuda-python.

`trt.py` and `trt_loop.py` ask these and do what they say, so every decision is tested on CPU
(tests/test_trt_plan.py) and only the calls into TensorRT and CUDA need a GPU:

- memory: 256-byte alignment of every address bound with `setTensorAddress` (NvInferRuntime.h), the layout
  of the device loop's buffers (`pack`), and whether a half of `s` can be bound by offset or must be copied;
- the engine against its spec (`engine_problems`: names, dtypes, I/O modes, locations, profile batch range,
  fixed dims) and an output shape against its buffer (`output_problem`), before anything is enqueued;
- CUDA graphs (`GraphPlan`, `graph_key`): one execution context per captured (rows, bindings) key, a failed
  capture marks its key not capturable and that key falls back to `execute_async_v3`;
- the batch the device loop runs (`device_batch`: padded up to the profile's min, or refused past its max);
- the step times, uploaded once (`time_table`);
- the device loop's graph calls, their bindings and device-to-device copies, step by step (`loop_calls`: the
  bindings come from buffers allocated once per engine set, so the CUDA-graph keys are bounded), and each
  step's update launch (`loop_updates`); what those launches compute, and the history rings of the
  fast-sampling plans they read, are decided in `trt_update`;
- how the device loop's kernel is built for a GPU (`kernel_target`: a cubin for its architecture, PTX only
  where NVRTC has no cubin for it);
- what a failure to import or reach TensorRT / CUDA means (`unusable_reason`, `cuda_reason`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ...core.errors import BackendError, InputError
from .trt_update import History, Launch, history_slots, reuses_state, state_ops, update_launch

ALIGNMENT = 256  # bytes: TensorRT's required alignment for I/O tensor addresses (setTensorAddress)
CUDA_MAJORS = (12, 13)  # the [tensorrt-cu12] and [tensorrt-cu13] extras
POLYGRAPHY_MIN = (0, 53)  # older polygraphy reads ILayer.precision_is_set, which TensorRT 11's Python API dropped


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    return -(-int(nbytes) // alignment) * alignment


def aligned(offset: int, alignment: int = ALIGNMENT) -> bool:
    return int(offset) % alignment == 0


def pack(sizes: dict[str, int], alignment: int = ALIGNMENT) -> tuple[dict[str, int], int]:
    """Regions of one allocation, in order, each starting on an aligned offset: ({name: offset}, total bytes).
    cudaMalloc returns 256-byte aligned memory, so base + offset is aligned for every region."""
    offsets, end = {}, 0
    for name, n in sizes.items():
        offsets[name] = end
        end = align_up(end + max(int(n), 1), alignment)
    return offsets, end


@dataclass(frozen=True)
class HalfBinding:
    """How the decoder gets the conditional half of `s` (rows b..2b of the encoder's output buffer)."""

    offset: int  # bytes into the encoder's s buffer
    by_pointer: bool  # True: bind s at buffer + offset; False: copy device-to-device into the decoder's s


def s_half(b: int, tokens: int, hidden: int, itemsize: int = 4) -> HalfBinding:
    """The cond half of s starts b*L*D*itemsize bytes in: bound there when that is aligned, else copied."""
    offset = b * tokens * hidden * itemsize
    return HalfBinding(offset, aligned(offset))


# ------------------------------------------------------------------------------------------ engine vs spec


@dataclass(frozen=True)
class TensorDesc:
    """One I/O tensor of an engine as TensorRT describes it, in plain values.

    dtype: numpy name; mode: "input" | "output"; location: "device" | "host"; shape: the engine's shape (-1 for
    dynamic dims); profile: (min, opt, max) shapes of optimization profile 0 (inputs only)."""

    name: str
    dtype: str
    mode: str
    location: str
    shape: tuple[int, ...]
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None


def engine_problems(spec, dims, batch_min: int, batch_max: int, io: Sequence[TensorDesc]) -> list[str]:
    """Every way the engine's I/O differs from what the spec, the dims and the manifest's batch range promise
    ([] = it fits); a different engine could otherwise write past a buffer sized from the spec."""
    have = {t.name: t for t in io}
    want = {t.name: (t, "input") for t in spec.inputs} | {t.name: (t, "output") for t in spec.outputs}
    out = [f"unexpected tensor {n}" for n in sorted(set(have) - set(want))]
    out += [f"missing tensor {n}" for n in sorted(set(want) - set(have))]
    for name in sorted(set(want) & set(have)):
        t, mode = want[name]
        got = have[name]
        if got.dtype != t.dtype:
            out.append(f"{name}: dtype {got.dtype}, spec {t.dtype}")
        if got.mode != mode:
            out.append(f"{name}: {got.mode}, spec {mode}")
        if got.location != "device":
            out.append(f"{name}: location {got.location}, the runtime binds device memory")
        fixed = t.shape(dims, batch_max)
        if len(got.shape) != len(fixed) or any(g not in (-1, f) for g, f in zip(got.shape[1:], fixed[1:])):
            out.append(f"{name}: shape {tuple(got.shape)}, spec {('B',) + tuple(fixed[1:])}")
        if mode == "input":
            if got.profile is None:
                out.append(f"{name}: no optimization profile")
                continue
            lo, _, hi = got.profile
            if hi and hi[0] < batch_max:
                out.append(f"{name}: profile max batch {hi[0]}, manifest {batch_max}")
            if lo and lo[0] > batch_min:
                out.append(f"{name}: profile min batch {lo[0]}, manifest {batch_min}")
            if hi and tuple(hi[1:]) != tuple(fixed[1:]):
                out.append(f"{name}: profile shape {tuple(hi)}, spec {('B',) + tuple(fixed[1:])}")
    return out


def output_problem(name: str, shape: Sequence[int], expected: Sequence[int], buffer_nbytes: int,
                   itemsize: int) -> str:
    """'' when the context's output shape is the expected one and fits its buffer, else why not."""
    shape = tuple(int(v) for v in shape)
    need = int(np.prod(shape)) * itemsize if all(v >= 0 for v in shape) else -1
    if shape != tuple(expected):
        return f"{name}: context shape {shape}, expected {tuple(expected)}"
    if need < 0 or need > buffer_nbytes:
        return f"{name}: {need} bytes do not fit its {buffer_nbytes}-byte buffer"
    return ""


# ------------------------------------------------------------------------------------------ CUDA graphs


def graph_key(rows: int, addresses: dict[str, tuple[int, int]]) -> tuple:
    """The CUDA-graph key of one enqueue: its rows and every bound address (a graph replays exactly those)."""
    return (int(rows), tuple(sorted((name, int(ptr)) for name, (ptr, _) in addresses.items())))


@dataclass
class GraphPlan:
    """CUDA graphs of one engine: one execution context per captured key (rows, bindings), so a replay never
    follows a shape change on its context (TensorRT's CUDA-graph rule: enqueue after a shape change). Keys are
    bounded because the device loop binds buffers allocated once per engine set (`loop_calls`). A key whose
    capture failed is not capturable and runs with `execute_async_v3` from then on.

    On a key's first call ("capture") the engine runs once, in the warm-up `execute_async_v3` on the key's new
    context, which writes this call's outputs; the capture that follows only records. Nothing is launched after
    it: a launch would run the engine a second time for the same outputs."""

    enabled: bool = True
    captured: set = field(default_factory=set)
    failed: dict = field(default_factory=dict)  # key -> why the capture failed

    def action(self, key) -> str:
        """"plain": execute_async_v3 on the shared context; "replay": launch the key's graph; "capture": a
        warm-up enqueue on the key's own context (this call's run), then the capture (records, runs nothing)."""
        if not self.enabled or key in self.failed:
            return "plain"
        return "replay" if key in self.captured else "capture"

    def capture_result(self, key, *, enqueue_error: str = "", end_error: str = "", instantiate_error: str = ""
                       ) -> str:
        """After a capture attempt (the capture was ended whatever happened): "replay" when the graph is
        usable; else the key is marked not capturable and "plain" (the caller runs execute_async_v3 now)."""
        why = enqueue_error or end_error or instantiate_error
        if why:
            self.failed[key] = why
            return "plain"
        self.captured.add(key)
        return "replay"


# ------------------------------------------------------------------------------------------ the device loop


def device_batch(b: int, batch_min: int, batch_max: int) -> int:
    """Samples the device loop runs for b asked: at least batch.min (every call then has >= min rows: b or 2b;
    the extra samples copy the last one and are dropped after), refused when the CFG batch 2b passes max."""
    if b < 1:
        raise InputError("batch for device sampling", ">= 1 sample", b)
    padded = max(b, batch_min)
    if 2 * padded > batch_max:
        raise InputError("batch for device sampling", f"2 x B <= {batch_max} (the engines' batch.max)",
                         f"2 x {padded}" + (f" (padded from {b} to batch.min)" if padded != b else ""))
    return padded


def time_table(step_t: Iterable[float], rows: int) -> tuple[np.ndarray, int]:
    """The encoder's t input of every recompute step, uploaded once: (K, R) float32 with R >= rows padded so
    each row starts aligned, and the row stride in bytes. Step k's t is a device-to-device copy of row k."""
    ts = np.asarray(list(step_t), np.float32)
    stride = align_up(rows * 4)
    table = np.zeros((max(len(ts), 1), stride // 4), np.float32)
    table[: len(ts)] = ts[:, None]
    return table, stride


@dataclass(frozen=True)
class LoopLayout:
    """Where the device loop's tensors live, all allocated once per engine set: the sampler's own regions (x,
    labels [uncond; cond] and cond-only, the step-time table, the history rings of a fast-sampling plan) and
    the runners' buffers ({name: (ptr, bytes)})."""

    b: int  # samples (padded to batch.min)
    row: int  # bytes of one latent row (float32)
    x: int
    y_cfg: int
    y_cond: int
    times: int
    time_stride: int
    enc: dict  # the encoder runner's buffers: x, t, y, s
    dec: dict  # the decoder runner's buffers: x, s, v
    half: HalfBinding  # its offset is also the bytes of one CFG half of s (b x L x D float32)
    hist: History = History()  # the rings (none for Euler with forecast 0)


@dataclass(frozen=True)
class LoopCall:
    """One graph call of the device loop: `copies` (dst, src, bytes) device-to-device first, then the kernel
    launches `kernels` (`trt_update.Launch`), then the graph with `rows` rows and `bind` ({name: (ptr, bytes)})
    in place of its own buffers."""

    graph: str
    rows: int
    bind: dict
    copies: tuple = ()
    kernels: tuple = ()


def loop_calls(steps: Sequence, lay: LoopLayout) -> list[list[LoopCall]]:
    """The graph calls of each step of the plan (`Step`: recompute, enc_uncond, dec_uncond, s_cond, s_uncond),
    as the host loop makes them: the encoder on recompute steps (2b rows [uncond; cond] or b cond-only, its t a
    row of the time table), the decoder on 2b rows inside the guidance interval, else on b rows. Its s is the
    encoder's last output where the step reuses it (`trt_update.reuses_state`): bound in place, the conditional
    half of a 2b output by offset where aligned, else copied. Where it is forecast, each half is assembled in
    the decoder's own s from the state rings (`trt_update.state_ops`), after the recompute step's halves were
    copied into them. Every address comes from `lay`, so the same layout gives the same bindings on every call:
    a bounded set of CUDA-graph keys per engine set."""
    b, row, out = lay.b, lay.row, []
    s_uncond, k = False, 0
    s_ptr, s_bytes = lay.enc["s"]
    half = lay.half.offset  # bytes of one CFG half of s
    for st, sl in zip(steps, history_slots(steps, lay.hist.order, lay.hist.forecast)):
        calls = []
        if st.recompute:
            rows = 2 * b if st.enc_uncond else b
            copies = [(lay.enc["t"][0], lay.times + k * lay.time_stride, rows * 4)]
            copies += [(lay.enc["x"][0] + h * b * row, lay.x, b * row) for h in range(rows // b)]
            y = (lay.y_cfg, 2 * b * 8) if st.enc_uncond else (lay.y_cond, b * 8)
            calls.append(LoopCall("encoder", rows, {"y": y}, tuple(copies)))
            k += 1
            s_uncond = st.enc_uncond
        kept = []  # a forecast keeps the new state: each half into its ring, before anything reads the rings
        if sl.cond_put >= 0:
            kept.append((lay.hist.cond[sl.cond_put], s_ptr + (half if st.enc_uncond else 0), half))
        if sl.uncond_put >= 0:
            kept.append((lay.hist.uncond[sl.uncond_put], s_ptr, half))
        if not reuses_state(st, s_uncond):
            calls.append(_assembled(st, sl, lay, tuple(kept)))
        elif st.dec_uncond:
            copies = tuple(kept) + tuple((lay.dec["x"][0] + h * b * row, lay.x, b * row) for h in range(2))
            calls.append(LoopCall("decoder", 2 * b, {"s": (s_ptr, s_bytes)}, copies))
        elif not s_uncond:
            calls.append(LoopCall("decoder", b, {"x": (lay.x, b * row), "s": (s_ptr, s_bytes)}, tuple(kept)))
        elif lay.half.by_pointer:  # the cond half of a 2B state, by offset
            calls.append(LoopCall("decoder", b, {"x": (lay.x, b * row), "s": (s_ptr + half, s_bytes - half)},
                                  tuple(kept)))
        else:  # an unaligned offset cannot be bound: the half is copied into the decoder's own s
            calls.append(LoopCall("decoder", b, {"x": (lay.x, b * row)},
                                  tuple(kept) + ((lay.dec["s"][0], s_ptr + half, half),)))
        out.append(calls)
    return out


def _assembled(st, sl, lay: LoopLayout, kept: tuple) -> LoopCall:
    """The decoder on its own s buffer, filled from the state rings: [uncond; cond] for a guided step, else cond."""
    assert lay.hist.cond, f"step {st.i}: a forecast state without state rings"
    b, row, half, dst = lay.b, lay.row, lay.half.offset, lay.dec["s"][0]
    halves = [(st.s_uncond, [lay.hist.uncond[j] for j in sl.uncond_read])] if st.dec_uncond else []
    halves.append((st.s_cond, [lay.hist.cond[j] for j in sl.cond_read]))
    copies, kernels = list(kept), []
    for h, (weights, srcs) in enumerate(halves):
        c, launches = state_ops(weights, srcs, dst + h * half, half)
        copies += c
        kernels += launches
    if st.dec_uncond:
        copies += [(lay.dec["x"][0] + h * b * row, lay.x, b * row) for h in range(2)]
        return LoopCall("decoder", 2 * b, {}, tuple(copies), tuple(kernels))
    return LoopCall("decoder", b, {"x": (lay.x, b * row)}, tuple(copies), tuple(kernels))


def loop_updates(steps: Sequence, lay: LoopLayout) -> list[Launch]:
    """The update launch of each step (after its decoder call; `trt_update.update_launch`), over x's b rows from
    the decoder's v, with the velocity ring's slots of a multistep solver."""
    n, v = lay.b * lay.row // 4, lay.dec["v"][0]
    out = []
    for st, sl in zip(steps, history_slots(steps, lay.hist.order, lay.hist.forecast)):
        if sl.v_put < 0:
            out.append(update_launch(st, lay.x, v, n))
        else:
            out.append(update_launch(st, lay.x, v, n, lay.hist.v[sl.v_put], [lay.hist.v[j] for j in sl.v_read]))
    return out


# ------------------------------------------------------------------------------------------ the kernel's build


@dataclass(frozen=True)
class KernelTarget:
    """What NVRTC builds the device loop's kernel as: a cubin for sm_<arch>, or PTX for compute_<arch>."""

    kind: str  # "cubin" | "ptx"
    arch: int  # 90 = sm_90 / compute_90
    note: str = ""  # why not a cubin for the GPU's own architecture ('' when it is)

    @property
    def option(self) -> str:
        return f"--gpu-architecture={'sm' if self.kind == 'cubin' else 'compute'}_{self.arch}"


def kernel_target(cc: str, supported: Sequence[int]) -> KernelTarget:
    """The kernel's build for a GPU of compute capability `cc` ("9.0") with an NVRTC supporting `supported`
    (nvrtcGetSupportedArchs: 75, 80, ...):
    1. a cubin for the GPU's own sm_XY: the driver loads it as is. PTX would be JIT-compiled by the driver,
       which needs a driver at least as new as this NVRTC's PTX ISA (PTX JIT is outside CUDA's minor-version
       compatibility): CUDA_ERROR_UNSUPPORTED_PTX_VERSION on older drivers;
    2. else a cubin for the highest supported sm_XZ of the same major, Z < Y (a cubin runs on later minors of
       its major);
    3. else PTX for the highest supported compute_VW below the GPU (a GPU newer than this NVRTC: its driver is
       newer too), and the note says so;
    4. else a BackendError: this NVRTC builds for nothing this GPU runs."""
    major, minor = (int(v) for v in str(cc).split(".")[:2])
    own = 10 * major + minor
    archs = sorted({int(a) for a in supported})
    if own in archs:
        return KernelTarget("cubin", own)
    same = [a for a in archs if a // 10 == major and a < own]
    if same:
        return KernelTarget("cubin", same[-1], f"NVRTC has no sm_{own}: the sm_{same[-1]} cubin (same major)")
    below = [a for a in archs if a < own]
    if below:
        return KernelTarget("ptx", below[-1], f"NVRTC has no cubin for sm_{own} or its major: PTX for "
                                              f"compute_{below[-1]}, JIT-compiled by the driver")
    raise BackendError(f"NVRTC for the device loop's kernel on compute capability {cc}",
                       f"an architecture at or below sm_{own}", f"NVRTC supports {archs}",
                       "use the host loop (--no-device-loop) or an NVRTC that supports this GPU")


# ------------------------------------------------------------------------------------------ unusable


def unusable_reason(error: BaseException) -> str:
    """'' when `error` is not about TensorRT / CUDA being unusable here; else the reason to print. An import
    that fails, a shared library that does not load (OSError: libnvinfer, libcudart) and cuda-python's own
    failure to find the driver (RuntimeError) all mean the same: this machine cannot run TensorRT."""
    if isinstance(error, (ImportError, OSError, RuntimeError)):
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return ""


def cuda_reason(status: str, count: int, driver_version: int, runtime_version: int) -> str:
    """'' when CUDA can run here; else exactly why, from cudaGetDeviceCount's status name and device count,
    cudaDriverGetVersion and cudaRuntimeGetVersion (1000 * major + 10 * minor; 0 = no driver)."""

    def ver(v: int) -> str:
        return f"{v // 1000}.{(v % 1000) // 10}"

    if not driver_version:  # cuda-bindings answers cudaErrorInsufficientDriver when there is no driver at all
        return "no CUDA GPU visible (no NVIDIA driver loaded)"
    # within one major a newer runtime runs on an older driver (CUDA minor-version compatibility); across majors not
    if status == "cudaErrorInsufficientDriver" or (driver_version and runtime_version // 1000 > driver_version // 1000):
        major, have = runtime_version // 1000, driver_version // 1000
        fix = (f"install the [tensorrt-cu{have}] extra (CUDA {have} wheels) or a driver for CUDA {major}"
               if have in CUDA_MAJORS else f"install a driver for CUDA {major}")
        return (f"the NVIDIA driver supports CUDA {ver(driver_version)}, older than the CUDA {ver(runtime_version)} "
                f"of the installed cuda-python: {fix}")
    if status in ("cudaErrorNoDevice", "cudaSuccess") and count < 1:
        return "no CUDA GPU visible"
    if status == "cudaErrorNoDevice":
        return "no CUDA GPU visible"
    if status != "cudaSuccess":
        return f"CUDA cannot start: {status}"
    return ""


def polygraphy_reason(version: str) -> str:
    """'' when this polygraphy can drive TensorRT 11's builder, else why not."""
    try:
        have = tuple(int(v) for v in version.split(".")[:2])
    except ValueError:
        return f"polygraphy {version}: unreadable version"
    if have < POLYGRAPHY_MIN:
        return (f"polygraphy {version} < {'.'.join(map(str, POLYGRAPHY_MIN))} reads ILayer.precision_is_set, "
                "which TensorRT 11 no longer has: pip install 'polygraphy>=0.53'")
    return ""
