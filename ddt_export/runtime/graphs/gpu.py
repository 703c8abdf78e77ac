"""The CUDA calls of the TensorRT backend and its device loop, through cuda-python (`cuda.bindings`). Torch-free.

Every call the GPU path makes into the CUDA runtime / driver lives here, behind small functions, and every
status goes through `check`. `trt.py` (TrtGraph) and `sampling/trt_loop.py` call them through this module
(`gpu.copy(...)`, never a copy imported by name), so the CPU tests can put a *stand-in* in their place
(tests/trt_standin.py: emulated device memory; named as a stand-in, never counted as CUDA tested).
cuda.bindings is imported inside the functions: importing this module needs nothing.
"""
from __future__ import annotations

import logging

from ...core.errors import BackendError

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
    except Exception:  # noqa: BLE001 - the description is a courtesy; the status name is already in the message
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


def native_handle(obj) -> int:
    """The address behind a cuda-python object (stream), as TensorRT's execute_async_v3 takes it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # cuda-bindings >= 12.9.1; int() is deprecated there
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def set_device(device: int) -> None:
    """Make `device`'s primary context current on this thread. A fresh thread has none (cudart would bind device 0
    at its first call; driver calls such as cuModuleLoadData and cuLaunchKernel fail without one)."""
    from cuda.bindings import runtime as cudart

    check(cudart.cudaSetDevice(device), f"cudaSetDevice({device})")


def current_device() -> int:
    from cuda.bindings import runtime as cudart

    return int(check(cudart.cudaGetDevice(), "cudaGetDevice"))


def compute_capability(device: int) -> str:
    from cuda.bindings import runtime as cudart

    prop = check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return f"{prop.major}.{prop.minor}"


class DeviceBuffer:
    """One cudaMalloc allocation, freed once by `free()` (256-byte aligned, as cudaMalloc returns it)."""

    def __init__(self, nbytes: int):
        from cuda.bindings import runtime as cudart

        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart.cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        from cuda.bindings import runtime as cudart

        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(cudart.cudaFree(ptr), "cudaFree")


def copy(dst: int, src: int, nbytes: int, kind: str, stream) -> None:
    """cudaMemcpyAsync on `stream`; kind "h2d" | "d2h" | "d2d". Host memory must outlive the copy (sync first)."""
    from cuda.bindings import runtime as cudart

    k = {"h2d": cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, "d2h": cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
         "d2d": cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice}[kind]
    check(cudart.cudaMemcpyAsync(dst, src, nbytes, k, stream), f"cudaMemcpyAsync {kind} ({nbytes} bytes)")


def synchronize(stream) -> None:
    from cuda.bindings import runtime as cudart

    check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def drain(stream) -> None:
    """Wait for the stream on an error or close path (host arrays and device memory may still be in use by
    queued work); an error here is logged, not raised, so it never hides the one being handled."""
    try:
        synchronize(stream)
    except Exception as e:  # noqa: BLE001 - the caller goes on with its own error or its cleanup
        log.warning("cudaStreamSynchronize failed (%s); freeing anyway", e)


def create_stream():
    from cuda.bindings import runtime as cudart

    return check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")


def destroy_stream(stream) -> None:
    from cuda.bindings import runtime as cudart

    check(cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")


# ------------------------------------------------------------------------------------------ CUDA graphs


def begin_capture(stream) -> None:
    """Capture `stream` (thread-local mode: other threads' CUDA calls are not affected)."""
    from cuda.bindings import runtime as cudart

    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    check(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")


def end_capture(stream) -> tuple[str, object]:
    """End the capture whatever happened: ("", cudaGraph_t) or (the error's name, None). Never raises: a stream
    left capturing would fail every later call and hide the first error."""
    from cuda.bindings import runtime as cudart

    err, graph = cudart.cudaStreamEndCapture(stream)
    return ("", graph) if int(err) == 0 else (getattr(err, "name", str(err)), None)


def instantiate(graph) -> tuple[str, object]:
    """("", cudaGraphExec_t) or (the error's name, None); the cudaGraph_t is destroyed either way (the
    executable graph stands alone)."""
    from cuda.bindings import runtime as cudart

    err, exe = cudart.cudaGraphInstantiate(graph, 0)
    check(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
    return ("", exe) if int(err) == 0 else (getattr(err, "name", str(err)), None)


def destroy_graph(graph) -> None:
    from cuda.bindings import runtime as cudart

    check(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")


def launch_graph(exe, stream) -> None:
    from cuda.bindings import runtime as cudart

    check(cudart.cudaGraphLaunch(exe, stream), "cudaGraphLaunch")


def destroy_graph_exec(exe) -> None:
    from cuda.bindings import runtime as cudart

    check(cudart.cudaGraphExecDestroy(exe), "cudaGraphExecDestroy")


def clear_error() -> None:
    """Clear a non-sticky error (a failed capture) before the next call reports it as its own."""
    from cuda.bindings import runtime as cudart

    cudart.cudaGetLastError()
