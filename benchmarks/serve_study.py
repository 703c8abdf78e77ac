"""`serve_load.py measure` and `simulate`: the cost curve, the servers, the runs, the simulator on the same traces.
(Split from serve_load.py to keep files small; run serve_load.py.)"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from serve_load import (LOOPBACK, arrivals, catalog, closed_loop, metric_sums, open_loop, per_iteration,
                        poisson_trace, stats, summary)

from ddt_export.core.config import load_config
from ddt_export.core.flops import step_flops
from ddt_export.runtime.batching import RequestSpec, Scheduler
from ddt_export.runtime.schedules import parse_spec, steps_for
from ddt_export.runtime.simulate import Arrival, CostCurve, gpu_like_curve, simulate

ROOT = Path(__file__).resolve().parents[1]
ROWS = (1, 2, 4, 8, 16, 32, 48, 64)
SAT_CLIENTS = 16
VAE_FLOPS_256 = 0.31e12  # sd-vae-ft-ema decoder, one 256 px image (a stated estimate, ~1.2 TFLOP at 512 px)


# ---------------------------------------------------------------------------------------------- cost curve


class Timed:
    """The real engines, timing every graph call (to split an iteration into graph time and host time)."""

    def __init__(self, engines):
        self.engines, self.graph_s = engines, 0.0

    def __getattr__(self, name):
        return getattr(self.engines, name)

    def _time(self, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        self.graph_s += time.perf_counter() - t0
        return out

    def encoder(self, x, t, y):
        return self._time(self.engines.encoder, x, t, y)

    def decoder(self, x, s):
        return self._time(self.engines.decoder, x, s)


def measure_curve(engines, repeats: int = 15) -> tuple[CostCurve, dict]:
    """encoder/decoder seconds by rows (median of `repeats`), and the host's per-request cost per iteration."""
    from ddt_export.runtime import batch_step

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
    host = {}  # k one-row requests (cfg 1, schedule all): host time of run_iteration besides the graph calls
    timed = Timed(engines)
    for k in (1, 8, 16):
        sch = Scheduler(engines.max_batch)
        spec = RequestSpec(0, 1, 0, dataclasses.replace(engines.config.sampler, num_steps=1000, guidance=1.0),
                           tuple(range(1000)), "all")
        for _ in range(k):
            sch.submit(spec, 0.0)
        for job in sch.admit(0.0):
            batch_step.start(engines, job)
        samples = []
        for _ in range(repeats):
            b = sch.batch()
            timed.graph_s = 0.0
            t0 = time.perf_counter()
            batch_step.run_iteration(timed, b)
            samples.append(time.perf_counter() - t0 - timed.graph_s)
            sch.advance(b, 0.0)
        host[k] = float(np.median(samples))
    slope = (host[16] - host[1]) / 15
    curve = CostCurve(tuple(pts["encoder"]), tuple(pts["decoder"]), request_step_s=max(slope, 0.0),
                      note="measured on this CPU (onnxruntime), this run")
    return curve, {"host_s_by_requests": host}


def scaled(curve: CostCurve, factor: float) -> CostCurve:
    """The graph calls `factor` times slower (the server's calls against the tight-loop microbenchmark)."""
    sc = {g: tuple((r, factor * t) for r, t in getattr(curve, g)) for g in ("encoder", "decoder", "vae_decoder")}
    return dataclasses.replace(curve, **sc)


def calibrate(curve: CostCurve, specs: list[RequestSpec], solo: list[float], budget: int) -> tuple[CostCurve, dict]:
    """Fit to the solo latencies, by non-negative least squares over the catalog:
    measured_k = a x graph_k + steps_k x h + c, where graph_k is the request's graph-call time on the measured
    curve (a: how much slower the server's calls run than the tight-loop microbenchmark: ORT's spinning thread
    pool, the client and the loop share the cores), h the loop's per-iteration overhead, c the per-request cost
    outside the loop (HTTP, PNGs)."""
    from scipy.optimize import nnls

    bare = dataclasses.replace(curve, request_step_s=0.0)
    graph = [simulate([Arrival(0.0, s, k)], bare, budget).latency[0] for k, s in enumerate(specs)]
    host = [s.sampler.num_steps * curve.request_step_s for s in specs]
    a = np.array([[g, s.sampler.num_steps, 1.0] for g, s in zip(graph, specs)])
    (factor, h, c), _ = nnls(a, np.array(solo) - np.array(host))
    fitted = dataclasses.replace(scaled(curve, factor), iteration_s=float(h), request_s=float(c))
    pred = [simulate([Arrival(0.0, s, k)], fitted, budget).latency[0] for k, s in enumerate(specs)]
    err = [abs(p - m) / m for p, m in zip(pred, solo)]
    return fitted, {"graph_factor": float(factor), "iteration_s": float(h), "request_s": float(c),
                    "solo_max_rel_err": float(max(err)), "solo_mean_rel_err": float(np.mean(err))}


# ---------------------------------------------------------------------------------------------- servers


def start_server(engines: Path, port: int, policy: str, max_delay_ms: float, lifetime: float):
    argv = [sys.executable, "-m", "cli", "serve", "--engines", str(engines), "--port", str(port), "--batching",
            policy, "--max-delay-ms", str(max_delay_ms), "--max-queue", "512", "--lifetime", str(lifetime)]
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


# ---------------------------------------------------------------------------------------------- simulation


def sim_stats(arr: list[Arrival], res, solo: list[float]) -> dict:
    lat = np.array([res.latency[i] for i in sorted(res.latency)])
    slow = np.array([res.latency[i] / solo[arr[i].kind] for i in sorted(res.latency)])
    span = max(res.end, arr[-1].t if arr else 0.0, 1e-9)
    out = summary(lat, slow, len(arr), len(res.rejected), span)
    out.update(requests_per_iteration=res.requests_per_iteration, rows_per_iteration=res.rows_per_iteration)
    return out


def sim_saturation(curve, specs, budget, policy, max_delay, n=2000, seed=0) -> float:
    """Throughput with every request waiting from the start (a permanently full queue)."""
    rng = np.random.default_rng([seed, 41])
    arr = [Arrival(0.0, specs[k], int(k)) for k in rng.integers(0, len(specs), n)]
    res = simulate(arr, curve, budget, policy, max_delay, max_queue=n)
    return len(res.latency) / res.end


def specs_for_preset(preset: str, kinds: list[dict]) -> list[RequestSpec]:
    """The catalog on a model without engines: dp:K becomes K evenly spaced steps (a stand-in: the DP needs
    the model's trajectory; only how many steps recompute, and where, matters for the cost)."""
    cfg = load_config(preset)
    out = []
    for k in kinds:
        sampler = dataclasses.replace(cfg.sampler, num_steps=k["steps"], guidance=k["cfg"])
        spec = parse_spec(k["schedule"])
        steps = (sorted({int(v) for v in np.linspace(0, k["steps"], spec.value, endpoint=False)})
                 if spec.kind == "dp" else steps_for(spec, k["steps"]))
        out.append(RequestSpec(0, k["num"], 0, sampler, tuple(steps), k["schedule"]))
    return out


def load_curve(which: str, preset: str) -> tuple[CostCurve, list[RequestSpec], int]:
    """`gpu` (the FLOP-model assumption), a gpu_check.json (scripts/gpu_check.sh: `results.cost-curve`, seconds
    by rows measured on a GPU), or a JSON written by `measure` (its `curve`)."""
    kinds = catalog(0)
    if which == "gpu":
        f = step_flops(load_config(preset).model)
        return gpu_like_curve(f.encoder, f.decoder, VAE_FLOPS_256), specs_for_preset(preset, kinds), 64
    d = json.loads(Path(which).read_text())
    if "cost-curve" in d.get("results", {}):
        c = d["results"]["cost-curve"]
        pts = {g: tuple(sorted((int(r), float(t)) for r, t in c[g].items())) for g in ("encoder", "decoder",
                                                                                     "vae_decoder") if g in c}
        return (CostCurve(**pts, note=f"measured by gpu_check on {c.get('gpu', 'a GPU')}: {c.get('source', '')}"),
                specs_for_preset(preset, kinds), 64)
    return CostCurve.from_dict(d["curve"]), specs_for_preset(d.get("preset", "ddt-tiny-digits"), kinds), d["budget"]


def gpu_study(curve, specs, budget, loads, n, seed, max_delay) -> dict:
    solo = [simulate([Arrival(0.0, s, k)], curve, budget).latency[0] for k, s in enumerate(specs)]
    sat = {p: sim_saturation(curve, specs, budget, p, max_delay) for p in ("step", "request", "single")}
    rows, ratios = [], {}
    for i, load in enumerate(loads):
        rate = load * sat["request"]
        trace = poisson_trace(rate, n / rate, len(specs), seed + 100 + i)
        arr = arrivals(trace, specs)
        by = {}
        for p in ("step", "request", "single"):
            by[p] = sim_stats(arr, simulate(arr, curve, budget, p, max_delay, max_queue=10 ** 6), solo)
            rows.append({"load": load, "rate": rate, "policy": p, **by[p]})
        ratios[f"{load:.0%}"] = {k: by["step"][k] / by["request"][k] for k in ("p50", "p99", "slowdown_p99")}
    return {"curve": curve.to_dict(), "solo_s": solo, "saturation": sat, "rows": rows, "ratios": ratios,
            "budget": budget}


def gpu_sensitivity(specs, budget, n, seed, max_delay, load=0.7) -> list[dict]:
    """The step/request ratios at `load` as the assumed GPU's small-batch utilization and call overhead vary."""
    f = step_flops(load_config("ddt-xl-256").model)
    out = []
    for half_rows in (4, 8, 16, 32):
        for call_s in (0.25e-3, 1e-3):
            c = gpu_like_curve(f.encoder, f.decoder, VAE_FLOPS_256, half_rows=half_rows, call_s=call_s)
            g = gpu_study(c, specs, budget, [load], n, seed, max_delay)
            out.append({"half_rows": half_rows, "call_ms": call_s * 1e3, "saturation": g["saturation"],
                        **next(iter(g["ratios"].values()))})
    return out


# ---------------------------------------------------------------------------------------------- the study


def measure(args) -> None:
    from serve_report import plot, write_section

    from ddt_export.runtime import load_engines
    from ddt_export.runtime.batch_step import resolve_request

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    t_start, kinds = time.time(), catalog(args.seed)
    print(f"catalog: {kinds}", flush=True)
    engines = load_engines(args.engines)  # open all along: the cost curve is measured again before each load
    budget, model = engines.max_batch, engines.config.name
    curve, host = measure_curve(engines)
    print(f"cost curve: {curve}", flush=True)
    specs = [resolve_request(engines, label=0, num=k["num"], steps=k["steps"], cfg=k["cfg"],
                             schedule=k["schedule"], say=lambda m: print(m, flush=True)) for k in kinds]
    ports = {p: free_port() for p in args.policies}
    procs = {p: start_server(args.engines, ports[p], p, args.max_delay_ms, 4 * 3600) for p in args.policies}
    urls = {p: f"http://{LOOPBACK}:{ports[p]}" for p in args.policies}
    out = {"date": time.strftime("%Y-%m-%d"), "model": model, "engines": str(args.engines), "budget": budget,
           "kinds": kinds, "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                       "python": platform.python_version(), "load_avg": [os.getloadavg()]},
           "max_delay_ms": args.max_delay_ms, "duration_s": args.duration, "host": host, "runs": []}
    try:
        for p in args.policies:
            wait_healthy(urls[p], procs[p])
        solo = solo_latencies(urls[args.policies[0]], kinds, args.solo_repeats)
        out["solo_s"] = solo
        print(f"solo latencies (s): {[round(s, 3) for s in solo]}", flush=True)
        fitted, cal = calibrate(curve, specs, solo, budget)
        out.update(curve=fitted.to_dict(), calibration=cal)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"calibrated: {cal}", flush=True)
        out["saturation"] = {}
        for p in args.policies:
            out["saturation"][p] = asyncio.run(closed_loop(urls[p], kinds, SAT_CLIENTS, args.saturation_s, args.seed))
            out["saturation"][p]["simulated"] = sim_saturation(fitted, specs, budget, p, args.max_delay_ms / 1e3)
            print(f"saturation {p}: {out['saturation'][p]}", flush=True)
        sat = out["saturation"].get("request", next(iter(out["saturation"].values())))["throughput"]
        for i, load in enumerate(args.loads):
            now_curve, _ = measure_curve(engines, repeats=7)  # this load's curve: the machine is shared
            point = dataclasses.replace(scaled(now_curve, cal["graph_factor"]), iteration_s=fitted.iteration_s,
                                        request_s=fitted.request_s)
            out["machine"]["load_avg"].append(os.getloadavg())
            rate = load * sat
            duration = max(args.duration, args.min_requests / rate)  # enough requests for a p99
            trace = poisson_trace(rate, duration, len(kinds), args.seed + 1 + i)
            arr = arrivals(trace, specs)
            for p in args.policies:
                before = metric_sums(urls[p])
                recs = asyncio.run(open_loop(urls[p], kinds, trace))
                meas = {**stats(recs, solo, duration), **per_iteration(before, metric_sums(urls[p])),
                        "duration_s": duration}
                sim = sim_stats(arr, simulate(arr, point, budget, p, args.max_delay_ms / 1e3, 512), solo)
                out["runs"].append({"load": load, "rate": rate, "policy": p, "measured": meas, "simulated": sim,
                                    "curve": point.to_dict()})
                print(f"load {load:.0%} {p:>7}: measured p50 {meas['p50']:.3f} p99 {meas['p99']:.3f} slow99 "
                      f"{meas['slowdown_p99']:.2f} | sim p50 {sim['p50']:.3f} p99 {sim['p99']:.3f} slow99 "
                      f"{sim['slowdown_p99']:.2f}", flush=True)
                args.json.write_text(json.dumps(out, indent=1))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        engines.close()
    gcurve, gspecs, gbudget = load_curve("gpu", "ddt-xl-256")
    out["gpu"] = gpu_study(gcurve, gspecs, gbudget, args.gpu_loads, args.gpu_requests, args.seed,
                           args.max_delay_ms / 1e3)
    out["gpu"]["sensitivity"] = gpu_sensitivity(gspecs, gbudget, args.gpu_requests // 2, args.seed,
                                                args.max_delay_ms / 1e3)
    out["minutes"] = (time.time() - t_start) / 60
    args.json.write_text(json.dumps(out, indent=1))
    plot(out, args.plot)
    if not args.no_write:
        write_section(out, args.results, args)
    print(f"wrote {args.json}, {args.plot}" + ("" if args.no_write else f", {args.results}"))
