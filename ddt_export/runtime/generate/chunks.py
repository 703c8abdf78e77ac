"""Chunks: the unit of streaming, resuming and sharding a `generate` run. Torch-free.

A run of N samples is cut into chunks of consecutive indices, `[k * size, (k + 1) * size)`; the last one may be
shorter. The cut depends on N and the chunk size only, so the single-process loop, a resumed run and every
Ray worker sample exactly the same batches: a sample's pixels depend on its own noise (`core.noise`) and, at
the float-rounding level, on the rows it was batched with, and those are the same everywhere.

A `RunSpec` is everything a worker needs to sample chunks (picklable: Ray ships it to each actor); a
`ChunkSampler` holds the engines and turns one chunk into its outputs, a dict of numpy arrays (the batch format
of Ray Data):

    index (n,) int64, label (n,) int64, chunk (n,) int64, worker (n,) int64 (the process that sampled it),
    image (n, IH, IH, IC) uint8 (when the run asks for images), latent (n, C, H, W) float32 (when it asks for them)

`LocalExecutor` runs the chunks in this process; `ddt_export.scale.ray_data.RayExecutor` runs them on a Ray
actor pool. `runtime.generate` drives either through the same three calls (`open`, `resolve_schedule`, `map`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ...core.config import SamplerConfig
from ...core.errors import ArtifactError, InputError
from ...core.images import images_from_samples
from ...core.labels import Labels
from ...core.log import Say
from ...core.manifest import Manifest
from ...core.noise import StepNoise, sample_noise
from ..graphs.engines import Engines, call_graph, load_engines
from ..sampling.host import sample
from ..sampling.request import SampleRequest
from ..sampling.schedules import resolve_schedule

Result = dict  # str -> np.ndarray, the columns in the module doc
PENDING_BLOCK = 1 << 16  # chunks looked at a time when walking the pending ones


@dataclass(frozen=True)
class Chunk:
    number: int  # k
    start: int  # first sample index
    stop: int  # one past the last

    @property
    def size(self) -> int:
        return self.stop - self.start


def default_chunk(manifest: Manifest) -> int:
    """Images per chunk: as many as the engines take in one call with both CFG halves (batch.max rows)."""
    return max(1, manifest.batch.max // 2)


def check_chunk(chunk: int | None, manifest: Manifest) -> int:
    """--chunk (default `default_chunk`): 1 .. batch.max // 2, so a CFG call never exceeds the engines' range."""
    top = default_chunk(manifest)
    if chunk is None:
        return top
    if not 1 <= chunk <= top:
        raise InputError("--chunk", f"1..{top} images (the engines take {manifest.batch.max} rows, 2 per image "
                         "with CFG)", chunk)
    return int(chunk)


class ChunkPlan(Sequence[Chunk]):
    """[0, num) cut into chunks of `size` consecutive indices (the last one shorter), each made when asked for:
    a run of 1e8 samples does not hold three million `Chunk`s (memory stays flat in --num)."""

    def __init__(self, num: int, size: int):
        assert num >= 1 and size >= 1, (num, size)
        self.num, self.size = num, size

    def __len__(self) -> int:
        return -(-self.num // self.size)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        n = len(self)
        k = k + n if k < 0 else k
        if not 0 <= k < n:
            raise IndexError(f"chunk {k} of {n}")
        return Chunk(k, k * self.size, min((k + 1) * self.size, self.num))


def plan_chunks(num: int, size: int) -> ChunkPlan:
    """[0, num) cut into chunks of `size` consecutive indices (the last one shorter)."""
    return ChunkPlan(num, size)


class Pending:
    """The chunks of a plan still to run: `todo[k]` for chunk k (one byte per chunk, not a list of them)."""

    def __init__(self, plan: ChunkPlan, todo: np.ndarray):
        self.plan, self.todo = plan, np.asarray(todo, bool)

    def __len__(self) -> int:
        return int(self.todo.sum())

    def __iter__(self) -> Iterator[Chunk]:
        for lo in range(0, len(self.todo), PENDING_BLOCK):  # indices a block at a time: flat memory
            for k in np.flatnonzero(self.todo[lo:lo + PENDING_BLOCK]):
                yield self.plan[lo + int(k)]

    @property
    def samples(self) -> int:
        """Samples in the pending chunks."""
        n = len(self) * self.plan.size
        last = len(self.plan) - 1
        return n - (self.plan.size - self.plan[last].size if len(self.todo) and self.todo[last] else 0)


def graph_identity(manifest: Manifest) -> tuple[tuple[str, str], ...]:
    """(graph, sha256) of every graph in a folder: what a worker checks its engines against."""
    return tuple(sorted((name, g.sha256) for name, g in manifest.graphs.items()))


@dataclass(frozen=True, eq=False)
class RunSpec:
    """What sampling a chunk needs, decided once by the driver (`runtime.generate`)."""

    engines_dir: str
    backend: str
    graphs: tuple[tuple[str, str], ...]  # `graph_identity` of the driver's manifest
    sampler: SamplerConfig
    recompute: tuple[int, ...]
    cond_only_outside: bool
    seed: int
    labels: Labels = field(repr=False)  # (N,): the whole run's labels (slices are int64 arrays)
    noise_file: str | None = None  # (N, C, H, W) .npy instead of `core.noise`
    images: bool = True  # return uint8 images
    latents: bool = False  # return the final latents
    device_loop: bool = True  # `load_engines(device_loop=)`: False keeps the host loop on a TensorRT folder


class ChunkSampler:
    """The engines of a job, opened once (or shared), and `__call__(chunk) -> Result`."""

    def __init__(self, job: RunSpec, engines: Engines | None = None):
        self.job, self.owned = job, engines is None
        self.engines = (load_engines(job.engines_dir, job.backend, device_loop=job.device_loop) if engines is None
                        else engines)
        got = graph_identity(self.engines.manifest)
        if got != job.graphs:
            self.close()
            raise ArtifactError(f"engines {job.engines_dir} on this worker", "the graphs the run was planned with "
                                "(same sha256 as on the driver)", "other graphs",
                                "every node must see the same engine folder")
        self._noise = None
        if job.noise_file is not None:
            try:
                self._noise = np.load(job.noise_file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                self.close()
                raise InputError("--noise on this worker", "the driver's .npy at the same path", repr(e))

    def noise(self, chunk: Chunk) -> np.ndarray:
        """(n, C, H, W) float32: the chunk's initial latents."""
        if self._noise is not None:
            return np.array(self._noise[chunk.start:chunk.stop], np.float32)
        return sample_noise(self.job.seed, range(chunk.start, chunk.stop), self.engines.config.model.latent_shape)

    def __call__(self, chunk: Chunk) -> Result:
        job, e = self.job, self.engines
        idx = np.arange(chunk.start, chunk.stop, dtype=np.int64)
        labels = job.labels[chunk.start:chunk.stop]
        lat = sample(e, self.noise(chunk), labels, job.sampler, list(job.recompute),
                     cond_only_outside=job.cond_only_outside, rng=StepNoise(job.seed, idx))  # (n, C, H, W) f32
        out = {"index": idx, "label": labels.astype(np.int64), "chunk": np.full(len(idx), chunk.number, np.int64),
               "worker": np.full(len(idx), os.getpid(), np.int64)}
        if job.images:
            pixels = lat if e.vae_decoder is None else call_graph(e, "vae_decoder", {"latent": lat},
                                                                 job.sampler.num_steps)
            out["image"] = images_from_samples(pixels)  # (n, IH, IH, IC) uint8
        if job.latents:
            out["latent"] = lat
        return out

    def close(self) -> None:
        if self.owned and self.engines is not None:
            self.engines.close()
        self.engines = None


def split_results(batches: Iterable[Result], sizes: dict[int, int]) -> Iterator[Result]:
    """Whole chunks out of batches that may hold several chunks, or part of one (Ray Data blocks): rows are
    grouped by `chunk` and a chunk is yielded once all `sizes[chunk]` of its rows have arrived."""
    parts: dict[int, list[Result]] = {}
    for batch in batches:
        numbers = np.asarray(batch["chunk"])
        for k in np.unique(numbers):
            rows = numbers == k
            parts.setdefault(int(k), []).append({name: np.asarray(col)[rows] for name, col in batch.items()})
            got = sum(len(p["index"]) for p in parts[int(k)])
            if got >= sizes[int(k)]:
                pieces = parts.pop(int(k))
                yield pieces[0] if len(pieces) == 1 else {n: np.concatenate([p[n] for p in pieces])
                                                          for n in pieces[0]}


# ------------------------------------------------------------------------------------------------ executors


class LocalExecutor:
    """Chunks in this process, one after the other, on engines opened once."""

    workers = 1

    def __init__(self):
        self.engines: Engines | None = None
        self.loop = "host"  # the loop the engines run (`Engines.loop`), known once open

    def describe(self) -> str:
        return self.engines.backend_name if self.engines is not None else "local"

    @contextlib.contextmanager
    def open(self, engines_dir: Path, backend: str, say: Say, device_loop: bool = True) -> Iterator[Manifest]:
        with load_engines(engines_dir, backend, device_loop=device_loop) as engines:
            self.engines, self.loop = engines, engines.loop
            try:
                yield engines.manifest
            finally:
                self.engines = None

    def resolve_schedule(self, request: SampleRequest, say: Say) -> SampleRequest:
        return resolve_schedule(request, self.engines, say)

    def map(self, job: RunSpec, chunks: Sequence[Chunk]) -> Iterator[Result]:
        worker = ChunkSampler(job, self.engines)
        for c in chunks:
            yield worker(c)
