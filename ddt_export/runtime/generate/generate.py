"""`generate`: the library side of the production command. Torch-free.

engines folder -> the request resolved once (`sampling.request`) -> the run cut into chunks that fit the
engines' batch range (`chunks`) -> each chunk: per-sample noise (`core.noise`, or rows of a .npy), the engines'
loop (host or device) on the request's encoder schedule (`sampling.schedules`), the VAE decoder graph when the
folder has one (else the latents are the image), uint8 images -> written as soon as the chunk finishes
(`run_folder`: PNGs and/or an ADM-style npz, resumable, nothing half-written).

Memory is flat in --num: only one chunk is in flight per worker, and the end assembles the npz and the latents
from the chunks' shards in a stream. The chunks run on an executor: `chunks.LocalExecutor` (this process) or
`ddt_export.scale.ray_data.RayExecutor` (a Ray actor pool); the files are the same bit for bit.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.artifacts import folder_lock, save_npy, sha256_file
from ...core.config import SamplerConfig
from ...core.errors import ArtifactError, BackendError, InputError
from ...core.log import Progress, Say
from ...core.manifest import Manifest
from ...core.provenance import Provenance
from ..sampling.plan import plan_steps, saved_fraction, work_rows
from ..sampling.plans import lookup
from ..sampling.request import CLI, RequestInput, SampleRequest, resolve
from .chunks import ChunkPlan, LocalExecutor, Pending, RunSpec, check_chunk, graph_identity, plan_chunks
from .run_folder import FORMATS, RunFolder
from .run_folder import SampleSize, check_out, check_room

NOISE_CHECK_ROWS = 4096  # rows of a --noise file checked for NaN/Inf at a time (the file is memory-mapped)


@dataclass(frozen=True)
class RunOptions:
    """How a run samples and where it writes (the request itself is a `RequestInput`)."""

    out_dir: Path | str | None = None  # None: return the latents (library use); "" is refused
    formats: str | Sequence[str] = "png"  # png | npz | png,npz
    resume: bool = False
    chunk: int | None = None  # images per chunk (default: batch.max // 2)
    latents_out: Path | None = None  # also write the final latents as .npy
    noise_file: Path | None = None  # (N, C, H, W) .npy instead of the noise function
    backend: str = "auto"
    device_loop: bool = True  # False keeps the host loop on a TensorRT folder (`load_engines`), on every worker
    cond_only_outside: bool = True


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """`png`, `npz` or `png,npz` -> the formats, in FORMATS order."""
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    if not items or any(p not in FORMATS for p in items):
        raise InputError("--format", "png | npz | png,npz", text if isinstance(text, str) else ",".join(text))
    return tuple(f for f in FORMATS if f in items)


def noise_rows(path: Path, latent_shape: tuple[int, ...], num: int | None) -> int:
    """Rows of a --noise .npy (N, C, H, W) of finite floats, checked without loading it whole."""
    try:
        a = np.load(Path(path), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError("--noise", "a readable .npy file", f"{path}: {e}")
    if a.ndim != 4 or a.shape[1:] != tuple(latent_shape) or a.shape[0] < 1:
        raise InputError("noise", f"(B, {', '.join(map(str, latent_shape))})", a.shape)
    if a.dtype.kind != "f":
        raise InputError("noise", "a floating-point array", a.dtype)
    for lo in range(0, a.shape[0], NOISE_CHECK_ROWS):
        bad = int((~np.isfinite(a[lo:lo + NOISE_CHECK_ROWS])).sum())
        if bad:
            raise InputError("noise", "finite values", f"{bad} NaN/Inf in rows {lo}..")
    if num is not None and a.shape[0] != num:
        raise InputError("--noise", f"{num} samples (--num)", a.shape[0])
    return int(a.shape[0])


def run_provenance(man: Manifest, job: RunSpec, spec: str, chunk: int, formats: Sequence[str],
                   latents: bool, plan: str | None = None) -> Provenance:
    """What made a run's files: the engines' provenance with the run's sampler; the build's options (`build.*`)
    and the run's settings in `options`. `RunFolder` refuses a resume when any of it differs."""
    options = {f"build.{k}": v for k, v in man.provenance.options}
    options.update({
        "engines": hashlib.sha256(repr(job.graphs).encode()).hexdigest()[:16],
        "backend": man.backend, "num": len(job.labels), "seed": job.seed,
        "labels": job.labels.digest()[:16],  # = sha256 of the int64 array's bytes, computed in blocks
        "noise": sha256_file(Path(job.noise_file))[:16] if job.noise_file else "core.noise (seed, index)",
        "schedule": f"{spec} {list(job.recompute)}", "cond_only_outside": job.cond_only_outside, "plan": plan,
        "chunk": chunk, "formats": ",".join(formats), "latents": latents})
    return man.provenance.replace(sampler=job.sampler, options=options)


@dataclass
class GenerateResult:
    request: SampleRequest  # what ran: labels, seed, sampler, schedule and its recompute steps
    rows: dict[str, int]  # graph-call rows of the whole run and of the official full-batch loop
    saved: float  # block-weighted fraction of the full-batch work saved by cond-only rows
    chunks: int  # chunks of the run (images per chunk: `chunk`)
    chunk: int
    new: int = 0  # sampled by this call (num minus those a resumed run found finished)
    chunks_run: int = 0  # chunks sampled by this call
    was_complete: bool = False  # a resumed run found complete: nothing sampled, nothing written
    backend: str = ""
    workers: int = 1
    seconds: float = 0.0  # sampling wall time of this call (first chunk dispatched to last chunk written)
    files: dict[str, Path] = dataclasses.field(default_factory=dict)  # png (the folder), npz, latents, preview
    duplicates: int = 0  # chunks an executor delivered twice (ignored; 0 unless an executor misbehaves)
    chunks_by_worker: dict[int, int] = dataclasses.field(default_factory=dict)  # worker pid -> chunks it sampled
    latents: np.ndarray | None = None  # (num, C, H, W) float32, only without out_dir (held in memory)
    loop: str = "host"  # the loop that ran: "device" (TensorRT, x and s on the GPU) or "host"

    @property
    def num(self) -> int:
        return self.request.num

    @property
    def labels(self) -> np.ndarray:
        return self.request.labels

    @property
    def sampler(self) -> SamplerConfig:
        return self.request.sampler

    @property
    def schedule(self) -> list[int]:
        return list(self.request.recompute)

    @property
    def schedule_spec(self) -> str:
        return str(self.request.schedule)

    @property
    def resumed(self) -> int:
        return self.num - self.new

    @property
    def images_per_s(self) -> float:
        return self.new / self.seconds if self.seconds > 0 else float("nan")

    @property
    def grid(self) -> Path | None:
        return self.files.get("preview")


def generate(engines_dir: Path, given: RequestInput = RequestInput(), options: RunOptions = RunOptions(), *,
             executor=None, progress: Progress | None = None, say: Say = print) -> GenerateResult:
    """Sample the request's images in chunks; with `options.out_dir`, stream them to files (resumable), else
    return the latents. progress(done, total) counts samples (those a resumed run found finished included).
    A filesystem that refuses the writes (read-only, full, no permission) is an ArtifactError naming the file."""
    try:
        return _generate(engines_dir, given, options, executor, progress, say)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_error(e, options) from None


WRITE_ERRNOS = {errno.EROFS: "a read-only file system", errno.ENOSPC: "no space left on the device",
                errno.EDQUOT: "the disk quota exceeded", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.EFBIG: "a file larger than the limit"}


def write_error(e: OSError, options: RunOptions) -> ArtifactError:
    """An OSError of a write -> one line naming the file, what was expected and what the filesystem said."""
    where = e.filename or options.out_dir or options.latents_out
    if e.errno in (errno.EACCES, errno.EPERM):  # reading the engines or writing the run: name the file only
        return ArtifactError(str(where), "a file this user may read and write", WRITE_ERRNOS[e.errno])
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    hint = ("free space, then the same command with --resume keeps the finished chunks" if full and
            options.out_dir is not None else "write elsewhere (--out)" if options.out_dir is not None else "")
    return ArtifactError(f"writing {where}", "a writable folder with room for the run" if full else
                         "a writable folder", WRITE_ERRNOS[e.errno], hint)


def _generate(engines_dir: Path, given: RequestInput, options: RunOptions, executor, progress: Progress | None,
              say: Say) -> GenerateResult:
    o = options
    formats = parse_formats(o.formats)
    if o.out_dir is not None and not str(o.out_dir).strip():
        raise InputError("--out", "a folder path for the run", repr(str(o.out_dir)))
    if o.out_dir is not None and Path(o.out_dir).exists() and not Path(o.out_dir).is_dir():
        raise InputError("--out", "a folder for the run's outputs", f"{o.out_dir} is a file")
    if o.out_dir is None and o.resume:
        raise InputError("--resume", "an output folder (--out)", "none")
    if o.out_dir is not None and not o.resume:
        check_out(Path(o.out_dir))  # a folder of other files: refused before anything is opened or written
    executor = executor or LocalExecutor()
    with executor.open(Path(engines_dir), o.backend, say, device_loop=o.device_loop) as man:
        m = man.config.model
        if o.noise_file is not None:
            given = dataclasses.replace(given, num=noise_rows(o.noise_file, m.latent_shape, given.num))
        request = resolve(man.config, given, CLI, lookup(engines_dir, man))  # every bad flag refused here, first
        size = check_chunk(o.chunk, man)
        request = executor.resolve_schedule(request, say)
        chunks = plan_chunks(request.num, size)
        job = RunSpec(str(Path(engines_dir).absolute()), o.backend, graph_identity(man), request.sampler,
                      request.recompute, o.cond_only_outside, request.seed, request.label_seq,
                      # absolute paths: a Ray worker's cwd is not the driver's
                      str(Path(o.noise_file).absolute()) if o.noise_file is not None else None,
                      images=o.out_dir is not None, latents=o.out_dir is None or o.latents_out is not None,
                      device_loop=o.device_loop)
        rows = work_rows(plan_steps(request.sampler, request.recompute, o.cond_only_outside), request.num)
        saved = saved_fraction(rows, m.num_encoder_blocks, m.num_blocks - m.num_encoder_blocks)
        result = GenerateResult(request=request, rows=rows, saved=saved, chunks=len(chunks), chunk=size)
        if o.out_dir is None:
            _in_memory(executor, job, chunks, result, progress)
            if o.latents_out is not None:
                result.files["latents"] = save_npy(o.latents_out, result.latents)
        else:
            record = run_provenance(man, job, str(request.schedule), size, formats, o.latents_out is not None,
                                    request.plan)
            side, channels = man.dims.image
            room = SampleSize(image=side * side * channels, latent=4 * int(np.prod(m.latent_shape)), side=side)
            if not o.resume:  # before the lock makes the folder: a run that cannot fit writes nothing
                check_room(Path(o.out_dir), request.num, formats, room, o.latents_out is not None, say)
            with folder_lock(Path(o.out_dir)):
                run = RunFolder(Path(o.out_dir), record, request.label_seq, chunks, formats, o.latents_out, say)
                pending = run.prepare(o.resume, room if o.resume else None)  # a resume: the samples it owes
                result.was_complete = run.complete
                _stream(executor, job, pending, run, result, progress, say)
                result.files = run.finish()
        result.backend, result.workers, result.loop = executor.describe(), executor.workers, executor.loop
        return result


def _stream(executor, job: RunSpec, pending: Pending, run: RunFolder, result: GenerateResult,
            progress: Progress | None, say: Say) -> None:
    """Run the pending chunks on the executor, writing each as it arrives; counts what this call sampled. The
    chunks still owed are one flag each (`left`), so memory does not grow with the run."""
    total = len(job.labels)
    done = total - pending.samples
    if done and not run.complete:
        say(f"resuming {run.out}: {done} of {total} samples already there, {len(pending)} chunks to run")
    if progress is not None:
        progress(done, total)
    left = pending.todo.copy()
    t0 = time.perf_counter()
    if len(pending):
        for res in executor.map(job, pending):
            k = int(res["chunk"][0])
            if not left[k]:  # delivered twice: the first copy is written already (and equal)
                result.duplicates += 1
                continue
            c = pending.plan[k]
            run.write(c, res)
            left[k] = False
            pid = int(res["worker"][0])
            result.chunks_by_worker[pid] = result.chunks_by_worker.get(pid, 0) + 1
            done += c.size
            result.new += c.size
            result.chunks_run += 1
            if progress is not None:
                progress(done, total)
    result.seconds = time.perf_counter() - t0
    if left.any():
        raise BackendError(f"executor {executor.describe()}", f"all {len(pending)} chunks",
                           f"{int(left.sum())} never delivered", "run again with --resume")


def _in_memory(executor, job: RunSpec, chunks: ChunkPlan, result: GenerateResult, progress: Progress | None) -> None:
    """Library use without an output folder: the latents of every chunk, held (the caller asked for them)."""
    total = len(job.labels)
    lat: list[np.ndarray | None] = [None] * len(chunks)
    t0 = time.perf_counter()
    for res in executor.map(job, chunks):
        k = int(res["chunk"][0])
        if lat[k] is not None:
            result.duplicates += 1
            continue
        lat[k] = res["latent"]
        result.new += len(res["latent"])
        result.chunks_run += 1
        if progress is not None:
            progress(result.new, total)
    result.seconds = time.perf_counter() - t0
    if any(x is None for x in lat):
        raise BackendError(f"executor {executor.describe()}", f"all {len(chunks)} chunks", "some never delivered")
    result.latents = np.concatenate(lat)
