"""Backends: how the graphs of an engine folder are run, behind a small registry. Torch-free.

A backend opens one folder's graphs as `GraphRunner`s, declares what it can do (`Capabilities`) and is closed
with the `Engines` that own it. Registered backends, by the name manifests record:

- `onnxruntime` (`OrtBackend`, here): ONNX graphs in onnxruntime, with the execution providers chosen once;
- `tensorrt` (`ddt_export.runtime.graphs.trt.TrtBackend`, imported only for folders that ask for it):
  serialized plans run through cuda-python; the sampling layer runs its device-resident loop
  (`runtime.sampling.trt_loop`) when `Capabilities.device_loop` says it can.

A new backend is a class with `name`, `capabilities`, `open`, `describe` and `close`, and one line in
`REGISTRY`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ...core.errors import BackendError
from ...core.manifest import Manifest
from ...core.specs import SPECS
from . import ort

REGISTRY = {"onnxruntime": "ddt_export.runtime.graphs.backends:OrtBackend",
            "tensorrt": "ddt_export.runtime.graphs.trt:TrtBackend"}
NAMES = tuple(REGISTRY)
CHOICES = ("auto", *NAMES)


@dataclass(frozen=True)
class Capabilities:
    device_loop: bool = False  # the sampling layer can keep x and s on the device (`runtime.sampling.trt_loop`)
    device_step_fns: tuple[str, ...] = ()  # the step functions that loop runs


class GraphRunner(Protocol):
    """One graph of one folder on one backend: what every backend's `open` returns, one per graph.

    `run` takes the graph's inputs by name (numpy, the dtypes and shapes of its `GraphSpec`) and returns every
    output by name, as new numpy arrays the caller owns. It is safe to call from several threads at once: the
    server's batch loop and a `dp:K` template trajectory call the same runners (onnxruntime sessions are
    thread-safe; a backend whose execution state is not serializes its calls). `close` frees what the runner
    holds and is idempotent."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class OrtGraph:
    """One ONNX graph in an onnxruntime InferenceSession (a `GraphRunner`; `InferenceSession.run` is
    thread-safe)."""

    def __init__(self, path: Path, providers: Sequence[str]):
        self.session = ort.session(path, providers)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return ort.run(self.session, feeds)

    def close(self) -> None:
        self.session = None


class OrtBackend:
    name = "onnxruntime"
    capabilities = Capabilities()

    def __init__(self, providers: Sequence[str] | None = None):
        self.providers = ort.choose_providers(providers)

    def open(self, folder: Path, manifest: Manifest) -> dict[str, OrtGraph]:
        return {g: OrtGraph(Path(folder) / rec.file, self.providers) for g, rec in manifest.graphs.items()
                if g in SPECS}

    def describe(self) -> str:
        return f"onnxruntime ({self.providers[0]})"

    def close(self) -> None:
        pass


def backend_class(name: str):
    """The class registered as `name`; the TensorRT one is imported here, lazily."""
    if name not in REGISTRY:
        raise BackendError("backend", " | ".join(NAMES), name)
    module, cls = REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, OSError) as e:  # OSError: a wheel whose shared library does not load
        raise BackendError(f"{name} backend", "its Python packages importable", f"{type(e).__name__}: {e}")
