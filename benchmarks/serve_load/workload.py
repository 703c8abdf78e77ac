"""The serve load study's workload: the request catalog, Poisson traces, the HTTP client, latency statistics.

Imports nothing of the study's other files (they import it). `resolve_catalog` turns the catalog into the
`SampleRequest`s the server would resolve, for the simulator.
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from dataclasses import dataclass

import numpy as np

from ddt_export.core.log import Say
from ddt_export.runtime.batching.simulate import Arrival
from ddt_export.runtime.sampling.request import API, RequestInput, SampleRequest, resolve
from ddt_export.runtime.sampling.schedules import resolve_schedule

POLICIES = ("step", "fair", "request", "single")
CATALOG_SIZE = 16
LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------------------------- the requests


def catalog(seed: int = 0, n: int = CATALOG_SIZE) -> list[dict]:
    """The mix: n request kinds (num 1-4, steps 10-100, a schedule, a CFG scale); arrivals draw from them."""
    rng = np.random.default_rng([seed, 17])
    kinds = []
    for _ in range(n):
        steps = int(rng.integers(10, 101))
        sched = ["all", "uniform:2", "uniform:4", f"dp:{max(2, steps // 3)}"][int(rng.integers(0, 4))]
        kinds.append({"num": int(rng.integers(1, 5)), "steps": steps, "schedule": sched,
                      "cfg": [1.0, 1.5, 1.5, 2.0][int(rng.integers(0, 4))]})
    return kinds


def kind_input(kind: dict, label: int = 0, seed: int = 0) -> RequestInput:
    """A catalog kind as the request the server receives (its body's fields)."""
    return RequestInput(classes=(label,), num=kind["num"], seed=seed, steps=kind["steps"], cfg=kind["cfg"],
                        schedule=kind["schedule"])


def resolve_catalog(engines, kinds: list[dict], say: Say = print) -> list[SampleRequest]:
    """The catalog resolved as the server resolves a body, with its recompute steps (dp:K: stored with the
    engines or computed on them); class 0 and seed 0, which do not change a request's cost."""
    return [resolve_schedule(resolve(engines.config, kind_input(k), API), engines, say) for k in kinds]


@dataclass(frozen=True)
class Sent:
    t: float  # scheduled send time from the start, seconds
    kind: int
    label: int
    seed: int


def poisson_trace(rate: float, duration: float, n_kinds: int, seed: int, num_classes: int = 10) -> list[Sent]:
    """Open-loop Poisson arrivals at `rate` per second for `duration` seconds."""
    rng = np.random.default_rng([seed, 29])
    out, t = [], float(rng.exponential(1.0 / rate))
    while t < duration:
        out.append(Sent(t, int(rng.integers(0, n_kinds)), int(rng.integers(0, num_classes)),
                        int(rng.integers(0, 2 ** 31))))
        t += float(rng.exponential(1.0 / rate))
    return out


def body(kind: dict, s: Sent) -> dict:
    return {"class": s.label, "num": kind["num"], "seed": s.seed, "steps": kind["steps"], "cfg": kind["cfg"],
            "schedule": kind["schedule"]}


def arrivals(trace: list[Sent], specs: list[SampleRequest]) -> list[Arrival]:
    """The same trace for the simulator (the specs: the catalog resolved like the server resolves it)."""
    return [Arrival(s.t, specs[s.kind], s.kind) for s in trace]


# ---------------------------------------------------------------------------------------------- the client


@dataclass
class Record:
    kind: int
    sent: float  # seconds from the start
    latency: float | None  # None: not answered 200
    status: int
    server_s: float | None = None  # the server's own arrival-to-answer time (timings.total_s)


async def _one(client, url: str, kinds: list[dict], s: Sent, t0: float) -> Record:
    import httpx

    start, server = time.perf_counter(), None
    try:
        r = await client.post(url + "/v1/generate", json=body(kinds[s.kind], s))
        status = r.status_code
        if status == 200:
            server = r.json()["timings"]["total_s"]
    except httpx.HTTPError:
        status = 0
    lat = time.perf_counter() - start
    return Record(s.kind, start - t0, lat if status == 200 else None, status, server)


async def open_loop(url: str, kinds: list[dict], trace: list[Sent], timeout: float = 900.0) -> list[Record]:
    """Send each request at its time (not waiting for earlier answers); return when all are answered."""
    import httpx

    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0, tasks = time.perf_counter(), []
        for s in trace:
            delay = t0 + s.t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, url, kinds, s, t0)))
        return list(await asyncio.gather(*tasks))


async def closed_loop(url: str, kinds: list[dict], clients: int, duration: float, seed: int,
                      warmup: float = 30.0) -> dict:
    """`clients` clients each sending its next request as soon as its last is answered: the server always has
    work. Throughput: requests answered between `warmup` and `warmup + duration` seconds (the start, when every
    client's first request runs at once, is left out)."""
    import httpx

    rng = np.random.default_rng([seed, 31])
    done, t0, end = [], time.perf_counter(), warmup + duration

    async def client_loop(c):
        async with httpx.AsyncClient(timeout=900.0) as client:
            while time.perf_counter() - t0 < end:
                s = Sent(0.0, int(rng.integers(0, len(kinds))), int(rng.integers(0, 10)), int(rng.integers(0, 2 ** 31)))
                r = await _one(client, url, kinds, s, t0)
                if r.latency is not None and warmup <= r.sent + r.latency <= end:
                    done.append(r)

    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    return {"throughput": len(done) / duration, "answered": len(done), "clients": clients, "duration_s": duration,
            "warmup_s": warmup}


def stats(records: list[Record], solo: list[float], duration: float) -> dict:
    ok = [r for r in records if r.latency is not None]
    lat = np.array([r.latency for r in ok])
    slow = np.array([r.latency / solo[r.kind] for r in ok])
    last = max((r.sent + r.latency for r in ok), default=duration)
    return summary(lat, slow, len(records), len(records) - len(ok), max(duration, last))


def summary(lat: np.ndarray, slow: np.ndarray, sent: int, failed: int, span: float) -> dict:
    def q(a, p):
        return float(np.percentile(a, p)) if len(a) else float("nan")

    return {"sent": sent, "answered": int(len(lat)), "failed": failed, "throughput": len(lat) / max(span, 1e-9),
            "p50": q(lat, 50), "p95": q(lat, 95), "p99": q(lat, 99), "mean": float(lat.mean()) if len(lat) else
            float("nan"), "slowdown_p50": q(slow, 50), "slowdown_p99": q(slow, 99)}


def metric_sums(url: str) -> dict[str, float]:
    """sum and count of the per-iteration histograms of GET /metrics."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for name in ("ddt_iteration_requests", 'ddt_iteration_rows{graph="encoder"}',
                     'ddt_iteration_rows{graph="decoder"}'):
            base, _, lab = name.partition("{")
            for suffix in ("_sum", "_count"):
                if line.startswith(base + suffix + ("{" + lab if lab else " ")):
                    out[name + suffix] = float(line.rsplit(" ", 1)[1])
    return out


def per_iteration(before: dict, after: dict) -> dict:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    its = d.get("ddt_iteration_requests_count", 0.0) or float("nan")
    return {"iterations": its, "requests": d.get("ddt_iteration_requests_sum", 0.0) / its,
            "encoder_rows": d.get('ddt_iteration_rows{graph="encoder"}_sum', 0.0) / its,
            "decoder_rows": d.get('ddt_iteration_rows{graph="decoder"}_sum', 0.0) / its}


def stop_servers(procs, wait_s: float) -> None:
    """SIGTERM every server still running (each drains), then wait up to `wait_s` for each; kill what stays."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
