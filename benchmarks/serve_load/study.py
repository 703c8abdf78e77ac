"""`serve_load.py measure`: the cost curve, the servers, the runs, the simulator on the same traces.

Imports `workload`, `simulation` and `report` of the study's files; none of them imports it.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.serve_load.report import plot, write_section
from benchmarks.serve_load.simulation import (ROWS, fit_trace, gpu_sensitivity, gpu_study, load_curve, sim_saturation,
                                              sim_stats)
from benchmarks.serve_load.workload import (LOOPBACK, arrivals, catalog, closed_loop, kind_input, metric_sums,
                                            open_loop, per_iteration, poisson_trace, resolve_catalog, stats,
                                            stop_servers)
from ddt_export.runtime.batching.engine import Engine
from ddt_export.runtime.batching.runner import ModelRunner
from ddt_export.runtime.batching.scheduler import Scheduler
from ddt_export.runtime.batching.simulate import CostCurve, simulate
from ddt_export.runtime.sampling.request import API, resolve
from ddt_export.runtime.sampling.schedules import resolve_schedule

ROOT = Path(__file__).resolve().parents[2]
SAT_CLIENTS = 6


# ---------------------------------------------------------------------------------------------- cost curve


class Timed:
    """The real engines as the runner's `Graphs`, timing every graph call (to split an iteration into graph
    time and host time); everything else is the engines'."""

    def __init__(self, engines):
        self.engines, self.graph_s = engines, 0.0

    def __getattr__(self, name):
        return getattr(self.engines, name)

    def run(self, graph: str, feeds: dict) -> dict:
        t0 = time.perf_counter()
        out = self.engines.run(graph, feeds)
        self.graph_s += time.perf_counter() - t0
        return out


def measure_curve(engines, repeats: int = 15) -> tuple[CostCurve, dict]:
    """encoder/decoder seconds by rows (median of `repeats`), and the host's per-request cost per iteration:
    k one-row requests (cfg 1, schedule all, 1000 steps) in the serving engine (`Engine.step()`: schedule,
    the model runner, update), the iteration's wall time less its graph calls."""
    rng = np.random.default_rng(0)
    m = engines.config.model
    pts: dict[str, list] = {"encoder": [], "decoder": []}
    for r in ROWS:
        x = rng.standard_normal((r, *m.latent_shape), dtype=np.float32)
        t = rng.uniform(0, 1, r).astype(np.float32)
        y = rng.integers(0, m.num_classes, r)
        s = engines.encoder(x, t, y)
        for g, fn in (("encoder", lambda: engines.encoder(x, t, y)), ("decoder", lambda: engines.decoder(x, s))):
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            pts[g].append((r, float(np.median(ts))))
    host = {}
    timed = Timed(engines)
    one = {"num": 1, "steps": 1000, "cfg": 1.0, "schedule": "all"}
    spec = resolve_schedule(resolve(engines.config, kind_input(one), API), engines, say=lambda m: None)
    for k in (1, 8, 16):
        engine = Engine(Scheduler(engines.max_batch), ModelRunner(timed))
        for _ in range(k):
            engine.submit(spec)
        engine.step()  # admits the k requests and starts their rows: not timed
        samples = []
        for _ in range(repeats):
            timed.graph_s = 0.0
            t0 = time.perf_counter()
            engine.step()
            samples.append(time.perf_counter() - t0 - timed.graph_s)
        host[k] = float(np.median(samples))
    slope = (host[16] - host[1]) / 15
    curve = CostCurve(tuple(pts["encoder"]), tuple(pts["decoder"]), request_step_s=max(slope, 0.0),
                      note="measured on this CPU (onnxruntime), this run")
    return curve, {"host_s_by_requests": host}


class Traces:
    """The servers' --trace files, read as they grow."""

    def __init__(self, paths: dict[str, Path]):
        self.paths, self.offsets = paths, {p: 0 for p in paths}

    def new(self) -> list[dict]:
        out = []
        for p, path in self.paths.items():
            with open(path) as fh:
                fh.seek(self.offsets[p])
                text = fh.read()
            done = text.rfind("\n") + 1
            self.offsets[p] += done
            out += [dict(json.loads(line), policy=p) for line in text[:done].splitlines() if line]
        return out


# ---------------------------------------------------------------------------------------------- servers


def start_server(engines: Path, port: int, policy: str, max_delay_ms: float, lifetime: float, trace: Path):
    argv = [sys.executable, "-m", "cli", "serve", "--engines", str(engines), "--port", str(port), "--batching",
            policy, "--max-delay-ms", str(max_delay_ms), "--max-queue", "512", "--lifetime", str(lifetime),
            "--trace", str(trace)]
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_healthy(url: str, proc, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server for {url} exited {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server {url} not healthy")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def solo_latencies(url: str, kinds: list[dict], repeats: int) -> list[float]:
    import httpx

    out = []
    with httpx.Client(timeout=600) as client:
        for k, kind in enumerate(kinds):
            body = {"class": k % 10, "num": kind["num"], "seed": k, "steps": kind["steps"], "cfg": kind["cfg"],
                    "schedule": kind["schedule"]}
            client.post(url + "/v1/generate", json=body).raise_for_status()  # warm-up (and any dp:K template)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                client.post(url + "/v1/generate", json=body).raise_for_status()
                ts.append(time.perf_counter() - t0)
            out.append(float(np.median(ts)))
    return out


# ---------------------------------------------------------------------------------------------- the study


def measure(args) -> None:
    import tempfile

    from ddt_export.runtime import load_engines

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    t_start, kinds, delay = time.time(), catalog(args.seed), args.max_delay_ms / 1e3
    print(f"catalog: {kinds}", flush=True)
    with load_engines(args.engines) as engines:
        budget, model = engines.max_batch, engines.config.name
        tight, host = measure_curve(engines)  # the tight-loop reference, reported beside the servers' own
        specs = resolve_catalog(engines, kinds, say=lambda m: print(m, flush=True))
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    ports = {p: free_port() for p in args.policies}
    traces = Traces({p: work / f"trace-{p}.jsonl" for p in args.policies})
    procs = {p: start_server(args.engines, ports[p], p, args.max_delay_ms, 4 * 3600, traces.paths[p])
             for p in args.policies}
    urls = {p: f"http://{LOOPBACK}:{ports[p]}" for p in args.policies}
    out = {"date": time.strftime("%Y-%m-%d"), "model": model, "engines": str(args.engines), "budget": budget,
           "kinds": kinds, "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                       "python": platform.python_version(), "load_avg": [os.getloadavg()]},
           "max_delay_ms": args.max_delay_ms, "duration_s": args.duration, "host": host,
           "min_requests": args.min_requests, "focus_load": args.focus_load, "focus_requests": args.focus_requests,
           "tight_curve": tight.to_dict(), "runs": []}
    pooled = []
    try:
        for p in args.policies:
            wait_healthy(urls[p], procs[p])
        solo = solo_latencies(urls[args.policies[0]], kinds, args.solo_repeats)
        out["solo_s"] = solo
        print(f"solo latencies (s): {[round(s, 3) for s in solo]}", flush=True)
        out["saturation"] = {}
        for p in [p for p in args.policies if p in args.saturation_policies]:
            out["saturation"][p] = asyncio.run(closed_loop(urls[p], kinds, SAT_CLIENTS, args.saturation_s, args.seed,
                                                           warmup=args.saturation_warmup_s))
            print(f"saturation {p}: {out['saturation'][p]}", flush=True)
        pooled += traces.new()
        sat = out["saturation"].get("request", next(iter(out["saturation"].values())))["throughput"]
        if sat <= 0:
            raise SystemExit(f"no request answered within --saturation-s {args.saturation_s:g} after the "
                             f"{args.saturation_warmup_s:g} s warm-up: no saturation to take the loads from")
        for i, load in enumerate(args.loads):
            rate = load * sat
            want = args.focus_requests if abs(load - args.focus_load) < 1e-9 else args.min_requests
            duration = max(args.duration, want / rate)  # enough requests for a p99
            trace = poisson_trace(rate, duration, len(kinds), args.seed + 1 + i)
            arr, meas = arrivals(trace, specs), {}
            out["machine"]["load_avg"].append(os.getloadavg())
            gaps = []
            for p in args.policies:
                before = metric_sums(urls[p])
                recs = asyncio.run(open_loop(urls[p], kinds, trace))
                meas[p] = {**stats(recs, solo, duration), **per_iteration(before, metric_sums(urls[p])),
                           "duration_s": duration}
                gaps += [r.latency - r.server_s for r in recs if r.latency is not None]
                print(f"load {load:.0%} {p:>7}: p50 {meas[p]['p50']:.3f} p99 {meas[p]['p99']:.3f} slowdown p99 "
                      f"{meas[p]['slowdown_p99']:.2f} ({meas[p]['answered']} answered)", flush=True)
            recs = traces.new()
            pooled += recs
            curve, fit = fit_trace(recs, float(np.median(gaps)))
            print(f"load {load:.0%} curve: {fit}", flush=True)
            for p in args.policies:
                sim = sim_stats(arr, simulate(arr, curve, budget, p, delay, 512), solo)
                out["runs"].append({"load": load, "rate": rate, "policy": p, "measured": meas[p], "simulated": sim,
                                    "curve": curve.to_dict(), "fit": fit})
                print(f"load {load:.0%} {p:>7}: simulated p50 {sim['p50']:.3f} p99 {sim['p99']:.3f} slowdown p99 "
                      f"{sim['slowdown_p99']:.2f}", flush=True)
            args.json.write_text(json.dumps(out, indent=1))
    finally:
        stop_servers(procs.values(), 120)
    rs = [g for r in out["runs"] for g in [r["fit"]["request_s"]]]
    curve, fit = fit_trace(pooled + traces.new(), float(np.median(rs)) if rs else 0.0)
    out.update(curve=curve.to_dict(), fit=fit)
    for p in args.policies:  # simulated for every policy, measured for --saturation-policies
        out["saturation"].setdefault(p, {})["simulated"] = sim_saturation(curve, specs, budget, p, delay)
    gcurve, gspecs, gbudget = load_curve("gpu", "ddt-xl-256")
    out["gpu"] = gpu_study(gcurve, gspecs, gbudget, args.gpu_loads, args.gpu_requests, args.seed, delay)
    out["gpu"]["sensitivity"] = gpu_sensitivity(gspecs, gbudget, args.gpu_requests // 2, args.seed, delay)
    out["minutes"] = (time.time() - t_start) / 60
    args.json.write_text(json.dumps(out, indent=1))
    plot(out, args.plot)
    if not args.no_write:
        write_section(out, args.readme)
    print(f"wrote {args.json}, {args.plot}" + ("" if args.no_write else f", {args.readme}"))
