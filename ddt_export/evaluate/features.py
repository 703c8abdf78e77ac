"""Feature extractors for FID: ONNX graphs under onnxruntime, torch-free.

An extractor implements `FeatureExtractor`: `extract(images)` takes uint8 NHWC images in [0, 255] (channels 1
or 3) and returns float64 features (N, d). ONNX extractors also have `activations(images)`: every output the
graph has of `features` (FID), `spatial` (sFID) and `logits` (Inception Score), as `evaluate.adm.Activations`.
- `DigitsFeatures` runs the bundled `assets/digits_features.onnx` (16x16 grayscale digits: 64-d features, 10
  logits, 448-d spatial features);
- `InceptionFeatures` runs `inception_fid.onnx` from `ddt-export fid-inception` (pytorch-fid's convention; see
  `ddt_export.export.inception` for how it differs from ADM's TensorFlow graph, and which tensor `spatial` is).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from ..core.artifacts import sha256_file
from ..core.config import ASSETS
from ..core.errors import ArtifactError, ConfigError, InputError, NumericsError
from ..runtime.graphs import ort
from .adm import Activations

DIGITS_ONNX = ASSETS / "digits_features.onnx"
DIGITS_STATS = ASSETS / "digits_stats.npz"
DIGITS_SIZE = 16
INCEPTION_DIM = 2048
FEATURES = ("digits", "inception")
OUTPUTS = ("features", "spatial", "logits")  # graph outputs -> Activations.pool, .spatial, .logits
DEFAULT_BATCH = 50
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's convert("L")


class FeatureExtractor(Protocol):
    name: str

    def extract(self, images: np.ndarray) -> np.ndarray:
        """images (N, H, W, C) uint8 in [0, 255], C in {1, 3} -> features (N, d) float64."""
        ...


def check_images(images: np.ndarray, where: str = "images") -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) with C in {1, 3, 4} -> (N, H, W, C) with C in {1, 3} (alpha dropped)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InputError(where, "uint8 images in [0, 255]", images.dtype,
                         "convert sampler output with core.images.images_from_samples")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InputError(where, "(N, H, W, C) with C in 1, 3, 4 (NHWC)", images.shape)
    return images[..., :3]


class OnnxFeatures:
    """An ONNX graph `image` -> `features` (N, d) under onnxruntime, run in batches. Subclasses preprocess."""

    name = "onnx"
    missing_hint = "a graph with input `image` and output `features`"  # what to do when the file is not there
    outputs_hint = "a graph with that output"  # where a graph with `spatial` and `logits` comes from

    def __init__(self, path: Path, batch: int = DEFAULT_BATCH, dim: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.name} feature extractor", "an ONNX file", f"no file {self.path}",
                                self.missing_hint)
        if batch < 1:
            raise ConfigError("--batch", ">= 1", batch)
        self.batch = batch
        self.session = ort.session(self.path, providers=None)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if "image" not in inputs or "features" not in outputs:
            raise ArtifactError(str(self.path), "input `image` and output `features`",
                                f"inputs {inputs}, outputs {list(outputs)}")
        self.dim = outputs["features"][1] if isinstance(outputs["features"][1], int) else None
        self.outputs = tuple(o for o in OUTPUTS if o in outputs)  # what activations() returns
        if dim is not None and self.dim not in (None, dim):
            raise ArtifactError(f"{self.path}: features", f"(N, {dim})", f"(N, {self.dim})")

    def preprocess(self, images: np.ndarray) -> np.ndarray:  # (n, H, W, C) uint8 -> the graph's float32 input
        raise NotImplementedError

    def extract(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images, f"images for the {self.name} features")
        out = [self.session.run(["features"], {"image": self.preprocess(images[i:i + self.batch])})[0]
               for i in range(0, len(images), self.batch)]
        feats = np.concatenate(out).astype(np.float64) if out else np.zeros((0, self.dim or 0))
        if not np.isfinite(feats).all():
            raise NumericsError(f"{self.name} features from {self.path}", "finite values", "inf/nan")
        return feats

    def activations(self, images: np.ndarray) -> Activations:
        """images (N, H, W, C) uint8 -> Activations of every output the graph has, float32 as emitted."""
        images = check_images(images, f"images for the {self.name} features")
        runs = [self.session.run(list(self.outputs), {"image": self.preprocess(images[i:i + self.batch])})
                for i in range(0, len(images), self.batch)]
        if not runs:
            raise InputError(f"images for the {self.name} features", "at least one image", "none")
        out = {name: np.concatenate([r[j] for r in runs]) for j, name in enumerate(self.outputs)}
        for name, a in out.items():
            if not np.isfinite(a).all():
                raise NumericsError(f"{self.name} `{name}` from {self.path}", "finite values", "inf/nan")
        return Activations(out["features"], out.get("spatial"), out.get("logits"))

    def missing(self) -> dict[str, str]:
        """{activation: why it is absent} for the outputs this graph lacks."""
        return {name: f"{self.path} has no `{name}` output ({self.outputs_hint})"
                for name in OUTPUTS if name not in self.outputs}


class DigitsFeatures(OnnxFeatures):
    """The bundled digits extractor: (N, 16, 16, 1|3) uint8 -> (N, 64). Graph input (N, 1, 16, 16) in [-1, 1]."""

    name = "digits"
    missing_hint = "the bundled one is made by scripts/train_digits_features.py"
    outputs_hint = "scripts/train_digits_features.py makes the bundled one with all three"

    def __init__(self, path: Path | None = None, batch: int = DEFAULT_BATCH):
        super().__init__(DIGITS_ONNX if path is None else path, batch)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        n, h, w, c = images.shape
        if (h, w) != (DIGITS_SIZE, DIGITS_SIZE):
            raise InputError("images for the digits features", f"{DIGITS_SIZE}x{DIGITS_SIZE}", f"{h}x{w}",
                             "the digits extractor is for the bundled 16x16 model's samples")
        gray = images[..., 0] if c == 1 else np.rint(images.astype(np.float32) @ LUMA.astype(np.float32))
        x = gray.astype(np.float32) / 127.5 - 1.0  # the official uint82fp: (x - 127.5) / 127.5
        return np.ascontiguousarray(x[:, None])  # n x 1 x 16 x 16


class InceptionFeatures(OnnxFeatures):
    """FID Inception-v3 (pytorch-fid convention): (N, H, W, 1|3) uint8 RGB -> pool_3 (N, 2048).

    Graph input (N, 3, H, W) float32 in [0, 1]; the graph resizes to 299 and scales to [-1, 1] itself.
    A folder written by `ddt-export fid-inception` has `inception_fid.json` beside the graph: its sha256 must match.
    """

    name = "inception"
    missing_hint = "export it with `ddt-export fid-inception`"
    outputs_hint = "graphs exported before the ADM metrics have `features` only: export it again with " \
                   "`ddt-export fid-inception`"

    def __init__(self, path: Path, batch: int = DEFAULT_BATCH):
        path = Path(path)
        info = path.with_suffix(".json")
        if path.is_file() and info.is_file():
            try:
                recorded = json.loads(info.read_text()).get("sha256")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ArtifactError(str(info), "the JSON written by `ddt-export fid-inception`", repr(e))
            if recorded and recorded != sha256_file(path):
                raise ArtifactError(str(path), f"the graph recorded in {info.name} (sha256 {recorded[:12]})",
                                    "a different file", "export it again with `ddt-export fid-inception`")
        super().__init__(path, batch, dim=INCEPTION_DIM)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)  # grayscale -> RGB, as PIL's convert("RGB")
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0  # n x 3 x H x W


def make_extractor(features: str = "digits", inception_onnx: Path | None = None,
                   batch: int = DEFAULT_BATCH) -> FeatureExtractor:
    if features == "digits":
        return DigitsFeatures(batch=batch)
    if features == "inception":
        if inception_onnx is None:
            raise ConfigError("--inception-onnx", "inception_fid.onnx written by `ddt-export fid-inception`",
                              "nothing", "needed with --features inception")
        return InceptionFeatures(inception_onnx, batch=batch)
    raise ConfigError("--features", " | ".join(FEATURES), features)
