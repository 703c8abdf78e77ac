"""Load generator and simulator for `ddt-export serve`: step-level vs request-level batching vs one at a time.

    python benchmarks/serve_load/serve_load.py load --url http://127.0.0.1:8000 --rate 1.0 --duration 60
    python benchmarks/serve_load/serve_load.py measure [--engines engines/default] [--duration 90] [--loads .3 .5 .7 .9]
    python benchmarks/serve_load/serve_load.py simulate [--curve gpu | CURVE.json] [--loads .5 .6 .7 .8 .9]

`load`: open-loop Poisson arrivals at --rate for --duration seconds against a running server (127.0.0.1 only),
mixed requests drawn from a catalog (classes 0-9, num 1-4, steps 10-100, schedules all / uniform:R / dp:K,
cfg 1.0-2.0); prints throughput, p50/p95/p99 latency.

`measure`, the study in one run (`study.py`): the per-call cost curve of the engines (rows -> seconds, encoder
and decoder) and the host overheads, measured in this process; one server per policy (`--batching step`, `fair`,
`request`, `single`) on 127.0.0.1 with bounded lifetimes; each catalog request's solo latency; saturation
throughput (a closed loop of clients); then at each load (fraction of request-level saturation) the same Poisson
trace sent to each server in turn: throughput, p50/p95/p99 latency, p99 slowdown (latency / the same request's
solo latency), mean requests and rows per iteration (from /metrics). The simulator (`simulation.py`) then runs
the same traces on the cost curve fitted to the servers' iterations (does it predict the measured p50/p99?), and
a GPU-like curve (stated assumptions, `runtime.batching.simulate.gpu_like_curve`) for DDT-XL/2 256. Writes
serve_load.json, serve_load.png and the dated result section of README.md in this folder (`report.py`).

`simulate`: the simulator alone, on the GPU-like curve or a curve JSON (as `measure` writes).

The study's files import one another in one direction: serve_load (this CLI) -> study -> report, simulation
-> workload; serve_refit -> simulation -> workload.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]  # run as a script: this checkout's ddt_export and benchmarks.common

from benchmarks.serve_load.simulation import gpu_study, load_curve  # noqa: E402
from benchmarks.serve_load.workload import LOOPBACK, POLICIES, catalog, open_loop, poisson_trace  # noqa: E402

HERE = Path(__file__).resolve().parent


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
    from benchmarks.serve_load.study import measure  # the servers, the engines: only for `measure`

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
    p.add_argument("--engines", type=Path, default=ROOT / "engines" / "default")
    p.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals per (load, policy)")
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--min-requests", type=int, default=50, help="a load runs longer than --duration if needed")
    p.add_argument("--focus-load", type=float, default=0.7, help="the load the targets are checked at ...")
    p.add_argument("--focus-requests", type=int, default=150, help="... and how many requests it gets at least")
    p.add_argument("--saturation-s", type=float, default=90.0)
    p.add_argument("--saturation-warmup-s", type=float, default=30.0, help="closed-loop start left out")
    p.add_argument("--saturation-policies", nargs="+", default=list(POLICIES), choices=POLICIES,
                   help="the policies whose saturation is measured (the loads are fractions of request's; every "
                   "policy's is simulated)")
    p.add_argument("--solo-repeats", type=int, default=3)
    p.add_argument("--max-delay-ms", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-loads", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--gpu-requests", type=int, default=4000)
    p.add_argument("--json", type=Path, default=HERE / "serve_load.json")
    p.add_argument("--plot", type=Path, default=HERE / "serve_load.png")
    p.add_argument("--readme", type=Path, default=HERE / "README.md", help="where the dated result section goes")
    p.add_argument("--no-write", action="store_true", help="JSON and plot only: leave the README alone")
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
    args.fn(args)


if __name__ == "__main__":
    main()
