"""Load generator and simulator for `ddt-export serve`: step-level vs request-level batching vs one at a time.

    python benchmarks/serve_load.py load --url http://127.0.0.1:8000 --rate 1.0 --duration 60
    python benchmarks/serve_load.py measure [--engines engines/default] [--duration 90] [--loads .3 .5 .7 .9]
    python benchmarks/serve_load.py simulate [--curve gpu | CURVE.json] [--loads .5 .6 .7 .8 .9]

`load`: open-loop Poisson arrivals at --rate for --duration seconds against a running server (127.0.0.1 only),
mixed requests drawn from a catalog (classes 0-9, num 1-4, steps 10-100, schedules all / uniform:R / dp:K,
cfg 1.0-2.0); prints throughput, p50/p95/p99 latency.

`measure`, the study in one run: the per-call cost curve of the engines (rows -> seconds, encoder and decoder)
and the host overheads, measured in this process; three servers (`--batching step`, `request`, `single`) on
127.0.0.1 with bounded lifetimes; each catalog request's solo latency; each policy's saturation throughput
(a closed loop of 16 clients); then at each load (fraction of request-level saturation) the same Poisson
trace sent to each server in turn: throughput, p50/p95/p99 latency, p99 slowdown (latency / the same request's
solo latency), mean requests and rows per iteration (from /metrics). The simulator then runs the same traces
on the measured cost curve (it predicts the measured p50/p99?), and a GPU-like curve (stated assumptions,
`runtime.batching.simulate.gpu_like_curve`) for DDT-XL/2 256. Writes benchmarks/serve_load.json, serve_load.png and a
dated section at the end of benchmarks/results.md (benchmarks/serve_report.py).

`simulate`: the simulator alone, on the GPU-like curve or a curve JSON (as `measure` writes).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddt_export.runtime.batching.scheduler import RequestSpec  # noqa: E402
from ddt_export.runtime.batching.simulate import Arrival  # noqa: E402

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


def arrivals(trace: list[Sent], specs: list[RequestSpec]) -> list[Arrival]:
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


# ---------------------------------------------------------------------------------------------- commands


def cmd_load(args) -> None:
    if not args.url.startswith(f"http://{LOOPBACK}:"):
        raise SystemExit(f"--url: expected http://{LOOPBACK}:PORT (this tool loads loopback servers only)")
    kinds = catalog(args.seed)
    trace = poisson_trace(args.rate, args.duration, len(kinds), args.seed)
    records = asyncio.run(open_loop(args.url, kinds, trace))
    ok = [r.latency for r in records if r.latency is not None]
    lat = np.array(ok) if ok else np.array([float("nan")])
    print(f"{len(records)} sent at {args.rate}/s for {args.duration:.0f} s: {len(ok)} answered, "
          f"p50 {np.percentile(lat, 50):.3f} s, p95 {np.percentile(lat, 95):.3f} s, p99 {np.percentile(lat, 99):.3f} s")


def cmd_simulate(args) -> None:
    from serve_study import gpu_study, load_curve

    curve, specs, budget = load_curve(args.curve, args.preset)
    out = gpu_study(curve, specs, budget, args.loads, args.requests, args.seed, args.max_delay_ms / 1e3)
    for row in out["rows"]:
        print(f"load {row['load']:.0%} ({row['rate']:.2f}/s) {row['policy']:>7}: p50 {row['p50'] * 1e3:8.1f} ms, "
              f"p99 {row['p99'] * 1e3:8.1f} ms, p99 slowdown {row['slowdown_p99']:6.2f}; the p99's requests: queue "
              f"{row['p99_queue_s'] * 1e3:.0f} ms + run {row['p99_run_s'] * 1e3:.0f} ms, steps {row['p99_steps']}")
    for load, r in out["ratios"].items():
        print(f"load {load}: step / request p99 latency {r['p99']:.2f}x, p99 slowdown {r['slowdown_p99']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def cmd_measure(args) -> None:
    from serve_study import measure

    measure(args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("load", help="open-loop Poisson load against a running server")
    p.add_argument("--url", default=f"http://{LOOPBACK}:8000")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_load)
    p = sub.add_parser("measure", help="the whole study on this machine; writes results")
    p.add_argument("--engines", type=Path, default=ROOT / "engines/default")
    p.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals per (load, policy)")
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--min-requests", type=int, default=50, help="a load runs longer than --duration if needed")
    p.add_argument("--focus-load", type=float, default=0.7, help="the load the targets are checked at ...")
    p.add_argument("--focus-requests", type=int, default=150, help="... and how many requests it gets at least")
    p.add_argument("--saturation-s", type=float, default=90.0)
    p.add_argument("--saturation-policies", nargs="+", default=list(POLICIES), choices=POLICIES,
                   help="the policies whose saturation is measured (the loads are fractions of request's; every "
                   "policy's is simulated)")
    p.add_argument("--solo-repeats", type=int, default=3)
    p.add_argument("--max-delay-ms", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-loads", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--gpu-requests", type=int, default=4000)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/serve_load.json")
    p.add_argument("--plot", type=Path, default=ROOT / "benchmarks/serve_load.png")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results.md")
    p.add_argument("--no-write", action="store_true", help="JSON only: leave results.md alone")
    p.set_defaults(fn=cmd_measure)
    p = sub.add_parser("simulate", help="the scheduler on a virtual clock with a cost curve")
    p.add_argument("--curve", default="gpu", help="gpu (the FLOP-model assumption), a gpu_check.json "
                   "(scripts/gpu_check.sh's measured cost-curve) or a JSON from measure")
    p.add_argument("--preset", default="ddt-xl-256", help="the model of the GPU-like curve")
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--max-delay-ms", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.set_defaults(fn=cmd_simulate)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    args.fn(args)


if __name__ == "__main__":
    main()
