"""The output folder of a `generate` run: streamed chunk by chunk, resumable, nothing half-written. Torch-free.

    OUT/run.json                 the run record: what made these samples (a `Provenance`: the engines' with the
                                 run's sampler, and the run's settings in `options`) and whether it finished
    OUT/00000-class3.png ...     --format png: one PNG per sample, native resolution
    OUT/samples.npz              --format npz: ADM-style `arr_0` uint8 (N, H, W, C) and `arr_1` int64 labels (N,)
    OUT/preview/grid.png         the first PREVIEW_SAMPLES samples, tiled (upscaled when tiny)
    OUT/.parts/chunk-000000.npz  one shard per finished chunk while the run is unfinished (removed at the end)

Every file is written under a temporary name and renamed (`core.artifacts.atomic_path`). A chunk is finished
when its shard exists: the shard is written after the chunk's PNGs, and holds what the end of the run assembles
(`image` for the npz, `latent` for --latents-out) with the chunk's indices and labels. So after a kill at any
point (SIGKILL included) a file under a final name is complete, and `--resume` re-runs exactly the chunks
without a shard; it re-runs them whole, with the same batch composition, so the result is the files of an
uninterrupted run. At the end the npz and the latents are assembled from the shards in index order, streamed
(memory stays flat), each renamed into place; then run.json says `complete`, then the shards go.

A resume is refused (ArtifactError naming each difference, `Provenance.diff`) when the run there was made with
other settings or other engines. A run without --resume first removes what an earlier run left (its samples,
npz, shards, preview, record); other files are left alone. It writes only into a new or empty folder or one an
earlier run wrote (with its run.json): `--out .`, `--out /` or any folder of other files is refused before
anything is written, so a file of the user's that happens to be called `run.json` or `00000-class0.png` is
never removed. The folder is locked (`core.artifacts.folder_lock`) while a run writes it.

Before it writes, a run checks the room it needs (`check_room`): a run that cannot fit on the disk (at least a
filesystem block per PNG, the npz's exact bytes twice, shards then the archive; an inode per file) is refused;
one that might not (PNGs as large as their raw pixels) gets a warning.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.artifacts import LOCK_FILE, atomic_path, write_json
from ...core.errors import ArtifactError
from ...core.images import save_png, tile
from ...core.labels import Labels
from ...core.log import Say
from ...core.provenance import Provenance
from .chunks import Chunk, ChunkPlan, Pending, Result

RUN_RECORD = "run.json"
RECORD_VERSION = 1
NPZ_FILE = "samples.npz"
PARTS = ".parts"
PREVIEW = Path("preview") / "grid.png"
PREVIEW_SAMPLES = 64  # samples in the preview grid (a 50k run does not tile 50k images)
GRID_MIN_SIDE = 256  # grids of tiny images are upscaled (nearest) to at least this many pixels wide
SAMPLE_FILE = "{index:05d}-class{label}.png"  # sample index i with label y: 00003-class7.png ...
SAMPLE_NAME = re.compile(r"\d{5,}-class\d+\.png")  # ... and the pattern that finds them again
FORMATS = ("png", "npz")
# what `atomic_path` names our files while they are written (`.<final name>.<random>.partial`)
PARTIAL = re.compile(r"\.(\d{5,}-class\d+\.png|run\.json|samples\.npz|chunk-\d+\.npz|grid\.png)\..+\.partial")
PNG_MAX_OVERHEAD = 128  # bytes a PNG adds to its raw pixels at most (signature, IHDR, IDAT/zlib framing, IEND)
WARN_BYTES = 1 << 30  # runs that need more than this say so before they start


@dataclass(frozen=True)
class SampleSize:
    """Bytes of one sample's outputs: its uint8 image (IH * IH * IC) and its float32 latent (C * H * W * 4)."""

    image: int
    latent: int
    side: int  # image rows (a PNG row has a filter byte)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_room(out: Path, count: int, formats: Sequence[str], size: SampleSize, latents: bool, say: Say) -> None:
    """Refuse (ArtifactError, nothing written) a run of `count` more samples that cannot fit on the filesystem of
    `out`; warn when it might not. Lower bound: a block per PNG file (its smallest size on disk), the npz's and the
    latents' exact bytes twice (chunk shards, then the archive assembled from them), an inode per file. Upper
    bound: each PNG as large as its raw pixels plus PNG_MAX_OVERHEAD, rounded up to blocks."""
    where = _existing(out)
    st = os.statvfs(where)
    block, free = max(1, st.f_frsize), st.f_bavail * st.f_frsize
    exact = 2 * count * ((size.image if "npz" in formats else 0) + (size.latent if latents else 0))
    pngs = count if "png" in formats else 0
    png_max = -(-(size.image + size.side + PNG_MAX_OVERHEAD) // block) * block
    low, high = exact + pngs * block, exact + pngs * png_max
    what = f"{count} samples ({', '.join(formats)}{', latents' if latents else ''})"
    if low > free:
        raise ArtifactError(f"--out {out}", f"room for {what}: at least {_human(low)}",
                            f"{_human(free)} free on {where}", "free space, write elsewhere, or sample fewer")
    if pngs and st.f_files > 0 and pngs > st.f_favail:  # f_files == 0: the filesystem does not count inodes
        raise ArtifactError(f"--out {out}", f"{pngs} free inodes (one per PNG)", f"{st.f_favail} on {where}",
                            "--format npz writes one file")
    if high > free:
        say(f"warning: {what} may not fit in {out}: up to {_human(high)}, {_human(free)} free (if the disk fills, "
            "free space and run the same command with --resume)")
    elif high >= WARN_BYTES:
        say(f"{what}: up to {_human(high)} in {out}, {_human(free)} free")


def is_run_record(path: Path) -> bool:
    """Whether `path` is a run.json that `generate` wrote."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and "format_version" in rec and "provenance" in rec


def check_out(out: Path) -> None:
    """--out must be a new or empty folder, or one a generate run wrote (its run.json): refused otherwise, before
    anything is written (`--out .` in a project, `--out /`, a folder of the user's files)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError("--out", "a folder for the run's outputs", f"{out} is a file")
    if not out.is_dir() or is_run_record(out / RUN_RECORD):
        return
    try:
        others = sorted(f.name for f in out.iterdir() if f.name != LOCK_FILE)
    except OSError as e:
        raise ArtifactError("--out", "a readable folder", f"{out}: {e.strerror}") from None
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ArtifactError("--out", f"a new or empty folder, or one an earlier generate run wrote ({RUN_RECORD})",
                            f"{out.absolute()} holding {len(others)} other entries ({shown})",
                            "name a folder for this run, e.g. --out samples/")


def shard_name(chunk: Chunk) -> str:
    return f"chunk-{chunk.number:06d}.npz"


def png_path(out: Path, index: int, label: int) -> Path:
    return Path(out) / SAMPLE_FILE.format(index=index, label=int(label))


class RunFolder:
    """One run's output folder: `prepare(resume)` -> the chunks to run -> `write()` each -> `finish()`.

    `record`: the run's provenance; `labels`: the (N,) labels; `formats`: a subset of FORMATS; `latents_out`: the
    --latents-out .npy or None."""

    def __init__(self, out: Path, record: Provenance, labels: Labels, chunks: ChunkPlan,
                 formats: Sequence[str], latents_out: Path | None, say: Say):
        self.out, self.record, self.labels, self.chunks = Path(out), record, labels, chunks
        self.formats, self.latents_out, self.say = tuple(formats), latents_out, say
        self.parts = self.out / PARTS
        self.complete = False  # a resumed run found finished, every file there

    # ----------------------------------------------------------------------------------- start, resume

    def prepare(self, resume: bool, size: SampleSize | None = None) -> Pending:
        """Check the folder (`check_out`) and, with `size`, the room (`check_room`); clean up (fresh) or check the
        record (resume); write the unfinished record; return the chunks to run. Resuming a complete run whose
        files are all there changes nothing and returns no chunks."""
        finished = self._check_resume() if resume and self.out.is_dir() else np.zeros(len(self.chunks), bool)
        check_out(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        pending = Pending(self.chunks, ~finished)
        if self.complete:
            return Pending(self.chunks, np.zeros(len(self.chunks), bool))
        if size is not None:
            check_room(self.out, pending.samples, self.formats, size, self.latents_out is not None, self.say)
        self._remove_partials()
        if not resume:
            self._start_fresh()
        self._write_record(complete=False)
        self.parts.mkdir(exist_ok=True)
        return pending

    def _start_fresh(self) -> None:
        stale = [f for f in self.out.iterdir() if SAMPLE_NAME.fullmatch(f.name)]
        for f in stale:
            f.unlink()
        if stale:
            self.say(f"removed {len(stale)} samples of an earlier run from {self.out}")
        for f in (self.out / NPZ_FILE, self.out / PREVIEW, self.out / RUN_RECORD):
            f.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)

    def _check_resume(self) -> np.ndarray:
        path = self.out / RUN_RECORD
        if not path.is_file():
            leftovers = [f for f in self.out.iterdir() if SAMPLE_NAME.fullmatch(f.name) or f.name == NPZ_FILE]
            if leftovers:
                raise ArtifactError(f"--resume {self.out}", f"a folder written by generate (with {RUN_RECORD})",
                                    f"{len(leftovers)} sample files and no run record",
                                    "run without --resume to start over")
            return np.zeros(len(self.chunks), bool)  # nothing to resume: a fresh run
        try:
            rec = json.loads(path.read_text())
            made = Provenance.from_dict(rec["provenance"], str(path))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ArtifactError(str(path), "a readable generate run record", f"{type(e).__name__}: {e}",
                                "run without --resume to start over")
        diffs = made.diff(self.record)
        if diffs:
            raise ArtifactError(f"--resume {self.out}", "the settings of the run there", "; ".join(diffs),
                                "resume with the same settings, or run without --resume to start over")
        self.complete = bool(rec.get("complete")) and self._final_files_exist()
        return self._finished_chunks()

    def _finished_chunks(self) -> np.ndarray:
        """done[k]: chunk k's shard exists (and, for png, all of its PNGs exist)."""
        done = np.zeros(len(self.chunks), bool)
        for c in self.chunks:
            if not (self.parts / shard_name(c)).is_file():
                continue
            if "png" in self.formats and not all(png_path(self.out, i, y).is_file()
                                                 for i, y in zip(range(c.start, c.stop), self.labels[c.start:c.stop])):
                continue
            done[c.number] = True
        return done

    def _final_files_exist(self) -> bool:
        need = [self.out / PREVIEW] + ([self.out / NPZ_FILE] if "npz" in self.formats else []) + \
            ([self.latents_out] if self.latents_out is not None else [])
        if not all(Path(p).is_file() for p in need):
            return False
        return "png" not in self.formats or all(
            png_path(self.out, c.start + j, y).is_file() for c in self.chunks
            for j, y in enumerate(self.labels[c.start:c.stop]))

    def _remove_partials(self) -> None:
        """Temporary files a killed run left (`atomic_path` names): never taken for anything, removed."""
        for folder in (self.out, self.parts, (self.out / PREVIEW).parent):
            if folder.is_dir():
                for f in folder.iterdir():
                    if PARTIAL.fullmatch(f.name) and f.is_file():
                        f.unlink()
        if self.latents_out is not None:
            lat = Path(self.latents_out)
            for f in lat.parent.glob(f".{lat.name}.*.partial") if lat.parent.is_dir() else ():
                f.unlink()

    def _write_record(self, complete: bool) -> None:
        """run.json: the settings and whether the run finished (nothing else: no times, no paths, so a resumed
        run's record is byte for byte an uninterrupted one's)."""
        rec = {"format_version": RECORD_VERSION, "complete": complete, "num": int(len(self.labels)),
               "chunks": len(self.chunks), "formats": list(self.formats), "provenance": self.record.to_dict()}
        write_json(self.out / RUN_RECORD, rec)

    # ----------------------------------------------------------------------------------- per chunk

    def write(self, chunk: Chunk, res: Result) -> None:
        """One finished chunk: its PNGs, then its shard (the chunk's completion mark)."""
        idx = np.asarray(res["index"])
        if idx.tolist() != list(range(chunk.start, chunk.stop)):
            raise AssertionError(f"chunk {chunk.number}: got indices {idx[:3]}..., expected {chunk.start}..")
        labels = np.asarray(res["label"], np.int64)
        if not np.array_equal(labels, self.labels[chunk.start:chunk.stop]):  # the run's, sliced
            raise AssertionError(f"chunk {chunk.number}: labels differ from the run's")
        if "png" in self.formats:
            for i, y, img in zip(idx, labels, res["image"]):
                save_png(img, png_path(self.out, int(i), int(y)))
        shard = {"index": idx, "label": labels}
        if "npz" in self.formats:
            shard["image"] = np.asarray(res["image"], np.uint8)
        if self.latents_out is not None:
            shard["latent"] = np.asarray(res["latent"], np.float32)
        with atomic_path(self.parts / shard_name(chunk)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **shard)

    # ----------------------------------------------------------------------------------- the end

    def finish(self) -> dict:
        """All chunks finished: assemble the npz and the latents, write the preview, mark the record complete,
        remove the shards. Returns the written files by kind."""
        files = {"preview": self.out / PREVIEW}
        if "png" in self.formats:
            files["png"] = self.out
        if "npz" in self.formats:
            files["npz"] = self.out / NPZ_FILE
        if self.latents_out is not None:
            files["latents"] = Path(self.latents_out)
        if self.complete:
            return files
        missing = [c.number for c in self.chunks if not (self.parts / shard_name(c)).is_file()]
        if missing:
            raise ArtifactError(f"run in {self.out}", f"all {len(self.chunks)} chunks finished",
                                f"{len(missing)} missing (chunk {missing[0]} first)", "run again with --resume")
        if "npz" in self.formats:
            self._assemble_npz(files["npz"])
        if self.latents_out is not None:
            self._assemble_latents(files["latents"])
        self._write_preview()
        self._write_record(complete=True)
        shutil.rmtree(self.parts, ignore_errors=True)
        self.complete = True
        return files

    def _shards(self, key: str):
        for c in self.chunks:
            try:
                with np.load(self.parts / shard_name(c)) as z:
                    a = z[key]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                raise ArtifactError(str(self.parts / shard_name(c)), f"a chunk shard with {key}",
                                    f"{type(e).__name__}: {e}", "delete it and run again with --resume") from None
            if len(a) != c.size:
                raise ArtifactError(str(self.parts / shard_name(c)), f"{c.size} rows of {key}", len(a),
                                    "run again without --resume")
            yield a

    def _assemble_npz(self, final: Path) -> Path:
        first = next(self._shards("image"))
        shape = (len(self.labels), *first.shape[1:])
        with atomic_path(final) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                _write_npy_entry(zf, "arr_0.npy", np.uint8, shape, self._shards("image"))
                _write_npy_entry(zf, "arr_1.npy", np.int64, (len(self.labels),), self.labels.blocks())
        return final

    def _assemble_latents(self, final: Path) -> Path:
        first = next(self._shards("latent"))
        with atomic_path(final) as tmp, open(tmp, "wb") as f:
            _write_npy(f, np.float32, (len(self.labels), *first.shape[1:]), self._shards("latent"))
        return final

    def _write_preview(self) -> Path:
        n = min(PREVIEW_SAMPLES, len(self.labels))
        imgs, got = [], 0
        for c in self.chunks:
            if got >= n:
                break
            if "npz" in self.formats:
                with np.load(self.parts / shard_name(c)) as z:
                    part = z["image"][: n - got]
            else:
                stop = min(c.stop, c.start + n - got)
                part = np.stack([_read_png(png_path(self.out, i, y))
                                 for i, y in zip(range(c.start, stop), self.labels[c.start:stop])])
            imgs.append(part)
            got += len(part)
        u8 = np.concatenate(imgs)
        return save_png(tile(u8, int(np.ceil(np.sqrt(len(u8))))), self.out / PREVIEW, GRID_MIN_SIDE)


def _read_png(path: Path) -> np.ndarray:
    """(H, W, C) uint8 of a sample PNG (as `core.images.png_image` wrote it: L or RGB)."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _write_npy(f, dtype, shape: tuple[int, ...], parts) -> None:
    """An .npy of `shape` written part by part (each part C-ordered rows of the array): flat memory."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_2_0(f, header) if _header_too_big(header) else \
        np.lib.format.write_array_header_1_0(f, header)
    rows = 0
    for p in parts:
        p = np.ascontiguousarray(p, dtype)
        if p.shape[1:] != shape[1:]:
            raise AssertionError(f"part of shape {p.shape} in an array of {shape}")
        f.write(p.tobytes())
        rows += len(p)
    if rows != shape[0]:
        raise AssertionError(f"{rows} rows written, {shape[0]} declared")


def _write_npy_entry(zf: zipfile.ZipFile, name: str, dtype, shape, parts) -> None:
    with zf.open(name, "w", force_zip64=True) as f:
        _write_npy(f, dtype, shape, parts)


def _header_too_big(header: dict) -> bool:
    return len(repr(header)) > 65000  # npy format 1.0 holds a header of at most 65535 bytes
