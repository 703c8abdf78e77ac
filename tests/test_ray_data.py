"""`generate --ray` (ddt_export.scale.ray_data) on a local Ray cluster: the files of a single-process run bit for bit,
a SIGKILLed actor retried with nothing lost or duplicated, the CLI's summary, the [ray] extra without torch.

The tests start and stop their own cluster (2 CPUs, no dashboard); each is bounded by a timeout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import cli
from ddt_export.core.errors import BackendError, InputError, NumericsError
from runs import run_generate as generate

from ddt_export.scale import executor_for  # Ray itself is imported lazily, by the functions that start it
from ddt_export.scale.ray_data import ACTOR_CPUS, RayExecutor, typed_error


def need_ray():
    """Ray Data, or a skip (the tests that need no cluster run without the [ray] extra)."""
    pytest.importorskip("ray.data", reason="the [ray] extra is not installed")
    import ray

    return ray

ROOT = Path(cli.__file__).parent
RUN = dict(num=48, steps=6, chunk=4, seed=3, formats="png,npz")  # 12 chunks


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def dev_env() -> dict:
    """Ray workers import ddt_export from this tree (the editable install may point elsewhere)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def single(tiny_engines, tmp_path_factory) -> tuple[Path, Path]:
    """The single-process run everything is compared with: (folder, latents)."""
    d = tmp_path_factory.mktemp("single")
    generate(tiny_engines[0], out_dir=d / "out", latents_out=d / "lat.npy", say=lambda m: None, **RUN)
    return d / "out", d / "lat.npy"


# ------------------------------------------------------------------------------------------ no cluster


def test_ray_extra_brings_no_torch():
    """pyproject's [ray] extra is Ray Data only, and what it installs (the installed metadata, followed through
    every requirement's own requirements and extras) holds no torch."""
    from importlib import metadata

    from packaging.requirements import Requirement

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    assert [Requirement(r).name for r in extra] == ["ray"] and "data" in Requirement(extra[0]).extras
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [r for r in base if Requirement(r).name == "ray"]
    need_ray()  # what it installs: the installed metadata
    seen, todo = set(), [(Requirement(r).name, frozenset(Requirement(r).extras)) for r in extra]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for text in metadata.requires(name) or []:
            r = Requirement(text)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((r.name.lower(), frozenset(r.extras)))
    names = sorted({n for n, _ in seen})
    print(f"[ray] installs {len(names)} distributions: {names}")
    assert "pandas" in names and "pyarrow" in names  # the data extra was followed
    assert not {"torch", "torchvision", "tensorflow"} & set(names)


def test_pool_sizing_and_flags():
    """The checks that keep a pool from hanging: one GPU per worker, CPUs left to Ray Data's own tasks."""
    class Cluster:
        def __init__(self, cpus, gpus, nodes=1):
            self.res, self.n = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}, nodes

        def cluster_resources(self):
            return self.res

        def nodes(self):
            return [{"Alive": True}] * self.n

    ex = RayExecutor(workers=2)
    ex._size_pool(Cluster(2, 0))
    assert (ex.workers, ex.num_gpus) == (2, 0) and 2 * ACTOR_CPUS < 2  # the 2-core case that hung at 1 CPU each
    with pytest.raises(InputError, match="--workers"):
        RayExecutor(workers=4)._size_pool(Cluster(2, 0))
    with pytest.raises(InputError, match="one GPU per worker"):
        RayExecutor(workers=3)._size_pool(Cluster(64, 2))
    ex = RayExecutor()
    ex._size_pool(Cluster(64, 8, nodes=2))
    assert (ex.workers, ex.num_gpus) == (8, 1)  # default: the cluster's GPUs
    ex._size_pool(Cluster(32, 0, nodes=3))
    assert ex.workers == 3  # CPU cluster: one per node
    with pytest.raises(InputError, match="used with --ray"):
        executor_for(False, None, 2, print)
    err = NumericsError("step 3: decoder output v", "finite values", "2 NaN/Inf")
    wrapped = RuntimeError("RayTaskError(UserCodeException)")
    wrapped.__cause__ = ValueError("UserCodeException")
    wrapped.__cause__.__cause__ = err
    assert typed_error(wrapped) is err
    assert isinstance(typed_error(RuntimeError("node lost\nActorDiedError")), BackendError)
    text = RuntimeError("Traceback ...\nddt_export.core.errors.NumericsError: " + str(err) + "\n\nThe above ...")
    got = typed_error(text)  # what Ray Data hands over: the worker's traceback as text
    assert type(got) is NumericsError and str(got) == str(err)


@pytest.mark.timeout(240)
def test_cli_ray_starts_a_local_cluster(tiny_engines, single, tmp_path):
    """`generate --ray --workers 2` with no address: its own local cluster; the summary of a local run (the same
    lines, the backend named with its workers) and the same files."""
    need_ray()
    argv = ["generate", "--engines", tiny_engines[0], "--num", RUN["num"], "--steps", RUN["steps"], "--chunk",
            RUN["chunk"], "--seed", RUN["seed"], "--format", RUN["formats"]]
    local = subprocess.run([sys.executable, "-m", "cli", *map(str, argv), "--out", tmp_path / "local"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    r = subprocess.run([sys.executable, "-m", "cli", *map(str, argv), "--out", tmp_path / "ray", "--ray",
                        "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=200, env=dev_env())
    assert local.returncode == 0 and r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    a, b = local.stdout.splitlines(), r.stdout.splitlines()
    assert len(a) == len(b) and "on 2 Ray workers" in b[0] and a[1] == b[1]  # the rows line: identical
    assert [x.split(" in ")[0] for x in a[2:3]] == [x.split(" in ")[0] for x in b[2:3]]  # "sampled 48"
    assert a[3:] == [x.replace(str(tmp_path / "ray"), str(tmp_path / "local")) for x in b[3:]]  # wrote ...
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")
    samples = {k: v for k, v in tree(tmp_path / "ray").items() if k != "run.json"}  # its record: no --latents-out
    assert samples == {k: v for k, v in tree(single[0]).items() if k != "run.json"}


# ------------------------------------------------------------------------------------------ a shared cluster


@pytest.fixture(scope="module")
def cluster():
    ray = need_ray()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", dev_env()["PYTHONPATH"])
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.mark.timeout(240)
def test_sharded_equals_single_process(cluster, tiny_engines, single, tmp_path):
    res = generate(tiny_engines[0], out_dir=tmp_path / "out", latents_out=tmp_path / "lat.npy",
                   executor=RayExecutor(workers=2), say=lambda m: None, **RUN)
    assert res.workers == 2 and "on 2 Ray workers" in res.backend and res.new == RUN["num"] and not res.duplicates
    assert len(res.chunks_by_worker) == 2, res.chunks_by_worker  # both actors sampled
    assert tree(tmp_path / "out") == tree(single[0])
    assert (tmp_path / "lat.npy").read_bytes() == single[1].read_bytes()


def descendants(pid: int) -> list[int]:
    """Every process under pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def chunk_actors() -> list[int]:
    """This test's local cluster's ChunkActor processes."""
    out = []
    for p in descendants(os.getpid()):
        try:
            if b"ChunkActor" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(p)
        except OSError:
            pass
    return out


@pytest.mark.timeout(300)
def test_killed_actor_is_retried_with_nothing_lost(cluster, tiny_engines, single, tmp_path):
    """SIGKILL one of the two actors once the first chunk has arrived (the others are queued on both actors): Ray
    Data restarts it and retries its chunks; every chunk arrives once and the files equal the single-process run."""
    killed = []

    def progress(done, total):
        if done and not killed:
            actors = chunk_actors()
            assert len(actors) == 2, actors
            os.kill(actors[0], signal.SIGKILL)
            killed.append(actors[0])

    res = generate(tiny_engines[0], out_dir=tmp_path / "out", latents_out=tmp_path / "lat.npy",
                   executor=RayExecutor(workers=2), progress=progress, say=lambda m: None, **RUN)
    after = chunk_actors()
    print(f"killed actor pid {killed}; chunks per worker pid {res.chunks_by_worker}; actors now {after}")
    assert killed and killed[0] not in after  # it did die (the pool may be shutting down by now)
    assert res.new == RUN["num"] and res.duplicates == 0 and sum(res.chunks_by_worker.values()) == 12
    assert tree(tmp_path / "out") == tree(single[0])
    assert (tmp_path / "lat.npy").read_bytes() == single[1].read_bytes()


@pytest.mark.timeout(240)
def test_local_run_resumed_on_the_cluster(cluster, tiny_engines, single, tmp_path):
    """A single-process run that dies after 5 chunks, resumed with --ray: the files of the uninterrupted run."""
    class Killed(BaseException):
        pass

    def die_after_five(done, total):
        if done >= 5 * RUN["chunk"]:
            raise Killed

    out = tmp_path / "out"
    with pytest.raises(Killed):
        generate(tiny_engines[0], out_dir=out, latents_out=tmp_path / "lat.npy", progress=die_after_five,
                 say=lambda m: None, **RUN)
    res = generate(tiny_engines[0], out_dir=out, latents_out=tmp_path / "lat.npy", resume=True,
                   executor=RayExecutor(workers=2), say=lambda m: None, **RUN)
    assert res.resumed == 5 * RUN["chunk"] and res.new == RUN["num"] - res.resumed
    assert tree(out) == tree(single[0]) and (tmp_path / "lat.npy").read_bytes() == single[1].read_bytes()


@pytest.mark.timeout(240)
def test_dp_schedule_computed_on_a_worker(cluster, tiny_engines, tmp_path):
    """A dp:K the engine folder does not store: the driver opens no engines, a Ray task runs the template and
    the DP and stores the schedule; the run equals a local one (which then reads the stored schedule)."""
    import shutil

    eng = tmp_path / "engines"
    shutil.copytree(tiny_engines[0], eng)
    said = []
    kw = dict(num=8, steps=6, schedule="dp:3", formats="npz")
    res = generate(eng, out_dir=tmp_path / "ray", executor=RayExecutor(workers=1), say=said.append, **kw)
    assert any("on a Ray worker" in s for s in said) and (eng / "schedule-6-3.json").is_file()
    local = generate(eng, out_dir=tmp_path / "local", say=said.append, **kw)
    assert any("using" in s and "schedule-6-3.json" in s for s in said)
    assert res.schedule == local.schedule and len(res.schedule) == 3
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")


@pytest.mark.timeout(240)
def test_worker_error_arrives_typed(cluster, tiny_engines):
    """A worker whose engines are not the driver's fails the run with the worker's ArtifactError, one line."""
    import dataclasses

    from ddt_export.core.errors import ArtifactError
    from ddt_export.core.manifest import read_manifest
    from ddt_export.runtime.generate.chunks import RunSpec, graph_identity, plan_chunks

    man = read_manifest(tiny_engines[0])
    job = RunSpec(str(tiny_engines[0]), "auto", graph_identity(man), man.config.sampler, (0,), True, 0,
                  np.zeros(8, np.int64))
    job = dataclasses.replace(job, graphs=(("encoder", "0" * 64),))
    ex = RayExecutor(workers=1)
    ex.folder, ex.manifest = tiny_engines[0], man
    with pytest.raises(ArtifactError, match="same sha256 as on the driver"):
        list(ex.map(job, plan_chunks(8, 4)))
