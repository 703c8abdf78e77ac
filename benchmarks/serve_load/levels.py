"""Service levels under load (issue 23): SLO attainment, goodput and the dFID served, per batching policy, with and
without load-adaptive plans, measured on the bundled digits model and simulated on the same traces.

    python benchmarks/serve_load/levels.py simulate [--curve cpu | gpu]       # the simulator alone (no lock needed)
    flock /work/cpu-measure.lock python benchmarks/serve_load/levels.py measure --requests 20

The workload (`KINDS`): mixed requests (num 1-4; the model's own 50-step sampler, 20 or 30 steps, stored plans)
drawn uniformly, random class and seed, Poisson arrivals at LOADS x the request-level saturation. In the adaptive
cell half the arrivals (the same ones in every load, drawn with the trace) carry `"quality": "adaptive"` (the
folder's `fast` budget). Cells: `request`, `step`, `fair`, `auto` on the plain trace, `auto` on the adaptive one
(`slo` too where asked with --policies). Reports what `runtime.batching.report.summarize` reports, for the
measured run (`serve.load.measured_run`, one server per policy, one at a time on the CPU) and for the simulator on
the server's own start-up cost curve (`/v1/info`), and their relative error; then issue 21's serving line (70%
load, every request on the model's own sampler against every one on `fast`).

Imports `study` (the server helpers) of the study's files; `levels_report` reads its JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from ddt_export.core.manifest import read_manifest  # noqa: E402
from ddt_export.runtime.batching.auto import choose_policy, policy_workload  # noqa: E402
from ddt_export.runtime.batching.costs import CostCurve  # noqa: E402
from ddt_export.runtime.batching.report import compare  # noqa: E402
from ddt_export.runtime.batching.scheduler import SloModel  # noqa: E402
from ddt_export.runtime.batching.simulate import Arrival, gpu_like_curve, simulate  # noqa: E402
from ddt_export.runtime.sampling.plans import PLAN_FIELDS, lookup, read_plans  # noqa: E402
from ddt_export.runtime.sampling.request import API, RequestInput, resolve  # noqa: E402
from ddt_export.runtime.sampling.schedules import resolve_schedule  # noqa: E402
from ddt_export.serve.levels import body_terms, frontier_plans, terms_for  # noqa: E402
from ddt_export.serve.load import Shot, measured_run  # noqa: E402
from benchmarks.serve_load.workload import stop_servers  # noqa: E402

HERE = Path(__file__).resolve().parent
ENGINES = ROOT / "engines" / "digits-fp32-plans"
# every kind at the model's own cfg, as in the measured runs (then, a dp plan's options at two cfg values
# recomputed the DP in turn; fixed since: docs/serve.md)
KINDS = ({"num": 1}, {"num": 2}, {"num": 4}, {"num": 1, "steps": 20}, {"num": 3, "steps": 20},
         {"num": 2, "plan": "adams4-25-all"}, {"num": 1, "plan": "adams3-12-all"}, {"num": 2, "steps": 30})
DEFAULT_KINDS = ({"num": 1}, {"num": 2}, {"num": 3}, {"num": 4})  # issue 21's line: the model's own sampler
LOADS = (0.7, 1.0, 1.5)
CELLS = (("request", False), ("step", False), ("fair", False), ("auto", False), ("auto", True))
MAX_QUEUE = 64  # the server's default --max-queue
# this CPU's curve as the 2026-12-01 study fitted it (servers' iterations): the `simulate --curve cpu` stand-in
CPU = CostCurve(tuple((r, 11.56e-3 * r) for r in (1, 2, 4, 8, 16, 32, 64)),
                tuple((r, 4.07e-3 * r) for r in (1, 2, 4, 8, 16, 32, 64)), iteration_s=0.07e-3, request_s=7e-3,
                note="linear fit of the 2026-12-01 serve_load servers (11.56 ms/encoder row, 4.07 ms/decoder row)")


def gpu_curve() -> CostCurve:
    from ddt_export.core.config import load_config
    from ddt_export.core.flops import step_flops

    from benchmarks.serve_load.simulation import VAE_FLOPS_256
    f = step_flops(load_config("ddt-xl-256").model)
    return gpu_like_curve(f.encoder, f.decoder, VAE_FLOPS_256)


# ---------------------------------------------------------------------------------------------- the workload


def body(kind: dict, label: int, seed: int, adaptive: bool, plan: str | None = None) -> dict:
    out = {"class": label, "seed": seed, **(kind if plan is None else {"num": kind["num"], "plan": plan})}
    if adaptive:
        out["quality"] = "adaptive"
    return out


def trace(rate: float, n: int, kinds: int, seed: int) -> list[dict]:
    """n Poisson arrivals: time, kind, class, seed, and whether it allows the `fast` budget (half of them)."""
    rng = np.random.default_rng([seed, 23])
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    return [{"t": float(t[i]), "kind": int(rng.integers(0, kinds)), "label": int(rng.integers(0, 10)),
             "seed": int(rng.integers(0, 2 ** 31)), "adaptive": bool(rng.random() < 0.5)} for i in range(n)]


class Catalog:
    """The kinds resolved as the server resolves their bodies (each with its adaptive terms), for the simulator."""

    def __init__(self, folder: Path, kinds=KINDS, plan: str | None = None):
        from ddt_export.runtime import load_engines

        manifest = read_manifest(folder)
        plans, _ = read_plans(folder, manifest)
        self.frontier = frontier_plans(plans)
        find = lookup(folder, manifest, API.plan)
        self.plain, self.adaptive = [], []
        with load_engines(folder) as engines:
            self.config, self.max_batch = engines.config, engines.max_batch

            def spec(b):
                given = RequestInput(classes=(0,), num=b["num"], seed=0, steps=b.get("steps"), cfg=b.get("cfg"),
                                     plan=b.get("plan"))
                return resolve_schedule(resolve(engines.config, given, API, find), engines, say=lambda m: None)

            for kind in kinds:
                b = body(kind, 0, 0, True, plan)
                asked = spec(b)
                ns = SimpleNamespace(priority=None, deadline_ms=None, max_fid_delta=None, quality="adaptive",
                                     plan=b.get("plan"), **{f: b.get(f) for f in PLAN_FIELDS})
                t, names = body_terms(ns, self.frontier)
                options = [(n, spec({"num": b["num"], "cfg": b.get("cfg"), "plan": n})) for n in names]
                self.plain.append((asked, terms_for({**t, "budget": None}, ns, asked, [], self.frontier)))
                self.adaptive.append((asked, terms_for(t, ns, asked, options, self.frontier)))

    def arrivals(self, shots: list[dict], adaptive: bool) -> list[Arrival]:
        out = []
        for s in shots:
            spec, terms = (self.adaptive if adaptive and s["adaptive"] else self.plain)[s["kind"]]
            out.append(Arrival(s["t"], spec, s["kind"], terms))
        return out


def saturation(cat: Catalog, curve: CostCurve, n: int = 400, seed: int = 0) -> float:
    """Request-level saturation (`request`, every request waiting from the start) of the mix on the curve."""
    rng = np.random.default_rng([seed, 41])
    arr = [Arrival(0.0, cat.plain[k][0], int(k), cat.plain[k][1]) for k in rng.integers(0, len(cat.plain), n)]
    res = simulate(arr, curve, cat.max_batch, "request", max_queue=n)
    return len(res.latency) / res.end


def resolved_policy(policy: str, cat: Catalog, curve: CostCurve) -> str:
    if policy != "auto":
        return policy
    return choose_policy(curve, cat.max_batch, policy_workload(cat.config.sampler, cat.max_batch // 2)).policy


def sim_cell(cat, curve, shots, policy, adaptive, adapt="cheapest", headroom=1.0) -> dict:
    """One simulated cell; `policy` as `resolved_policy` gives it (auto: the policy it chose)."""
    arr = cat.arrivals(shots, adaptive)
    res = simulate(arr, curve, cat.max_batch, policy, max_queue=MAX_QUEUE,
                   slo=SloModel(curve, 3.0, adapt, headroom))
    return {**res.summary(), **budget_check(arr, res)}


def budget_check(arr: list[Arrival], res) -> dict:
    """dFID served within each adaptive request's budget; a request that allowed no trade never moved."""
    over = untouched = 0
    for k, s in res.served.items():
        if arr[k].terms.adaptive:
            budget = max(o.dfid for o in arr[k].terms.options) if arr[k].terms.options else 0.0
            over += s.dfid is not None and s.dfid > budget + 1e-12
        else:
            untouched += not s.degraded
    plain = sum(not res.served[k].adaptive for k in res.served)
    return {"over_budget": over, "exact_untouched": untouched, "exact_answered": plain}


def cmd_simulate(args) -> None:
    cat = Catalog(args.engines)
    curve = CPU if args.curve == "cpu" else gpu_curve() if args.curve == "gpu" else CostCurve.from_dict(
        json.loads(Path(args.curve).read_text()))
    sat = saturation(cat, curve)
    auto = resolved_policy("auto", cat, curve)
    policy = {p: auto if p == "auto" else resolved_policy(p, cat, curve) for p in args.policies}
    print(f"curve {curve.note}; request-level saturation {sat:.3f} req/s; auto -> {auto}")
    cells = [(p, a) for p in args.policies for a in ((False, True) if p in args.adaptive else (False,))]
    out = {"curve": curve.to_dict(), "saturation": sat, "auto": auto, "requests": args.requests,
           "headroom": args.headroom, "cells": []}
    for li, load in enumerate(args.loads):
        shots = trace(load * sat, args.requests, len(KINDS), args.seed + li)
        for p, a in cells:
            s = sim_cell(cat, curve, shots, policy[p], a, args.adapt, args.headroom)
            out["cells"].append({"load": load, "asked": p, "adaptive": a, "policy": policy[p], "simulated": s})
            print(f"{load:4.0%} {p:>8}{' +adaptive' if a else '          '} attainment {s['slo_attainment']:.3f} "
                  f"goodput {s['goodput']:.3f}/s thr {s['throughput']:.3f}/s p50 {s['p50']:.2f} p99 {s['p99']:.2f} "
                  f"503 {s['rejected_503']} dFID {s['mean_dfid_served']} moved {s['degraded']} over "
                  f"{s['over_budget']} met exact {s.get('slo_met_exact')}/{s.get('answered_exact')} adaptive "
                  f"{s.get('slo_met_adaptive')}/{s.get('answered_adaptive')}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------------------------------------- measured


def start(folder: Path, policy: str, log: Path):
    from benchmarks.serve_load.study import free_port
    port = free_port()
    argv = [sys.executable, "-m", "cli", "serve", "--engines", str(folder), "--port", str(port), "--batching", policy,
            "--max-delay-ms", "10", "--max-queue", str(MAX_QUEUE), "--lifetime", "5400", "--trace",
            str(log.with_suffix(".trace.jsonl"))]
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def info(url: str) -> dict:
    import httpx
    return httpx.get(url + "/v1/info", timeout=30).json()


def shots_of(shots: list[dict], kinds, adaptive: bool, plan: str | None = None) -> list[Shot]:
    return [Shot(s["t"], body(kinds[s["kind"]], s["label"], s["seed"], adaptive and s["adaptive"], plan))
            for s in shots]


def answer_check(run, budget: float) -> dict:
    """Measured: dFID served within budget for the adaptive requests; the others ran exactly what they asked."""
    over = moved_exact = adaptive = exact = 0
    for shot, a in zip(run.shots, run.answers):
        if a.status != 200:
            continue
        s = a.payload.get("served", {})
        if shot.body.get("quality") == "adaptive":
            adaptive += 1
            over += s.get("fid_delta") is not None and s["fid_delta"] > budget + 1e-12
        else:
            exact += 1
            moved_exact += bool(s.get("degraded")) or s.get("plan") != shot.body.get("plan")
    return {"over_budget": over, "exact_moved": moved_exact, "answered_adaptive": adaptive, "answered_exact": exact}


def cell(url, cat, shots, kinds, adaptive, plan=None) -> dict:
    """One measured run on a server and the simulator on the same trace, on the server's own start-up curve."""
    i = info(url)
    curve = CostCurve.from_dict(i["cost_curve"])
    t0 = time.time()
    run = measured_run(url, shots_of(shots, kinds, adaptive, plan))
    got = {**run.summary(), **answer_check(run, i["adaptive_budget"] or 0.0), "wall_s": time.time() - t0}
    gaps = [a.latency - a.payload["timings"]["total_s"] for a in run.answers if a.status == 200
            and "total_s" in a.payload.get("timings", {})]
    got["outside_s"] = float(np.median(gaps)) if gaps else None  # client latency less the server's own
    got["calibration"] = info(url).get("cost_calibration")  # the server's correction of its curve, after the run
    arr = cat.arrivals(shots, adaptive)
    res = simulate(arr, curve, cat.max_batch, i["batching"], max_queue=MAX_QUEUE,
                   slo=SloModel(curve, i["slo_scale"], i["adapt"]))
    sim = {**res.summary(), **budget_check(arr, res)}
    return {"policy": i["batching"], "measured": got, "simulated": sim, "error": compare(sim, got)}


def cmd_measure(args) -> None:
    import tempfile

    from benchmarks.serve_load.study import wait_healthy
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start, work = time.time(), Path(tempfile.mkdtemp(prefix="levels-"))
    cat, default_cat = Catalog(args.engines), Catalog(args.engines, DEFAULT_KINDS)
    fast_cat = Catalog(args.engines, DEFAULT_KINDS, plan="fast")
    policies = list(dict.fromkeys(p for p, _ in CELLS))
    procs, urls = {}, {}
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": args.argv, "engines": str(args.engines),
           "precision": read_manifest(args.engines).precision, "max_batch": cat.max_batch, "seed": args.seed,
           "plans": sorted(cat.frontier), "fast_label": cat.frontier["fast"].label(),
           "fast_dfid": float(cat.frontier["fast"].measured["dfid"]), "kinds": list(KINDS), "requests": args.requests,
           "load_avg": [os.getloadavg()], "cells": []}
    try:
        for p in policies:  # one at a time: each measures its cost curve at start-up on an otherwise idle CPU
            procs[p], urls[p] = start(args.engines, p, work / f"{p}.log")
            wait_healthy(urls[p], procs[p], timeout=300)
            measured_run(urls[p], [Shot(0.0, {"class": 0, "steps": 5})])  # warm-up
            i = info(urls[p])
            print(f"{p}: {i['batching']}, curve {i['cost_curve']['note']}", flush=True)
        curve = CostCurve.from_dict(info(urls["auto"])["cost_curve"])
        sim_sat = saturation(cat, curve)
        burst = [{"t": 0.0, "kind": k % len(KINDS), "label": k % 10, "seed": k, "adaptive": False}
                 for k in range(args.burst)]
        b = measured_run(urls["request"], shots_of(burst, KINDS, False)).summary()
        sat = b["throughput"]
        out["saturation"] = {"measured": sat, "simulated": sim_sat, "burst": args.burst, "curve": curve.to_dict()}
        if args.saturation:  # the loads from a given saturation (another run's burst): this run's is reported
            sat = out["saturation"]["given"] = args.saturation
        print(f"request-level saturation: measured {sat:.3f} req/s ({args.burst} at once), simulated {sim_sat:.3f}",
              flush=True)
        for li, load in enumerate(args.loads):
            shots = trace(load * sat, args.requests, len(KINDS), args.seed + li)
            for p, adaptive in CELLS:
                c = {"load": load, "rate": load * sat, "asked": p, "adaptive": adaptive,
                     **cell(urls[p], cat, shots, KINDS, adaptive)}
                out["cells"].append(c)
                m, e = c["measured"], c["error"]
                print(f"{load:4.0%} {p}{'+adaptive' if adaptive else ''} ({c['policy']}): attainment "
                      f"{m['slo_attainment']:.2f} (sim {c['simulated']['slo_attainment']:.2f}) p50 {m['p50']:.2f} "
                      f"p99 {m['p99']:.2f} 503 {m['rejected_503']} dFID {m['mean_dfid_served']} over "
                      f"{m['over_budget']} exact moved {m['exact_moved']} err {e}", flush=True)
                out["load_avg"].append(os.getloadavg())
                args.json.write_text(json.dumps(out, indent=1))
        # issue 21's line: 70% of the default workload's saturation, the model's own sampler against `fast`
        ratio = sat / sim_sat
        rate = 0.7 * saturation(default_cat, curve) * ratio
        shots = trace(rate, args.line_requests, len(DEFAULT_KINDS), args.seed + 50)
        out["line"] = {"rate": rate, "requests": args.line_requests,
                       "default": cell(urls["auto"], default_cat, shots, DEFAULT_KINDS, False),
                       "fast": cell(urls["auto"], fast_cat, shots, DEFAULT_KINDS, False, plan="fast")}
        for k in ("default", "fast"):
            m = out["line"][k]["measured"]
            print(f"70% line {k}: p50 {m['p50']:.2f} p99 {m['p99']:.2f}", flush=True)
    finally:
        stop_servers(procs.values(), 60)
    try:  # the simulator's third check: the curve fitted to the servers' own iterations (as `study.py` does)
        from benchmarks.serve_load.simulation import fit_trace
        recs = [json.loads(line) for p in policies for line in (work / f"{p}.trace.jsonl").read_text().splitlines()
                if line]
        gaps = [c["measured"]["outside_s"] for c in out["cells"] if c["measured"].get("outside_s") is not None]
        fitted, fit = fit_trace(recs, float(np.median(gaps)) if gaps else 0.0)
        out["fitted"] = {"curve": fitted.to_dict(), "fit": fit}
    except (OSError, ValueError, KeyError) as e:
        out["fitted"] = {"error": repr(e)}
    out["minutes"] = (time.time() - t_start) / 60
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json} ({out['minutes']:.1f} min; server logs in {work})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate")
    s.add_argument("--curve", default="cpu", help="cpu | gpu | a CostCurve JSON")
    s.add_argument("--loads", type=float, nargs="+", default=list(LOADS))
    s.add_argument("--policies", nargs="+", default=["request", "step", "fair", "auto"])
    s.add_argument("--adaptive", nargs="+", default=["auto"], help="policies also run with adaptive requests")
    s.add_argument("--requests", type=int, default=300)
    s.add_argument("--adapt", default="cheapest")
    s.add_argument("--headroom", type=float, default=1.0, help="SloModel.headroom (a study knob, not a flag)")
    s.add_argument("--json", type=Path, default=None)
    m = sub.add_parser("measure")
    m.add_argument("--loads", type=float, nargs="+", default=list(LOADS))
    m.add_argument("--requests", type=int, default=24, help="per cell")
    m.add_argument("--line-requests", type=int, default=20, help="per cell of issue 21's 70%% line")
    m.add_argument("--burst", type=int, default=16, help="requests sent at once for the saturation")
    m.add_argument("--json", type=Path, default=HERE / "levels.json")
    m.add_argument("--saturation", type=float, default=None, help="req/s to take the loads from (default: measured)")
    for p in (s, m):
        p.add_argument("--engines", type=Path, default=ENGINES)
        p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for the report
    {"simulate": cmd_simulate, "measure": cmd_measure}[args.cmd](args)


if __name__ == "__main__":
    main()
