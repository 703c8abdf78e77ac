"""The simulator on each server's own cost curve: refit a `serve_load.py measure` run from its servers' traces.

    python benchmarks/serve_load/serve_refit.py benchmarks/serve_load/serve_load.json /tmp/serve-load-XXXX [--update]

`measure` fits one cost curve per load to all four servers' iterations at that load. The servers run one after
another, minutes apart, on a shared machine whose load drifts, so that curve can be wrong for any one of them.
Here each (policy, load) gets the curve fitted to its own server's iterations during that run (the trace of a
server splits into runs at idle gaps over a minute: the other servers' turns), and the simulator replays the
same Poisson trace on it. It prints measured against both simulations; `--update` stores `simulated_own` and
`fit_own` in each run of the JSON. The trace folder is the `serve-load-*` one that `measure` made in the temp
folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]  # run as a script: this checkout's ddt_export and benchmarks.common

from benchmarks.serve_load.simulation import fit_trace, sim_stats  # noqa: E402
from benchmarks.serve_load.workload import arrivals, poisson_trace, resolve_catalog  # noqa: E402
from ddt_export.runtime.batching.simulate import simulate  # noqa: E402

GAP_S = 60.0  # an idle gap this long inside one server's trace: another server's turn


def runs_of(path: Path, n: int) -> list[list[dict]]:
    """The last n runs of one server's trace (earlier ones: solo latencies, saturation)."""
    recs = sorted((json.loads(line) for line in path.read_text().splitlines() if line), key=lambda r: r["start"])
    out, cur = [], []
    for r in recs:
        if cur and r["start"] - cur[-1]["end"] > GAP_S:
            out.append(cur)
            cur = []
        cur.append(r)
    out.append(cur)
    if len(out) < n:
        raise SystemExit(f"{path}: expected at least {n} runs separated by {GAP_S:.0f} s idle, got {len(out)}")
    return out[-n:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("traces", type=Path, help="the serve-load-* folder of that run")
    ap.add_argument("--update", action="store_true", help="store simulated_own / fit_own in the JSON")
    a = ap.parse_args(argv)
    out = json.loads(a.json.read_text())
    from ddt_export.runtime import load_engines

    with load_engines(out["engines"]) as engines:
        specs = resolve_catalog(engines, out["kinds"])
    loads = sorted({r["load"] for r in out["runs"]})
    policies = list(dict.fromkeys(r["policy"] for r in out["runs"]))
    per = {p: dict(zip(loads, runs_of(a.traces / f"trace-{p}.jsonl", len(loads)))) for p in policies}
    seed, delay = out.get("seed", 0), out["max_delay_ms"] / 1e3
    print("| load | policy | measured p50 / p99 s | simulated, the load's curve | error | simulated, own curve "
          "| error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in sorted(out["runs"], key=lambda r: (r["load"], policies.index(r["policy"]))):
        i, m = loads.index(run["load"]), run["measured"]
        trace = poisson_trace(run["rate"], m["duration_s"], len(specs), seed + 1 + i)
        arr = arrivals(trace, specs)
        curve, fit = fit_trace(per[run["policy"]][run["load"]], run["fit"]["request_s"])
        sim = sim_stats(arr, simulate(arr, curve, out["budget"], run["policy"], delay, 512), out["solo_s"])
        run.update(simulated_own={k: sim[k] for k in ("p50", "p95", "p99", "slowdown_p99")}, fit_own=fit)
        s0 = run["simulated"]
        err = [abs(s[q] - m[q]) / m[q] for s in (s0, sim) for q in ("p50", "p99")]
        print(f"| {run['load']:.0%} | {run['policy']} | {m['p50']:.2f} / {m['p99']:.2f} | {s0['p50']:.2f} / "
              f"{s0['p99']:.2f} | {err[0]:.0%} / {err[1]:.0%} | {sim['p50']:.2f} / {sim['p99']:.2f} | "
              f"{err[2]:.0%} / {err[3]:.0%} |")
    if a.update:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
