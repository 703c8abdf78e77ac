"""Artifact files and folders: atomic writes, hashes, the folder lock, and the one artifact-folder sequence.

Every stage that writes a folder (export with its VAE, quantize, calibrate, the TensorRT build, the Inception
export) does it through `artifact_folder`:

    with artifact_folder(out, refuse=...) as staging:   # lock out/, drop its manifest (unfinished from here)
        write(staging.path("encoder.onnx"))             # files go to a scratch folder inside out/ ...
        sha = staging.install("encoder.onnx")           # ... and are renamed under their final names
        staging.record = manifest                       # required
    # out/manifest.json is written last, on success only; the scratch folder is removed either way

so a folder is finished exactly when its manifest exists, and an interrupted run never leaves one that looks
finished. The lock (`fcntl.flock` on `.ddt-export.lock` inside the folder, there only while a process holds
it: nothing is left beside or inside the folder afterwards) makes a second process writing the same folder fail
with one line instead of interleaving; nested stages of one process (a build writing its export stages into its
own folder) share it. Torch-free.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import ArtifactError, InputError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path], root: Path) -> str:
    """One sha256 over several files: their paths relative to `root` and their contents, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(Path(p).relative_to(root)).encode() + b"\0" + sha256_file(p).encode() + b"\0")
    return h.hexdigest()


def folder_identity(folder: Path) -> str:
    """sha256 over a folder's files (hidden ones aside), e.g. a diffusers VAE folder: its config and weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("folder", "an existing folder", str(folder))
    files = [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                       p.relative_to(folder).parts)]
    return sha256_files(files, folder)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    if final.is_dir():
        raise InputError("output file", "a file path", f"{final} is a folder")
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


def save_npy(path: Path, a: np.ndarray) -> Path:
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        np.save(f, a)
    return Path(path)


def load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(what, "a readable .npy file", f"{path}: {e}")


def library_versions(names=("ddt-export", "numpy", "onnx", "onnxruntime", "onnxscript", "torch", "tensorrt",
                             "nvidia-modelopt", "polygraphy", "diffusers")) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------ the folder lock

LOCK_FILE = ".ddt-export.lock"  # inside the folder while a process writes it; removed when it lets go


def lock_path(folder: Path) -> Path:
    """The lock file of an artifact folder: `.ddt-export.lock` inside it (hidden, and there only while held)."""
    return Path(folder).resolve() / LOCK_FILE


_HELD: dict[str, list] = {}  # resolved folder -> [lock file descriptor, depth]: this process's locks
_HELD_GUARD = threading.Lock()


def _acquire(path: Path, folder: Path) -> int:
    """An exclusive flock on the file at `path`, created if missing; ArtifactError naming the holder's pid.

    The holder removes the file when it lets go, so a process that opened the file before the removal may get
    the flock on a file no longer at `path` (and a third may create and lock a new one): after the flock, the
    descriptor's inode must still be the one at `path`, else it opens again. So at most one process holds the
    lock of the file at `path`, and the file exists only while someone holds it (or after a SIGKILL, until the
    next run takes and removes it)."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ArtifactError(f"output folder {folder}", "no other ddt-export run writing it",
                                f"locked by {owner}", "wait for that run to finish, or write elsewhere") from None
        except BaseException:
            os.close(fd)
            raise
        held = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder we waited for removed it: take the file at `path` now


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on `folder` for this process (re-entrant within it); another process holding it is an
    ArtifactError naming its pid. The folder is created; the lock file inside it is removed when the lock is
    let go, so a finished run leaves nothing but its outputs."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is None:
        fd = _acquire(lock_path(folder), folder)
        with _HELD_GUARD:
            _HELD[key] = held = [fd, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            held[1] -= 1
            last = held[1] == 0
            if last:
                del _HELD[key]
        if last:
            try:
                lock_path(folder).unlink(missing_ok=True)  # while still holding it (see `_acquire`)
            except OSError:  # a read-only or vanished folder: the lock goes with the descriptor anyway
                pass
            os.close(held[0])  # closing the descriptor releases the flock


class Staging:
    """The scratch side of an artifact folder being written (see the module doc)."""

    def __init__(self, out: Path, scratch: Path):
        self.out, self.scratch = out, scratch
        self.record: object | None = None  # the manifest: a dict, or an object with to_dict()

    def path(self, name: str) -> Path:
        p = self.scratch / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def install(self, name: str) -> str:
        """Move `name` (and its external data `name.data`) from scratch to its final name; data first, file last.
        Returns the installed file's sha256."""
        data, final = self.scratch / f"{name}.data", self.out / name
        final.parent.mkdir(parents=True, exist_ok=True)
        if data.exists():
            os.replace(data, self.out / f"{name}.data")
        else:
            (self.out / f"{name}.data").unlink(missing_ok=True)
        os.replace(self.scratch / name, final)
        return sha256_file(final)


@contextlib.contextmanager
def artifact_folder(out: Path, *, manifest: str = MANIFEST, refuse: Callable[[Path], None] | None = None
                    ) -> Iterator[Staging]:
    """Write an artifact folder: lock, `refuse(out)` (raises to keep a foreign folder), unfinished from here,
    scratch, install; the manifest (`staging.record`) last. See the module doc."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError("output folder", "a folder", f"{out} is a file")
    with folder_lock(out):
        if refuse is not None:
            refuse(out)
        (out / manifest).unlink(missing_ok=True)  # the folder is unfinished until the new manifest lands
        with atomic_dir(out, "staging") as scratch:
            staging = Staging(out, scratch)
            yield staging
            if staging.record is None:
                raise AssertionError(f"{out}: finished without a manifest")
            rec = staging.record
            write_json(out / manifest, rec if isinstance(rec, dict) else rec.to_dict())
