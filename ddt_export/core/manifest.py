"""The manifest of an engine folder: what it holds (graphs, dims, batch) and what made it (its provenance).

A folder is finished when its `manifest.json` exists (`core.artifacts.artifact_folder` writes it last). Every
stage reads the previous stage's manifest, never its objects; every reuse decision asks the provenance.
Torch-free.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import MANIFEST, library_versions, sha256_file
from .config import Config
from .errors import ArtifactError
from .precision import Precision, precision
from .provenance import Provenance, Source
from .specs import BatchProfile, Dims

FORMAT_VERSION = 2


@dataclass
class GraphRecord:
    """One graph (or TensorRT plan) of the folder. `parity`: measurements by reference (`vs_pytorch`,
    `vs_fp32_onnx`, `onnxruntime`, `torch_bf16`); `info`: what the stage that made it records (FP8
    quantization report, VAE scaling factor and source, the ONNX graph a plan was built from)."""

    file: str
    sha256: str
    parity: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "parity": self.parity, "info": self.info}


@dataclass
class Manifest:
    name: str  # the config's name (presets: ddt-xl-256, ...)
    provenance: Provenance
    dims: Dims
    backend: str = "onnxruntime"
    source: Source = field(default_factory=Source)
    graphs: dict[str, GraphRecord] = field(default_factory=dict)
    tensorrt: dict | None = None  # TensorRT folders: profiles, timing cache, strongly typed
    notes: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    format_version: int = FORMAT_VERSION

    @property
    def config(self) -> Config:
        return Config(self.name, self.provenance.model, self.provenance.sampler)

    @property
    def precision(self) -> str:
        return self.provenance.precision

    @property
    def precision_row(self) -> Precision:
        return precision(self.provenance.precision)

    @property
    def batch(self) -> BatchProfile:
        return self.provenance.batch

    def same_model(self, other: "Manifest") -> bool:
        """Same weights and architecture (the precision and backend may differ)."""
        return self.provenance.same_model(other.provenance)

    def to_dict(self) -> dict:
        return {"format_version": self.format_version, "name": self.name, "provenance": self.provenance.to_dict(),
                "dims": self.dims.as_dict(), "backend": self.backend, "source": self.source.to_dict(),
                "graphs": {k: g.to_dict() for k, g in self.graphs.items()}, "tensorrt": self.tensorrt,
                "notes": self.notes, "versions": self.versions, "created": self.created}

    @staticmethod
    def from_dict(d: dict, where: str = "manifest") -> "Manifest":
        if d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{where}: format_version", FORMAT_VERSION, d.get("format_version"),
                                "written by another ddt-export version; export or build again")
        try:
            return Manifest(name=d["name"], provenance=Provenance.from_dict(d["provenance"], where),
                            dims=Dims(**d["dims"]), backend=d["backend"], source=Source(**d["source"]),
                            graphs={k: GraphRecord(**g) for k, g in d["graphs"].items()}, tensorrt=d.get("tensorrt"),
                            notes=list(d.get("notes", [])), versions=d["versions"], created=d["created"])
        except (KeyError, TypeError) as e:
            raise ArtifactError(where, "a ddt-export manifest", f"missing or malformed key {e}")

    def write(self, folder: Path) -> Path:
        from .artifacts import write_json

        write_json(Path(folder) / MANIFEST, self.to_dict())
        return Path(folder) / MANIFEST


def read_manifest(folder: Path, hint: str = "") -> Manifest:
    """The manifest of a finished folder; `hint` says which command makes one (in the error when missing)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError("engine folder", "an existing folder written by `ddt-export export` or `build`",
                            f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder", hint)
    if not path.is_file():
        raise ArtifactError(f"{folder}", f"a finished artifact folder with {MANIFEST}", "no manifest",
                            hint or "an interrupted or foreign folder; export or build again")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(str(path), "valid JSON", str(e))
    return Manifest.from_dict(d, str(path))


def verify_graphs(man: Manifest, folder: Path, names=None) -> None:
    """Check every listed graph file exists with the recorded sha256: a stale artifact is refused."""
    bad = []
    for name, g in man.graphs.items():
        if names is not None and name not in names:
            continue
        f = Path(folder) / g.file
        if not f.is_file():
            bad.append(f"{g.file}: missing")
        elif sha256_file(f) != g.sha256:
            bad.append(f"{g.file}: sha256 differs from the manifest")
    if bad:
        raise ArtifactError(f"graphs in {folder}", "files matching manifest.json", "; ".join(bad),
                            "rebuild with --force")


def refuse_foreign(incoming: Provenance, force: bool):
    """`artifact_folder(refuse=...)` for engine folders: a folder holding another model's artifacts is kept,
    unless `force`."""

    def check(folder: Path) -> None:
        path = Path(folder) / MANIFEST
        if force or not path.is_file():
            return
        try:
            existing = Manifest.from_dict(json.loads(path.read_text()), str(path))
        except (ArtifactError, json.JSONDecodeError):
            raise ArtifactError(str(folder), "an empty folder or one of this model's", "an unreadable manifest",
                                "pass --force to overwrite")
        diffs = existing.provenance.diff(incoming, ("weights", "model"))
        if diffs:
            raise ArtifactError(str(folder), f"artifacts of the model being written ({'; '.join(diffs)})",
                                f"artifacts of {existing.name}", "pass --force to overwrite")

    return check
