"""`ddt-export serve --ray`: the HTTP app as a Ray Serve deployment of N replicas (the `[ray]` extra).

An adapter and nothing more: every replica builds the same app `ddt-export serve` runs (`serve.app.create_app`,
called by Ray Serve on the replica, lifespan included: the replica opens its engines once and runs its own
step-level batcher); Ray Serve's proxy routes requests between the replicas. Ray is imported here only, lazily.

Concurrency. Ray Serve caps the requests a replica holds at `max_ongoing_requests` (default 5), which would
cap what its batcher can ever batch. The batcher itself admits requests up to the engines' row budget
(`batch.max` rows; a request takes one row per image outside the guidance interval, so up to `batch.max`
requests run at once) and queues `max_queue` more before it answers 503. So each replica takes
`max_ongoing_requests = batch.max + max_queue`; Ray Serve's own router queue holds at most `max_queue` per
replica (`max_queued_requests`) and answers 503 past that. Resources: one GPU per replica where the cluster has
GPUs (replicas default to the number of GPUs), else `REPLICA_CPUS` CPUs each (not whole CPUs: on a 2-core
machine two replicas at 1 CPU each leave Ray nothing for its own tasks).

Each response carries `x-ddt-replica` (the replica's id), so a client can see who served it.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BackendError, ConfigError
from ..core.log import Say
from ..core.manifest import read_manifest
from ..runtime.graphs.engines import NO_ENGINES_HINT
from ..serve.settings import LOOPBACK, PORT, ServeSettings

REPLICA_CPUS = 0.5
APP_NAME = "ddt-export"
REPLICA_HEADER = "x-ddt-replica"


@dataclass(frozen=True)
class RayPlan:
    """How the deployment is sized (what `deploy` passes to Ray Serve; a plain value, tested on its own)."""

    replicas: int
    max_ongoing_requests: int
    max_queued_requests: int
    num_cpus: float
    num_gpus: int


def plan(batch_max: int, settings: ServeSettings, replicas: int | None, cluster_gpus: int) -> RayPlan:
    """Replicas (default: one per GPU, else 1) and the per-replica limits from the row budget (module doc)."""
    n = replicas if replicas is not None else max(1, int(cluster_gpus))
    if n < 1:
        raise ConfigError("--replicas", ">= 1", n)
    if cluster_gpus and n > cluster_gpus:
        raise ConfigError("--replicas", f"<= {cluster_gpus} (one GPU per replica)", n)
    return RayPlan(replicas=n, max_ongoing_requests=batch_max + settings.max_queue,
                   max_queued_requests=settings.max_queue * n, num_cpus=0 if cluster_gpus else REPLICA_CPUS,
                   num_gpus=1 if cluster_gpus else 0)


def build_app(engines_dir: str, settings: ServeSettings):
    """The replica's ASGI app (Ray Serve calls this on the replica): `create_app` plus the replica header."""
    from ..serve.app import create_app

    app = create_app(Path(engines_dir), settings)
    replica = f"{os.uname().nodename}:{os.getpid()}"

    @app.middleware("http")
    async def tag(request, call_next):
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response

    return app


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise BackendError("serve --ray", "Ray Serve (pip install 'ddt-export[ray,serve]')", repr(e))
    return ray, serve


def deploy(engines_dir: Path, settings: ServeSettings, *, host: str = LOOPBACK, port: int = PORT,
           replicas: int | None = None, address: str | None = None, say: Say = print) -> RayPlan:
    """Connect to (or start) a Ray cluster, start Ray Serve's proxy on host:port and run the app's replicas;
    returns once every replica is healthy. `shutdown()` undoes it."""
    engines_dir = Path(engines_dir).resolve()  # replicas may run elsewhere: no relative paths
    man = read_manifest(engines_dir, NO_ENGINES_HINT)  # a bad folder fails here, before a cluster starts
    ray, serve = _ray()
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"include_dashboard": False}
        ray.init(**kwargs, runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
                 log_to_driver=False)
    p = plan(man.batch.max, settings, replicas, int(ray.cluster_resources().get("GPU", 0)))
    serve.start(http_options={"host": host, "port": port})
    ingress = serve.ingress(lambda: build_app(str(engines_dir), settings))

    class Replica:  # the routes are the app's; the class only carries the deployment options
        pass

    deployment = serve.deployment(ingress(Replica), name="ddt", num_replicas=p.replicas,
                                  max_ongoing_requests=p.max_ongoing_requests,
                                  max_queued_requests=p.max_queued_requests,
                                  ray_actor_options={"num_cpus": p.num_cpus, "num_gpus": p.num_gpus})
    serve.run(deployment.bind(), name=APP_NAME, route_prefix="/", blocking=False)
    say(f"serving {engines_dir} on Ray Serve at http://{host}:{port}: {p.replicas} replica(s), batching "
        f"{settings.batching}, max_ongoing_requests {p.max_ongoing_requests} per replica")
    return p


def shutdown() -> None:
    """Stop the replicas and the proxy, and leave the cluster (a local one stops)."""
    ray, serve = _ray()
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def serve_on_ray(engines_dir: Path, settings: ServeSettings, host: str = LOOPBACK, port: int = PORT, *,
                 replicas: int | None = None, address: str | None = None, lifetime_s: float | None = None,
                 say: Say = print) -> None:
    """`deploy`, then wait for SIGTERM/SIGINT (or `lifetime_s`), then `shutdown` (each replica's lifespan drains
    its batcher and closes its engines)."""
    if lifetime_s is not None and not lifetime_s > 0:
        raise ConfigError("--lifetime", "> 0 seconds", lifetime_s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    deploy(engines_dir, settings, host=host, port=port, replicas=replicas, address=address, say=say)
    try:
        born = time.monotonic()
        while not stop.wait(0.5):
            if lifetime_s is not None and time.monotonic() - born > lifetime_s:
                break
    finally:
        shutdown()
    say("stopped")
