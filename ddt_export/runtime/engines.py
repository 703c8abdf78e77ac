"""Engines: the graphs of one artifact folder behind one small interface, backend chosen once at load.

`load_engines(folder)` reads and verifies the manifest, picks the backend (ONNX Runtime here; TensorRT
through `ddt_export.runtime.trt`, imported only when a folder asks for it), and returns an `Engines` whose
`encoder(x, t, y) -> s`, `decoder(x, s) -> v` and `vae_decoder(latent) -> image` (None when the folder has
no VAE) each make exactly one graph call, with every input and output checked against `ddt_export.specs`.

A backend opens one graph as a runner: `runner.run(feeds: dict[str, ndarray]) -> dict[str, ndarray]`
(outputs by name). The TensorRT module provides
`open_graphs(folder: Path, manifest: Manifest) -> dict[graph name, runner]` with the same runner contract.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import Config
from ..errors import ArtifactError, BackendError, InputError
from ..manifest import Manifest, read_manifest, verify_graphs
from ..specs import DECODER, ENCODER, SPECS, VAE_DECODER, GraphSpec, model_dims

BACKEND_CHOICES = ("auto", "onnxruntime", "tensorrt")
AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # first available wins; TensorRT EP on request


class OrtGraph:
    """One ONNX graph in an onnxruntime InferenceSession."""

    def __init__(self, path: Path, providers: Sequence[str]):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own untyped exceptions for unreadable graphs
            raise ArtifactError(str(path), "a graph onnxruntime can load", f"{type(e).__name__}: {e}")
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


def choose_providers(requested: Sequence[str] | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise BackendError("onnxruntime providers", f"some of {available}", ", ".join(missing))
        return list(requested)
    return [p for p in AUTO_PROVIDERS if p in available][:1] or list(available[:1])


class Engines:
    """The loaded graphs of one folder; each method is one graph call with checked shapes and dtypes."""

    def __init__(self, folder: Path, manifest: Manifest, backend_name: str, runners: dict):
        self.folder, self.manifest, self.backend_name = Path(folder), manifest, backend_name
        self._runners = runners
        vae_rec = manifest.graphs.get(VAE_DECODER.name, {})
        self.dims = model_dims(manifest.config.model, vae_rec.get("image_channels", 3), vae_rec.get("factor", 8))
        vae = runners.get(VAE_DECODER.name)
        self.vae_decoder: Callable[[np.ndarray], np.ndarray] | None = self._vae_decoder if vae else None

    @property
    def config(self) -> Config:
        return self.manifest.config

    @property
    def max_batch(self) -> int:
        return self.manifest.batch.max

    @property
    def min_batch(self) -> int:
        return self.manifest.batch.min

    def encoder(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x (B, C, H, W) float32, t (B,) float32, y (B,) int64 -> s (B, L, D) float32."""
        return self._call(ENCODER, {"x": x, "t": t, "y": y})["s"]

    def decoder(self, x: np.ndarray, s: np.ndarray) -> np.ndarray:
        """x (B, C, H, W) float32, s (B, L, D) float32 -> v (B, C, H, W) float32."""
        return self._call(DECODER, {"x": x, "s": s})["v"]

    def _vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        """latent (B, C, H, W) float32, the sampler's output as is -> image (B, IC, IH, IH) float32 in about [-1, 1]."""
        return self._call(VAE_DECODER, {"latent": latent})["image"]

    def _call(self, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = feeds[spec.inputs[0].name].shape[0] if feeds[spec.inputs[0].name].ndim else -1
        if not 1 <= batch <= self.max_batch:
            raise InputError(f"{spec.name} batch", f"1..{self.max_batch} rows (manifest batch.max)", batch)
        for t in spec.inputs:
            a = feeds[t.name]
            want = t.shape(self.dims, batch)
            if not isinstance(a, np.ndarray) or a.dtype != np.dtype(t.dtype) or a.shape != want:
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise InputError(f"{spec.name} input {t.name}", f"{t.dtype} {want}", got)
        outs = self._runners[spec.name].run(feeds)
        for t in spec.outputs:
            o = outs[t.name]
            want = t.shape(self.dims, batch)
            if o.dtype != np.dtype(t.dtype) or o.shape != want:
                raise ArtifactError(f"{self.folder}: {spec.name} output {t.name}", f"{t.dtype} {want}",
                                    f"{o.dtype} {o.shape}", "the graph does not match its manifest")
        return outs


def load_engines(folder: Path, backend: str = "auto", providers: Sequence[str] | None = None) -> Engines:
    """Engines of an export/build folder; the backend is chosen here, once."""
    folder = Path(folder)
    if backend not in BACKEND_CHOICES:
        raise BackendError("--backend", " | ".join(BACKEND_CHOICES), backend)
    man = read_manifest(folder)
    missing = [g for g in (ENCODER.name, DECODER.name) if g not in man.graphs]
    if missing:
        raise ArtifactError(f"{folder}/manifest.json", "encoder and decoder graphs", f"missing {', '.join(missing)}")
    verify_graphs(man, folder)
    name = man.backend if backend == "auto" else backend
    if name != man.backend:
        raise BackendError(f"backend for {folder}", f"{man.backend} (what the folder was built for)", name)
    if name == "tensorrt":
        try:
            trt = importlib.import_module("ddt_export.runtime.trt")
            runners = trt.open_graphs(folder, man)
        except ImportError as e:
            raise BackendError("TensorRT backend", "tensorrt and cuda-python importable with a GPU", repr(e),
                               "install the [tensorrt] extra, or build an onnxruntime folder")
        return Engines(folder, man, "tensorrt", runners)
    if name != "onnxruntime":
        raise ArtifactError(f"{folder}/manifest.json: backend", "onnxruntime | tensorrt", name)
    chosen = choose_providers(providers)
    runners = {g: OrtGraph(folder / rec["file"], chosen) for g, rec in man.graphs.items() if g in SPECS}
    return Engines(folder, man, f"onnxruntime ({chosen[0]})", runners)
