"""Artifact folders: the manifest that records what made them, atomic writes, hashing. Torch-free.

A folder is finished when its `manifest.json` exists: graphs are written first (each to a temporary name,
then renamed), the manifest last. Every stage reads the previous stage's manifest, never its objects.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterator

from .config import Config
from .errors import ArtifactError
from .specs import BatchProfile

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
BACKENDS = ("onnxruntime", "tensorrt")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; artifacts are ordinary files
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(parent: Path, name: str) -> Iterator[Path]:
    """A scratch folder inside `parent` (same filesystem, so renames out of it are atomic); removed after."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def library_versions(names=("ddt-export", "numpy", "onnx", "onnxruntime", "onnxscript", "torch", "tensorrt",
                             "nvidia-modelopt", "polygraphy", "diffusers")) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Manifest:
    """What an artifact folder holds and what made it."""

    config: Config
    precision: str = "fp32"
    backend: str = "onnxruntime"
    source: dict = field(default_factory=dict)  # {"path", "sha256", "weights"}
    graphs: dict = field(default_factory=dict)  # name -> {"file", "sha256", ...}
    batch: BatchProfile = field(default_factory=BatchProfile)
    versions: dict = field(default_factory=library_versions)
    extra: dict = field(default_factory=dict)  # stage-specific records (TensorRT, quantization, schedules)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @staticmethod
    def from_dict(d: dict, where: str = "manifest") -> "Manifest":
        if d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{where}: format_version", FORMAT_VERSION, d.get("format_version"),
                                "written by another ddt-export version; export again")
        try:
            return Manifest(config=Config.from_dict(d["config"]), precision=d["precision"], backend=d["backend"],
                            source=d["source"], graphs=d["graphs"], batch=BatchProfile(**d["batch"]),
                            versions=d["versions"], extra=d.get("extra", {}), created=d["created"])
        except (KeyError, TypeError) as e:
            raise ArtifactError(where, "a ddt-export manifest", f"missing or malformed key {e}")

    def write(self, folder: Path) -> Path:
        write_json(Path(folder) / MANIFEST, self.to_dict())
        return Path(folder) / MANIFEST

    def same_model(self, other: "Manifest") -> bool:
        """Same weights and architecture (the precision and backend may differ)."""
        return (self.source.get("sha256") == other.source.get("sha256")
                and self.source.get("weights") == other.source.get("weights")
                and self.config.model == other.config.model)


def read_manifest(folder: Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError("engine folder", "an existing folder written by `ddt-export export` or `build`", str(folder))
    if not path.is_file():
        raise ArtifactError(f"{folder}", f"a finished artifact folder with {MANIFEST}", "no manifest",
                            "an interrupted or foreign folder; export or build again")
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
        f = Path(folder) / g["file"]
        if not f.is_file():
            bad.append(f"{g['file']}: missing")
        elif g.get("sha256") and sha256_file(f) != g["sha256"]:
            bad.append(f"{g['file']}: sha256 differs from the manifest")
    if bad:
        raise ArtifactError(f"graphs in {folder}", "files matching manifest.json", "; ".join(bad),
                            "rebuild with --force")


def check_target_folder(folder: Path, incoming: Manifest, force: bool) -> None:
    """Refuse to write over a folder holding a different model's artifacts, unless `force`."""
    path = Path(folder) / MANIFEST
    if force or not path.is_file():
        return
    try:
        existing = Manifest.from_dict(json.loads(path.read_text()), str(path))
    except (ArtifactError, json.JSONDecodeError):
        raise ArtifactError(str(folder), "an empty folder or one of this model's", "an unreadable manifest",
                            "pass --force to overwrite")
    if not existing.same_model(incoming):
        raise ArtifactError(
            str(folder), f"artifacts of {incoming.config.name} (sha256 {incoming.source.get('sha256', '')[:12]})",
            f"artifacts of {existing.config.name} (sha256 {existing.source.get('sha256', '')[:12]})",
            "pass --force to overwrite")
