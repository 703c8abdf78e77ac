"""`ddt-export serve`: the HTTP server (needs the [serve] extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..runtime.batching.scheduler import POLICIES
from ..runtime.graphs.backends import CHOICES as BACKENDS
from ..runtime.graphs.engines import DEFAULT_ENGINES
from ..runtime.batching.slo import ADAPT, CHEAPEST, SLO_SCALE
from ..serve.settings import (BATCHING, LOG_LEVEL, LOG_LEVELS, LOOPBACK, MAX_DELAY_MS, MAX_QUEUE, MAX_STEPS, PORT,
                              ServeSettings, check_listener)
from .common import say


def serve(
    engines: Path = typer.Option(DEFAULT_ENGINES, help="engine folder written by `export` or `build`"),
    host: str = typer.Option(LOOPBACK, help="address to bind (loopback unless told otherwise)"),
    port: int = typer.Option(PORT, help="TCP port (0: any free port; the line 'serving ... at URL' names it)"),
    max_queue: int = typer.Option(MAX_QUEUE, help="waiting requests before new ones get 503 (Retry-After)"),
    max_images_per_request: Optional[int] = typer.Option(
        None, help="largest num per request (default: batch.max / 2, a guided image takes 2 rows)"),
    max_steps: int = typer.Option(MAX_STEPS, help="largest steps per request"),
    batching: str = typer.Option(BATCHING, help="auto | " + " | ".join(POLICIES) + ". auto: the policy the "
                                 "simulator predicts best for the cost curve fitted at start-up (fair on a CPU, "
                                 "step on a GPU); step: requests join the batch at every step boundary; fair: "
                                 "step-level, each request advancing in proportion to 1/its rows (cost-linear "
                                 "CPUs); request: Triton-style groups run to completion; single: one at a time"),
    slo_scale: float = typer.Option(SLO_SCALE, help="a request's SLO: latency <= this x its predicted solo latency "
                                    "(or its deadline_ms); /metrics counts met and missed"),
    cost_curve: Optional[Path] = typer.Option(None, help="a stored cost curve (JSON: CostCurve fields, or a "
                                              "gpu_check.json) instead of the timed calls at start-up"),
    adapt: str = typer.Option(CHEAPEST, help=" | ".join(ADAPT) + ": where a request that allows a quality trade "
                              "goes when it would miss its SLO: its cheapest plan within budget, or the plan of "
                              "least dFID that meets it"),
    max_delay_ms: float = typer.Option(MAX_DELAY_MS, help="--batching request: how long the oldest waiting "
                                       "request waits for others to join its group"),
    class_names: Optional[Path] = typer.Option(None, help="class labels, one per line in id order (the official "
                                               "imagenet_classlabels.txt format); default: the ids"),
    backend: str = typer.Option("auto", help=" | ".join(BACKENDS)),
    lifetime: Optional[float] = typer.Option(None, help="seconds after which the server drains and exits 0 "
                                             "(tests, benchmarks)"),
    log_level: str = typer.Option(LOG_LEVEL, help=" | ".join(LOG_LEVELS) + ": uvicorn's log level (info shows "
                                  "the access log)"),
    trace: Optional[Path] = typer.Option(None, help="append one JSON line per iteration (start, seconds, "
                                         "requests, rows) to this file"),
    ray: bool = typer.Option(False, "--ray", help="run the app as a Ray Serve deployment (the [ray] extra)"),
    ray_address: Optional[str] = typer.Option(None, help="--ray: the cluster to join (default: start a local one)"),
    replicas: Optional[int] = typer.Option(None, help="--ray: replicas, each with its own batcher (default: one "
                                           "per GPU, else 1)"),
):
    """Serve the engines over HTTP: POST /v1/generate (JSON or SSE), /health, /metrics, a web page at /.
    SIGTERM or Ctrl-C drains (exit 0); a second one stops at once (exit 128 + the signal)."""
    from ..serve.server import serve as run_server

    check_listener(host, port, lifetime, log_level)  # every flag checked before anything binds
    settings = ServeSettings(batching=batching, max_delay_ms=max_delay_ms, max_queue=max_queue,
                             max_images_per_request=max_images_per_request, max_steps=max_steps,
                             class_names=class_names, backend=backend, trace=trace, slo_scale=slo_scale,
                             cost_curve=cost_curve, adapt=adapt)
    if ray:
        from ..scale.ray_serve import serve_on_ray

        serve_on_ray(engines, settings, host, port, replicas=replicas, address=ray_address, lifetime_s=lifetime,
                     say=say)
    else:
        code = run_server(engines, settings, host, port, lifetime_s=lifetime, log_level=log_level, say=say)
        if code:
            raise typer.Exit(code)
