"""The decisions of the TensorRT backend, as plain functions over plain values: no tensorrt, no cuda-python.

`trt.py` and `trt_loop.py` ask these and do what they say, so every decision is tested on CPU
(tests/test_trt_plan.py) and only the calls into TensorRT and CUDA need a GPU:

- memory: 256-byte alignment of every address bound with `setTensorAddress` (NvInferRuntime.h), the layout
  of the device loop's buffers (`pack`), and whether a half of `s` can be bound by offset or must be copied;
- the engine against its spec (`engine_problems`: names, dtypes, I/O modes, locations, profile batch range,
  fixed dims) and an output shape against its buffer (`output_problem`), before anything is enqueued;
- CUDA graphs (`GraphPlan`): one execution context per captured (rows, bindings) key, a failed capture marks
  its key not capturable and that key falls back to `execute_async_v3`;
- the batch the device loop runs (`device_batch`: padded up to the profile's min, or refused past its max);
- the step times, uploaded once (`time_table`);
- what a failure to import or reach TensorRT / CUDA means (`unusable_reason`, `cuda_reason`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ...core.errors import InputError

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


@dataclass
class GraphPlan:
    """CUDA graphs of one engine: one execution context per captured key (rows, bindings), so a replay never
    follows a shape change on its context (TensorRT's CUDA-graph rule: enqueue after a shape change). Keys are
    bounded because the device loop binds buffers allocated once per engine set. A key whose capture failed is
    not capturable and runs with `execute_async_v3` from then on."""

    enabled: bool = True
    captured: set = field(default_factory=set)
    failed: dict = field(default_factory=dict)  # key -> why the capture failed

    def action(self, key) -> str:
        """"plain": execute_async_v3 on the shared context; "replay": launch the key's graph; "capture": a
        warm-up enqueue on the key's own context, then capture."""
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
