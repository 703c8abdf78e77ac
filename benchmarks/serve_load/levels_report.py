"""The service-level study's report: the tables of `levels.py measure` (levels.json) and `levels.py simulate --curve
gpu` (levels_gpu.json), the simulator's error against the measurement, written between the README's markers.

    python benchmarks/serve_load/levels_report.py [--no-write]

The simulator is checked twice on the measured traces (regenerated from their seeds): on each server's start-up
curve, as `measure` ran it; on that curve calibrated by one number, k = simulated / measured request-level
saturation (the burst `measure` sends first, not any cell's result): every per-call and per-iteration cost x k;
and on the curve fitted to the servers' own iterations (`--trace`, all cells pooled, as `study.py` fits it); and,
where the servers calibrate their curve online (`cost_calibration` in /v1/info), as the server runs: the scheduler
believing the start-up curve and calibrating it (`simulate(..., calibrate=True)`), the machine the fitted curve.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from benchmarks.common.doc_blocks import update_block  # noqa: E402
from benchmarks.serve_load.levels import MAX_QUEUE, Catalog, budget_check, trace  # noqa: E402
from ddt_export.runtime.batching.costs import CostCurve  # noqa: E402
from ddt_export.runtime.batching.report import COMPARED, compare  # noqa: E402
from ddt_export.runtime.batching.scheduler import SloModel  # noqa: E402
from ddt_export.runtime.batching.simulate import simulate  # noqa: E402

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- levels begin -->", "<!-- levels end -->"
TARGET = 0.9  # SLO attainment at 150% load with adaptive plans, and no 503s
OLD_FAST = "euler 17 steps, dp:4, forecast 2, timeshift 1.5"  # `fast` of the runs before levels.json stored its label


def resimulate(out: dict, cat: Catalog) -> None:
    """Each cell simulated again on the calibrated curve (the auto server's start-up curve x k) and, where
    `measure` fitted one, on the curve fitted to the servers' own iterations."""
    sat = out["saturation"]
    out["k"] = sat["simulated"] / sat["measured"]
    startup = CostCurve.from_dict(sat["curve"])
    curves = {"calibrated": startup.scaled(out["k"])}
    if "curve" in out.get("fitted", {}):
        curves["fitted"] = CostCurve.from_dict(out["fitted"]["curve"])
    loads = sorted({c["load"] for c in out["cells"]})
    for c in out["cells"]:
        shots = trace(c["rate"], out["requests"], len(cat.plain), out.get("seed", 0) + loads.index(c["load"]))
        arr = cat.arrivals(shots, c["adaptive"])
        for name, curve in curves.items():
            res = simulate(arr, curve, cat.max_batch, c["policy"], max_queue=MAX_QUEUE, slo=SloModel(curve))
            c[name] = {**res.summary(), **budget_check(arr, res)}
            c[f"{name}_error"] = compare(c[name], c["measured"])
        if "fitted" in curves and c["measured"].get("calibration"):  # the server's own model: it believes its
            # start-up curve and calibrates it online (`calibrate.Calibration`), the machine runs the fitted one
            res = simulate(arr, curves["fitted"], cat.max_batch, c["policy"], max_queue=MAX_QUEUE,
                           slo=SloModel(startup), calibrate=True)
            c["server"] = {**res.summary(), **budget_check(arr, res)}
            c["server_error"] = compare(c["server"], c["measured"])


def f(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def cell_name(c: dict) -> str:
    return f"{c['asked']}{' + adaptive' if c['adaptive'] else ''}" + (f" ({c['policy']})" if c["asked"] == "auto"
                                                                        else "")


def command(out: dict) -> str:
    """The `measure` command line as stored (`argv`); a run from before it was stored: its --requests and
    --saturation."""
    if "argv" in out:
        return f"python benchmarks/serve_load/levels.py {shlex.join(out['argv'])}"
    given = f" --saturation {out['saturation']['given']:g}" if "given" in out["saturation"] else ""
    return f"python benchmarks/serve_load/levels.py measure --requests {out['requests']}{given}"


def engines(out: dict) -> str:
    """The engine folder, its precision and row budget as stored; a run from before they were stored: as its
    report said (the issue-23 runs' folder was a copy of the fast-sampling study's engines)."""
    if "precision" in out:
        return f"`{out['engines']}` ({out['precision']}, row budget {out['max_batch']})"
    return (f"`{out['engines']}`, a copy of `/work/wt-tune/engines/fast_sampling/digits-fp32` (fp32, row budget "
            "64)")


def section(out: dict, gpu: dict | None, fitted: dict | None = None) -> list[str]:
    sat = out["saturation"]
    plans = sorted(Path(out["engines"]).glob("plans/*.json"))
    sha = ", ".join(f"`{p.name}` {hashlib.sha256(p.read_bytes()).hexdigest()[:12]}" for p in plans
                    if p.name != "frontier.json")
    lines = [f"Service levels under load (issue 23), {out['date']} (`{command(out)}`, under "
             f"`flock /work/cpu-measure.lock`; {out['minutes']:.1f} min).", "",
             f"Engines: {engines(out)} with its stored plans (sha256 prefixes: {sha}); `fast` = "
             f"{out.get('fast_label', OLD_FAST)}, dFID {out['fast_dfid']:.4f} (the adaptive budget). One server per "
             "policy on 127.0.0.1, "
             "each measuring its own cost curve at start-up, started one after the other; "
             f"{out['requests']} Poisson arrivals per cell (the same trace for every cell of a load), drawn from "
             f"{len(out['kinds'])} kinds: {', '.join(json.dumps(k) for k in out['kinds'])}; random class and seed. "
             "In the adaptive cell half of the arrivals (the same ones at every policy) carry "
             "`\"quality\": \"adaptive\"`. "
             f"Request-level saturation: {sat['measured']:.2f} req/s measured ({sat['burst']} requests sent at "
             "once "
             f"to `--batching request`), {sat['simulated']:.2f} simulated on the start-up curve; " +
             (f"loads are fractions of {sat['given']:.2f} req/s (`--saturation`: an earlier run's burst, see the "
              "notes). " if "given" in sat else "loads are fractions of the measured one. ") +
             "Latency at the client; SLO = 3 x the predicted solo latency (the server's verdict).", "",
             "| load | policy | throughput /s | goodput /s | SLO attainment | p50 s | p99 s | 503 | mean dFID served | "
             "moved | dFID over budget | exact moved | sim attainment: start-up / calibrated / fitted curve / "
             "fitted, as the server | sim p99 s (fitted) | server's k |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in out["cells"]:
        m, s, k, t = c["measured"], c["simulated"], c.get("calibrated", {}), c.get("fitted", {})
        v, cal = c.get("server", {}), c["measured"].get("calibration") or {}
        lines.append(f"| {c['load']:.0%} | {cell_name(c)} | {f(m['throughput'])} | {f(m['goodput'])} | "
                     f"{f(m['slo_attainment'])} | {f(m['p50'])} | {f(m['p99'])} | {m['rejected_503']} | "
                     f"{f(m['mean_dfid_served'], '.4f')} | {m['degraded']} | {m['over_budget']} | {m['exact_moved']} | "
                     f"{f(s['slo_attainment'])} / {f(k.get('slo_attainment'))} / {f(t.get('slo_attainment'))} / "
                     f"{f(v.get('slo_attainment'))} | {f(t.get('p99'))} | {f(cal.get('k'))} |")
    lines += ["", verdict(out, fitted), "", errors(out), ""]
    if "line" in out:
        d, q = out["line"]["default"]["measured"], out["line"]["fast"]["measured"]
        lines.append(f"**Issue 21's serving line** (70% of the default workload's request-level saturation, "
                     f"{out['line']['rate']:.2f} req/s, {out['line']['requests']} requests of num 1-4, `--batching "
                     f"auto`): the model's own sampler (50 Euler steps) p50 {d['p50']:.2f} s, p99 {d['p99']:.2f} s; "
                     f"the same trace with `\"plan\": \"fast\"` p50 {q['p50']:.2f} s, p99 {q['p99']:.2f} s "
                     f"({d['p50'] / q['p50']:.1f}x and {d['p99'] / q['p99']:.1f}x lower).")
        lines.append("")
    for sim, what in ((fitted, "the curve fitted to this run's servers (the check above), at fractions of its own "
                       "simulated request-level saturation"), (gpu, "the GPU-like curve")):
        if not sim:
            continue
        lines += [f"The simulator on {what} ({sim['curve']['note']}; the same kinds and plans, {sim['requests']} "
                  f"arrivals per cell; request-level saturation {sim['saturation']:.2f} req/s; auto chose "
                  f"`{sim['auto']}`):", "",
                  "| load | policy | throughput /s | goodput /s | SLO attainment | p50 ms | p99 ms | 503 | mean dFID "
                  "served | moved |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in sim["cells"]:
            s = c["simulated"]
            lines.append(f"| {c['load']:.0%} | {cell_name(c)} | {f(s['throughput'])} | {f(s['goodput'])} | "
                         f"{f(s['slo_attainment'])} | {f(1e3 * s['p50'], '.0f')} | {f(1e3 * s['p99'], '.0f')} | "
                         f"{s['rejected_503']} | {f(s['mean_dfid_served'], '.4f')} | {s['degraded']} |")
        lines.append("")
    return lines


def verdict(out: dict, fitted: dict | None = None) -> str:
    top = max(c["load"] for c in out["cells"])
    by = {(c["asked"], c["adaptive"]): c["measured"] for c in out["cells"] if c["load"] == top}
    a, plain = by.get(("auto", True)), by.get(("auto", False))
    if a is None:
        return ""
    ok = a["slo_attainment"] >= TARGET and a["rejected_503"] == 0
    best = max((m["slo_attainment"], p) for (p, ad), m in by.items() if not ad)
    rate = next(c["rate"] for c in out["cells"] if c["load"] == top)
    true = (f"; {rate / fitted['saturation']:.0%} of the request-level saturation the curve fitted to the servers' "
            f"iterations gives, {fitted['saturation']:.2f} req/s") if fitted else ""
    return (f"**At {top:.0%} load ({rate:.2f} req/s offered{true}), SLO attainment with adaptive plans "
            f"{a['slo_attainment']:.2f} with {a['rejected_503']} 503s (target >= {TARGET} and none: "
            f"{'met' if ok else 'NOT met'} at this load)**, against "
            f"{plain['slo_attainment']:.2f} for `auto` without them (best plain policy: `{best[1]}` "
            f"{best[0]:.2f}); dFID served {f(a['mean_dfid_served'], '.4f')} on average, {a['over_budget']} "
            f"answers over their budget, {a['exact_moved']} requests that allowed no trade moved.")


def errors(out: dict) -> str:
    parts = []
    for key, name in (("error", "start-up curve"), ("calibrated_error", "calibrated curve"),
                      ("fitted_error", "curve fitted to the servers' iterations"),
                      ("server_error", "fitted curve with the server's belief (start-up curve, calibrated online)")):
        if not all(key in c for c in out["cells"]):
            continue
        worst = {m: max((c[key][m] for c in out["cells"] if c[key].get(m) is not None), default=None)
                 for m in COMPARED}
        mid = {m: sorted(c[key][m] for c in out["cells"] if c[key].get(m) is not None) for m in COMPARED}
        parts.append(f"{name}: " + ", ".join(f"{m} median {f(100 * v[len(v) // 2], '.0f')}% / worst "
                                             f"{f(100 * worst[m], '.0f')}%" for m, v in mid.items() if v))
    k = out.get("k")
    return ("**Simulator error against the measurement** (|sim - measured| / measured over the cells; target "
            f"within 25%): {'; '.join(parts)}." + (f" (Calibration k = {k:.2f}.)" if k else ""))


def write_section(lines: list[str], readme: Path, begin: str = BEGIN, end: str = END) -> None:
    """The block between the markers replaced (`update_block`); a run's first block appended under a heading."""
    body = "\n".join(lines)
    if not update_block(readme, body, begin, end):
        text = readme.read_text().rstrip("\n")
        readme.write_text(f"{text}\n\n## Service levels under load (issue 23)\n\n{begin}\n{body}\n{end}\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=HERE / "levels.json")
    ap.add_argument("--gpu", type=Path, default=HERE / "levels_gpu.json")
    ap.add_argument("--fitted-sim", type=Path, default=HERE / "levels_fitted_sim.json",
                    help="`levels.py simulate --curve` on the fitted curve of levels.json (`fitted.curve`)")
    ap.add_argument("--readme", type=Path, default=HERE / "README.md")
    ap.add_argument("--no-write", action="store_true",
                    help="print the section only: neither the re-simulated cells (--json) nor the README")
    ap.add_argument("--markers", default="levels", help="the README block: <!-- NAME begin/end -->")
    args = ap.parse_args(argv)
    out = json.loads(args.json.read_text())
    resimulate(out, Catalog(Path(out["engines"]), tuple(out["kinds"])))
    if not args.no_write:
        args.json.write_text(json.dumps(out, indent=1))
    gpu = json.loads(args.gpu.read_text()) if args.gpu.exists() else None
    fitted = json.loads(args.fitted_sim.read_text()) if args.fitted_sim.exists() else None
    lines = section(out, gpu, fitted)
    print("\n".join(lines))
    if not args.no_write:
        name = args.markers
        write_section(lines, args.readme, f"<!-- {name} begin -->", f"<!-- {name} end -->")


if __name__ == "__main__":
    main()
