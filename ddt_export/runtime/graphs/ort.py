"""ONNX Runtime sessions: the one place an `InferenceSession` is made (engines, parity checks, feature
extractors, the export checks), so options and error handling are the same everywhere. Torch-free."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...core.errors import ArtifactError, BackendError

AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # first available wins; TensorRT EP on request
CPU = ("CPUExecutionProvider",)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """`requested` (all must be available), else the first of AUTO_PROVIDERS this onnxruntime has."""
    available = available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise BackendError("onnxruntime providers", f"some of {available}", ", ".join(missing))
        return list(requested)
    return [p for p in AUTO_PROVIDERS if p in available][:1] or available[:1]


def session(path: Path, providers: Sequence[str] | None = CPU):
    """An InferenceSession on `path` (warnings off: unused initializers are not the user's business); a graph
    onnxruntime cannot load is an ArtifactError with its reason. providers None: `choose_providers()`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    chosen = choose_providers(None) if providers is None else list(providers)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
    except Exception as e:  # onnxruntime raises its own untyped exceptions for unreadable graphs
        raise ArtifactError(str(path), "a graph onnxruntime can load", f"{type(e).__name__}: {str(e)[:400]}")


def try_session(path: Path, providers: Sequence[str] | None = CPU):
    """(session, "") or (None, why onnxruntime cannot run the graph): for precisions it may lack kernels for."""
    try:
        return session(path, providers), ""
    except ArtifactError as e:
        return None, f"onnxruntime {'/'.join(providers or ('auto',))}: {str(e.actual).splitlines()[0][:240]}"


def run(sess, feeds: dict) -> dict:
    """All outputs of one session call, by name."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))
