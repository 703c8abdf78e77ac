"""`generate --ray`: the chunks of a run sharded over a Ray Data actor pool. The only module that imports Ray.

    driver (this process)                          actors (WORKERS of them, one per GPU where there are GPUs)
    runtime.generate: plan, resume, write    <-    ChunkActor: the engines loaded once (generate.chunks.ChunkSampler)
    from_items(chunks) -> map_batches(ChunkActor, batch_size=1, compute=ActorPoolStrategy(size=WORKERS))

The actor is an adapter: it calls the same `ChunkSampler` a local run calls, on the same chunks (`plan_chunks`),
so the files are those of a single-process run bit for bit. The driver writes them (the cluster needs no shared
output folder), in whatever order chunks finish. Each chunk is one Ray Data block and one actor task. A killed
actor is restarted and the tasks it held are retried (Ray Data's actor pools run with max_restarts=-1 and
max_task_retries=-1; a worker's exception is not retried, it fails the run with its typed error); a chunk's rows
reach the driver only from a finished task, and the driver writes each chunk once: nothing is lost or
duplicated. Every node must
see the engine folder (and a --noise file) at the same path; each actor checks its graphs' sha256 against the
driver's manifest.

Resources are stated where the actor is declared: ACTOR_CPUS (not 1: on a small machine actors holding every CPU
starve Ray Data's own tasks and the pipeline hangs) and one GPU per actor when the cluster has GPUs.

Ray Data hands every actor of a pool its function through the object store and runs its pools with
max_restarts=-1, so the driver's core worker logs, at error level and once per process, that such an actor's
restart would fail if those arguments were lost (ray-project/ray#53727). The dataset holds them until the run
ends, so it is not this run's error; a successful run printing an error line is, and `max_restarts=0` would
silence it by losing the restarts. So while the pool runs, the driver's stderr descriptor passes through a
filter that drops that one line (`dropping_lines`) and forwards everything else.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..core import errors
from ..core.config import SamplerConfig
from ..core.errors import BackendError, DDTExportError, InputError
from ..core.log import Say, silent
from ..core.manifest import Manifest, read_manifest
from ..runtime.generate.chunks import Chunk, ChunkSampler, Result, RunSpec, split_results
from ..runtime.graphs.backends import CHOICES
from ..runtime.graphs.engines import NO_ENGINES_HINT, load_engines
from ..runtime.sampling.request import SampleRequest
from ..runtime.sampling.schedules import computed_schedule, with_schedule

ACTOR_CPUS = 0.5  # CPUs an actor reserves (scheduling only: its engines use what they use)
FREE_CPUS = 0.5  # CPUs left to Ray Data's read and split tasks
ACTOR_WAIT_S = 600  # how long the pool may take to start its actors (nodes joining) before the run fails


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise BackendError("--ray", "Ray Data installed (pip install 'ddt-export[ray]')", repr(e)) from None
    return ray


class ChunkActor:
    """One Ray actor: the engines of the job, loaded once; each call samples one chunk (`ChunkSampler`)."""

    def __init__(self, job: RunSpec):
        try:
            self.sampler, self.error = ChunkSampler(job), None
            self.backend, self.loop = self.sampler.engines.backend_name, self.sampler.engines.loop
        except DDTExportError as e:  # raised on the first chunk instead: an actor that dies in __init__ reaches
            self.sampler, self.error = None, e  # the driver as an ActorDiedError holding only its message

    def __call__(self, batch: dict[str, np.ndarray]) -> Result:
        if self.error is not None:
            raise self.error
        outs = [self.sampler(Chunk(int(k), int(a), int(b)))
                for k, a, b in zip(batch["chunk"], batch["start"], batch["stop"])]
        out = outs[0] if len(outs) == 1 else {n: np.concatenate([o[n] for o in outs]) for n in outs[0]}
        out["backend"] = np.array([self.backend] * len(out["index"]))
        out["loop"] = np.array([self.loop] * len(out["index"]))
        return out


def _schedule_on_worker(engines_dir: str, backend: str, sampler: SamplerConfig, k: int,
                        device_loop: bool = True) -> list[int]:
    """A dp:K schedule the engine folder does not store: the template trajectory on a worker's engines (stored
    in the folder there)."""
    with load_engines(engines_dir, backend, device_loop=device_loop) as engines:
        return computed_schedule(engines, sampler, k, silent)


# Ray Data's own error-level line about its actor pools (module doc); nothing else matches
RESTART_WARNING = re.compile(rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(MapBatches\(ChunkActor\)\)'"
                             rb".* has constructor arguments in the object store and max_restarts > 0")


@contextlib.contextmanager
def dropping_lines(pattern: re.Pattern) -> Iterator[None]:
    """While inside: what is written to file descriptor 2 (the C++ core worker's log, and Python's stderr) goes
    through a thread that drops the lines matching `pattern` and forwards the rest. `sys.stderr`, when it is
    the real stderr, is pointed at the original descriptor meanwhile, so a terminal stays a terminal (the
    progress bar) and its lines never wait in the pipe."""
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        rest = b""
        while chunk := os.read(read, 1 << 16):
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if not pattern.search(line):
                    os.write(saved, line + b"\n")
        if rest and not pattern.search(rest):
            os.write(saved, rest)
        os.close(read)

    thread = threading.Thread(target=pump, name="ddt-stderr-filter", daemon=True)
    thread.start()
    old = sys.stderr
    try:
        real = old.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a test's StringIO: leave it where it is
        real = False
    if real:
        sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=old.encoding, errors=old.errors)
    try:
        yield
    finally:
        if real:
            mine, sys.stderr = sys.stderr, old
            mine.close()
        os.dup2(saved, 2)  # the pipe's last write end closes: the pump reads to the end and stops
        thread.join(5)
        if not thread.is_alive():
            os.close(saved)


# the line a worker's traceback ends its DDTExportError with (Ray hands the driver the traceback as text: the
# exception object of a UDF does not survive Ray Data's UserCodeException wrapper)
WORKER_ERROR = re.compile(r"ddt_export\.core\.errors\.(\w+): (.*?): expected (.*), got (.*)")


def typed_error(e: BaseException) -> DDTExportError:
    """The DDTExportError a worker raised (Ray wraps it: RayTaskError, UserCodeException), else a BackendError."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, DDTExportError):
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    found = [m for line in str(e).splitlines() if (m := WORKER_ERROR.fullmatch(line.strip()))]
    cls = getattr(errors, found[-1].group(1), None) if found else None
    if isinstance(cls, type) and issubclass(cls, DDTExportError):
        return cls(*found[-1].groups()[1:])  # the same message: "thing: expected X, got Y (hint)"
    first = (str(e).strip().splitlines() or [""])[-1][:300]
    return BackendError("Ray Data run", "every chunk sampled", f"{type(e).__name__}: {first}")


class RayExecutor:
    """Runs a job's chunks on a Ray actor pool (see the module doc). `address`: None starts a new local cluster
    (unless this process is connected already); `workers`: default the cluster's GPUs, else its nodes."""

    def __init__(self, address: str | None = None, workers: int | None = None, say: Say = print):
        self.address, self.asked_workers, self.say = address, workers, say
        self.workers, self.num_gpus, self.backend_name = workers or 1, 0, ""
        self.loop, self.device_loop = "host", True  # the loop the workers ran (`Engines.loop`); the one asked
        self.folder: Path | None = None
        self.manifest: Manifest | None = None

    def describe(self) -> str:
        return f"{self.backend_name or 'engines'} on {self.workers} Ray workers"

    @contextlib.contextmanager
    def open(self, engines_dir: Path, backend: str, say: Say, device_loop: bool = True) -> Iterator[Manifest]:
        man = read_manifest(engines_dir, NO_ENGINES_HINT)  # bad input refused before a cluster starts
        if backend not in CHOICES:
            raise BackendError("--backend", " | ".join(CHOICES), backend)
        if backend not in ("auto", man.backend):
            raise BackendError(f"backend for {engines_dir}", f"{man.backend} (what the folder was built for)", backend)
        self.folder, self.manifest, self.device_loop = Path(engines_dir).absolute(), man, device_loop
        ray = _ray()
        started = not ray.is_initialized()
        if started:
            quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            try:
                ray.init(address=self.address or "local", **quiet)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise BackendError("--ray-address", "a reachable Ray cluster (ray start --head)",
                                   f"{self.address}: {e}") from None
        try:
            self._size_pool(ray)
            nodes = len([n for n in ray.nodes() if n.get("Alive")])
            say(f"Ray: {self.workers} workers ({ACTOR_CPUS} CPU{', 1 GPU' if self.num_gpus else ''} each) on "
                f"{nodes} node{'s' if nodes != 1 else ''}")
            yield man
        finally:
            if started:
                ray.shutdown()

    def _size_pool(self, ray) -> None:
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 0))
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        self.num_gpus = 1 if gpus else 0
        self.workers = self.asked_workers or (gpus or max(1, nodes))
        if gpus and self.workers > gpus:
            raise InputError("--workers", f"<= {gpus} (one GPU per worker; the cluster's GPUs)", self.workers)
        if self.workers * ACTOR_CPUS + FREE_CPUS > cpus:
            most = int((cpus - FREE_CPUS) // ACTOR_CPUS)
            raise InputError("--workers", f"<= {most} on a cluster of {cpus:g} CPUs ({ACTOR_CPUS} each, "
                             f"{FREE_CPUS} left to Ray Data's tasks)", self.workers)

    def resolve_schedule(self, request: SampleRequest, say: Say) -> SampleRequest:
        """The one resolver (`schedules.with_schedule`); a dp:K the folder does not store is computed on a worker."""
        def on_worker(k: int) -> list[int]:
            say(f"schedule dp:{k}: computing it on a Ray worker (stored in {self.folder} there)")
            ray = _ray()
            task = ray.remote(num_cpus=ACTOR_CPUS, num_gpus=self.num_gpus)(_schedule_on_worker)
            try:
                return ray.get(task.remote(str(self.folder), self.manifest.backend, request.sampler, k,
                                           self.device_loop))
            except Exception as e:
                raise typed_error(e) from None

        return with_schedule(request, self.manifest, self.folder, on_worker, say)

    def map(self, job: RunSpec, chunks: Sequence[Chunk]) -> Iterator[Result]:
        """Every chunk's result once, in the order they finish."""
        ray = _ray()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver shows its own bar over images
        ctx.print_on_execution_start = False
        ctx.wait_for_min_actors_s = ACTOR_WAIT_S
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)  # a worker's error: raised typed below
        items = [{"chunk": c.number, "start": c.start, "stop": c.stop} for c in chunks]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ChunkActor, fn_constructor_kwargs={"job": job}, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=ACTOR_CPUS, num_gpus=self.num_gpus or None)
        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
        try:
            with dropping_lines(RESTART_WARNING):
                for res in split_results(batches, {c.number: c.size for c in chunks}):
                    self.backend_name, self.loop = str(res.pop("backend")[0]), str(res.pop("loop")[0])
                    yield res
        except DDTExportError:
            raise
        except Exception as e:  # a worker's typed error arrives wrapped; anything else is the cluster's
            raise typed_error(e) from None
