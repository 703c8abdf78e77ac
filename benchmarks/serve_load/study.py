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

from serve_load import (LOOPBACK, POLICIES, arrivals, catalog, closed_loop, metric_sums, open_loop, per_iteration,
                        poisson_trace, stats, summary)

from ddt_export.core.config import load_config
from ddt_export.core.flops import step_flops
from ddt_export.runtime.batching.scheduler import RequestSpec, Scheduler
from ddt_export.runtime.sampling.schedules import parse_spec, steps_for
from ddt_export.runtime.batching.simulate import Arrival, CostCurve, gpu_like_curve, simulate

ROOT = Path(__file__).resolve().parents[1]
ROWS = (1, 2, 4, 8, 16, 32, 48, 64)
SAT_CLIENTS = 6
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


def fit_trace(recs: list[dict], request_s: float) -> tuple[CostCurve, dict]:
    """The cost curve from the servers' own iterations (`serve --trace`): one loop iteration, less its VAE call,
    takes E0 [encoder ran] + e1 x encoder rows + D0 + d1 x decoder rows + h x requests seconds (non-negative
    least squares); the loop's idle-free gap between iterations is the per-iteration overhead; `request_s`
    (client latency less the server's own time: HTTP, JSON, PNGs) is the per-request cost."""
    from scipy.optimize import nnls

    busy = [r for r in recs if r["step_s"] is not None]
    x = np.array([[r["encoder_rows"] > 0, r["encoder_rows"], 1.0, r["decoder_rows"], r["requests"]] for r in busy],
                 np.float64)
    y = np.array([r["end"] - r["start"] - r["vae_s"] for r in busy])
    (e0, e1, d0, d1, h), _ = nnls(x, y)
    resid = y - x @ np.array([e0, e1, d0, d1, h])
    order = sorted(busy, key=lambda r: r["start"])
    gaps = [b["start"] - a["end"] for a, b in zip(order, order[1:]) if 0 <= b["start"] - a["end"] < 0.02]
    curve = CostCurve(tuple((r, float(e0 + e1 * r)) for r in ROWS), tuple((r, float(d0 + d1 * r)) for r in ROWS),
                      iteration_s=float(np.median(gaps)) if gaps else 0.0, request_step_s=float(h),
                      request_s=float(request_s), note="fitted to the servers' iterations at this load")
    return curve, {"iterations": len(busy), "encoder_ms": [1e3 * e0, 1e3 * e1], "decoder_ms": [1e3 * d0, 1e3 * d1],
                   "request_ms": 1e3 * h, "gap_ms": 1e3 * curve.iteration_s, "request_s": request_s,
                   "r2": float(1 - resid.var() / y.var()) if len(y) > 1 else float("nan")}


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


# ---------------------------------------------------------------------------------------------- simulation


def sim_stats(arr: list[Arrival], res, solo: list[float]) -> dict:
    lat = np.array([res.latency[i] for i in sorted(res.latency)])
    slow = np.array([res.latency[i] / solo[arr[i].kind] for i in sorted(res.latency)])
    span = max(res.end, arr[-1].t if arr else 0.0, 1e-9)
    out = summary(lat, slow, len(arr), len(res.rejected), span)
    out.update(requests_per_iteration=res.requests_per_iteration, rows_per_iteration=res.rows_per_iteration)
    if len(lat):  # what the p99 is made of: the requests at or above it, their wait for admission and their run
        ids = [i for i in sorted(res.latency) if res.latency[i] >= out["p99"]]
        queue = float(np.mean([res.queue[i] for i in ids]))
        out.update(p99_queue_s=queue, p99_run_s=float(np.mean([res.latency[i] for i in ids])) - queue,
                   p99_steps=sorted({arr[i].spec.sampler.num_steps for i in ids}))
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
    sat = {p: sim_saturation(curve, specs, budget, p, max_delay) for p in POLICIES}
    rows, ratios = [], {}
    for i, load in enumerate(loads):
        rate = load * sat["request"]
        trace = poisson_trace(rate, n / rate, len(specs), seed + 100 + i)
        arr = arrivals(trace, specs)
        by = {}
        for p in POLICIES:
            by[p] = sim_stats(arr, simulate(arr, curve, budget, p, max_delay, max_queue=10 ** 6), solo)
            rows.append({"load": load, "rate": rate, "policy": p, **by[p]})
        ratios[f"{load:.0%}"] = {k: by["step"][k] / by["request"][k] for k in ("p50", "p99", "slowdown_p99")}
        ratios[f"{load:.0%}"].update({f"fair_{k}": by["fair"][k] / by["request"][k] for k in ("p50", "p99",
                                                                                          "slowdown_p99")})
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
    import tempfile

    from serve_report import plot, write_section

    from ddt_export.runtime import load_engines
    from ddt_export.runtime.batching.runner import resolve_request

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    t_start, kinds, delay = time.time(), catalog(args.seed), args.max_delay_ms / 1e3
    print(f"catalog: {kinds}", flush=True)
    with load_engines(args.engines) as engines:
        budget, model = engines.max_batch, engines.config.name
        tight, host = measure_curve(engines)  # the tight-loop reference, reported beside the servers' own
        specs = [resolve_request(engines, label=0, num=k["num"], steps=k["steps"], cfg=k["cfg"],
                                 schedule=k["schedule"], say=lambda m: print(m, flush=True)) for k in kinds]
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
            out["saturation"][p] = asyncio.run(closed_loop(urls[p], kinds, SAT_CLIENTS, args.saturation_s, args.seed))
            print(f"saturation {p}: {out['saturation'][p]}", flush=True)
        pooled += traces.new()
        sat = out["saturation"].get("request", next(iter(out["saturation"].values())))["throughput"]
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
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
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
        write_section(out, args.results, args)
    print(f"wrote {args.json}, {args.plot}" + ("" if args.no_write else f", {args.results}"))
