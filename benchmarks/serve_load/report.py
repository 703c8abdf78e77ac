"""The serve load study's outputs: the latency-vs-load plot and the dated result in this folder's README.md.

    python benchmarks/serve_load/report.py benchmarks/serve_load/serve_load.json [--write]

Used by `serve_load.py measure`; run alone it redoes the plot (beside the JSON) and prints the targets' checks
from a measure JSON, and with --write the README's result section too. Imports none of the study's files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]  # run as a script: this checkout's benchmarks.common

from benchmarks.common.doc_blocks import update_block  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"

POL = ("step", "fair", "request", "single")
COLORS = {"step": "tab:blue", "fair": "tab:green", "request": "tab:orange", "single": "tab:gray"}
TARGET = 0.7  # step p99 slowdown (and GPU-like p99 latency) <= 0.7 x request-level's at ~70% load
AGREE = 0.25  # simulator within 25% of measured p50/p99


def _runs(out, policy):
    return sorted((r for r in out["runs"] if r["policy"] == policy), key=lambda r: r["load"])


def plot(out: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    for p in POL:
        runs = _runs(out, p)
        if not runs:
            continue
        x = [100 * r["load"] for r in runs]
        for q, style in (("p50", "-"), ("p99", "--")):
            ax[0].plot(x, [r["measured"][q] for r in runs], style, marker="o", color=COLORS[p], label=f"{p} {q}")
            ax[0].plot(x, [r["simulated"][q] for r in runs], style, marker="x", color=COLORS[p], alpha=0.45)
        ax[1].plot(x, [r["measured"]["slowdown_p99"] for r in runs], "-o", color=COLORS[p], label=f"{p} measured")
        ax[1].plot(x, [r["simulated"]["slowdown_p99"] for r in runs], ":x", color=COLORS[p], alpha=0.6,
                   label=f"{p} simulated")
    ax[0].set(title=f"{out['model']} on this CPU: latency (o measured, x simulated)", xlabel="load, % of "
              "request-level saturation", ylabel="seconds", yscale="log")
    ax[1].set(title="p99 slowdown (latency / solo latency)", xlabel="load, % of request-level saturation",
              yscale="log")
    g = out.get("gpu")
    if g:
        for p in POL:
            rows = sorted((r for r in g["rows"] if r["policy"] == p), key=lambda r: r["load"])
            x = [100 * r["load"] for r in rows]
            ax[2].plot(x, [1e3 * r["p50"] for r in rows], "-o", color=COLORS[p], label=f"{p} p50")
            ax[2].plot(x, [1e3 * r["p99"] for r in rows], "--o", color=COLORS[p], label=f"{p} p99")
        ax[2].set(title="DDT-XL/2 256, GPU-like curve (simulated)", xlabel="load, % of request-level saturation",
                  ylabel="ms", yscale="log")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _near(runs, load):
    return min(runs, key=lambda r: abs(r["load"] - load)) if runs else None


def checks(out: dict) -> dict:
    """The issue's targets, from the JSON: the 70% slowdown ratio, the simulator's agreement, the GPU ratio."""
    step, req = _near(_runs(out, "step"), 0.7), _near(_runs(out, "request"), 0.7)
    fair = _near(_runs(out, "fair"), 0.7)
    res = {}
    if step and req:
        res["cpu_slowdown_ratio"] = step["measured"]["slowdown_p99"] / req["measured"]["slowdown_p99"]
        res["cpu_p50_ratio"] = step["measured"]["p50"] / req["measured"]["p50"]
        res["cpu_load"] = step["load"]
        if fair:
            res["cpu_fair_slowdown_ratio"] = fair["measured"]["slowdown_p99"] / req["measured"]["slowdown_p99"]
            res["cpu_fair_p50_ratio"] = fair["measured"]["p50"] / req["measured"]["p50"]
            res["sim_fair_slowdown_ratio"] = fair["simulated"]["slowdown_p99"] / req["simulated"]["slowdown_p99"]
        res["sim_slowdown_ratio"] = step["simulated"]["slowdown_p99"] / req["simulated"]["slowdown_p99"]
    errs = {}
    for p in ("step", "fair", "request"):
        for r in _runs(out, p):
            for q in ("p50", "p99"):
                errs[(p, r["load"], q)] = abs(r["simulated"][q] - r["measured"][q]) / r["measured"][q]
    res["sim_errors"] = errs
    res["sim_errors_70"] = {k: v for k, v in errs.items() if step and k[1] == step["load"]}
    g = out.get("gpu")
    if g:
        key = min(g["ratios"], key=lambda k: abs(float(k.rstrip("%")) / 100 - 0.7))
        res["gpu_ratio_70"] = g["ratios"][key]
        res["gpu_key"] = key
    return res


def write_section(out: dict, readme: Path = README) -> None:
    """The dated result of a measure JSON, between the result markers of `readme`."""
    c, ck = out["curve"], checks(out)
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    lines = [f"Step-level vs request-level batching, {out['date']} (`python benchmarks/serve_load/serve_load.py "
             "measure`).\n",
             f"{out['model']} engines ({out['engines']}), onnxruntime CPU, row budget {out['budget']} (batch.max); "
             f"{out['machine']['cores']} cores shared with other engineers' jobs, so every number is noisy "
             f"(ratios are from one run, side by side). Four servers on 127.0.0.1 (`--batching step`, `fair`, "
             f"`request --max-delay-ms {out['max_delay_ms']:g}`, `single`), each load the same Poisson trace to each, "
             f"{out['duration_s']:.0f} s of arrivals (longer where needed for {out.get('min_requests', 50)} requests, "
             f"{out.get('focus_requests', 150)} at {out.get('focus_load', 0.7):.0%}); requests "
             f"from a {len(out['kinds'])}-kind catalog (num 1-4, "
             f"steps 10-100, all / uniform:2 / uniform:4 / dp:K, cfg 1.0-2.0), random class and seed; latency "
             f"measured at the client. {out['minutes']:.0f} min in all. Raw: `serve_load.json`; plot "
             f"`serve_load.png`.\n",
             "Cost curves of this run, ms per call: the tight loop (one graph called over and over in one process) and"
             " the servers' own iterations (`serve --trace`, all loads pooled, fitted linear in rows):\n",
             "| rows | encoder, tight loop | per row | decoder, tight loop | per row | encoder, servers | decoder, "
             "servers |", "| --- | --- | --- | --- | --- | --- | --- |"]
    t = out["tight_curve"]
    for (r, e), (_, d), (_, se), (_, sd) in zip(t["encoder"], t["decoder"], c["encoder"], c["decoder"]):
        lines.append(f"| {r} | {ms(e)} | {ms(e / r)} | {ms(d)} | {ms(d / r)} | {ms(se)} | {ms(sd)} |")
    f = out["fit"]
    sat = out["saturation"]
    meas = next((v for v in sat.values() if "throughput" in v), {"clients": 0, "duration_s": 0})
    lines += ["", f"Servers' fit over {f['iterations']} iterations (R^2 {f['r2']:.2f}): encoder "
              f"{f['encoder_ms'][0]:.1f} ms + {f['encoder_ms'][1]:.2f} ms/row, decoder {f['decoder_ms'][0]:.1f} ms + "
              f"{f['decoder_ms'][1]:.2f} ms/row, {f['request_ms']:.2f} ms per request per iteration, "
              f"{f['gap_ms']:.2f} ms between iterations; "
              f"{1e3 * f['request_s']:.0f} ms per request outside the loop (client latency less the server's own: "
              f"HTTP, JSON, PNGs). The simulator uses the fit of each load's own iterations (the machine's load "
              f"drifts).", "",
              f"Saturation ({meas['clients']} closed-loop clients, {meas['duration_s']:.0f} s after a warm-up; "
              "simulated on the pooled fit): " + ", ".join(
                  f"{p} " + (f"{s['throughput']:.2f} req/s measured, " if "throughput" in s else "")
                  + f"{s['simulated']:.2f} simulated" for p, s in sat.items())
              + ". Loads are fractions of `request`'s measured saturation. Solo latencies: "
              + ", ".join(f"{x:.2f}" for x in out["solo_s"]) + " s.", "",
              "| load | rate /s | policy | throughput /s | p50 s | p95 s | p99 s | p99 slowdown | req/iter | enc rows"
              "/iter | dec rows/iter | sim p50 s | sim p99 s | sim p99 slowdown |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(out["runs"], key=lambda r: (r["load"], POL.index(r["policy"]))):
        m, s = r["measured"], r["simulated"]
        lines.append(f"| {r['load']:.0%} | {r['rate']:.2f} | {r['policy']} | {m['throughput']:.2f} | {m['p50']:.2f} "
                     f"| {m['p95']:.2f} | {m['p99']:.2f} | {m['slowdown_p99']:.1f} | {m['requests']:.2f} | "
                     f"{m['encoder_rows']:.1f} | {m['decoder_rows']:.1f} | {s['p50']:.2f} | {s['p99']:.2f} | "
                     f"{s['slowdown_p99']:.1f} |")
    if "cpu_slowdown_ratio" in ck:
        ok = ck["cpu_slowdown_ratio"] <= TARGET
        lines += ["", f"**At {ck['cpu_load']:.0%} load, step-level p99 slowdown = {ck['cpu_slowdown_ratio']:.2f}x "
                  f"request-level's** (target <= {TARGET}x: {'met' if ok else 'NOT met'}; the simulator on the same "
                  f"trace: {ck['sim_slowdown_ratio']:.2f}x), p50 latency {ck['cpu_p50_ratio']:.2f}x."]
        if "cpu_fair_slowdown_ratio" in ck:
            ok = ck["cpu_fair_slowdown_ratio"] <= TARGET
            lines.append("**`--batching fair` (step-level, row-fair): p99 slowdown "
                         f"{ck['cpu_fair_slowdown_ratio']:.2f}x request-level's** ({'met' if ok else 'NOT met'}; "
                         f"simulated {ck['sim_fair_slowdown_ratio']:.2f}x), p50 latency "
                         f"{ck['cpu_fair_p50_ratio']:.2f}x.")
    e70 = ck["sim_errors_70"]
    if e70:
        worst = max(e70.values())
        lines.append("Simulator vs measured at that load: " + ", ".join(
            f"{p} {q} {v:.0%}" for (p, _, q), v in sorted(e70.items())) +
            f" (target within {AGREE:.0%}: {'met' if worst <= AGREE else 'NOT met'}); over all loads the worst is "
            f"{max(ck['sim_errors'].values()):.0%}.")
    g = out.get("gpu")
    if g:
        lines += ["", f"GPU-like curve (simulated, DDT-XL/2 256, the same catalog; no GPU measured yet): "
                  f"{g['curve']['note']}; VAE 0.31 TFLOP per image; dp:K as K evenly spaced steps. Saturation "
                  + ", ".join(f"{p} {v:.2f} req/s" for p, v in g["saturation"].items()) + ".", "",
                  "| load | policy | p50 ms | p99 ms | p99 slowdown |", "| --- | --- | --- | --- | --- |"]
        for r in g["rows"]:
            lines.append(f"| {r['load']:.0%} | {r['policy']} | {1e3 * r['p50']:.0f} | {1e3 * r['p99']:.0f} | "
                         f"{r['slowdown_p99']:.1f} |")
        gr = ck["gpu_ratio_70"]
        lines += ["", f"**GPU-like, {ck['gpu_key']} load: step / request p99 latency {gr['p99']:.2f}x, p50 "
                  f"{gr['p50']:.2f}x, p99 slowdown {gr['slowdown_p99']:.2f}x** (target p99 latency <= {TARGET}x: "
                  f"{'met' if gr['p99'] <= TARGET else 'NOT met'}); fair / request: p99 latency "
                  f"{gr['fair_p99']:.2f}x, p50 {gr['fair_p50']:.2f}x, p99 slowdown {gr['fair_slowdown_p99']:.2f}x."]
        if g.get("sensitivity"):
            lines += ["", "Sensitivity of the GPU-like ratios at 70% load to the assumption (utilization half of its "
                      "best at `half_rows` rows; per-call overhead):", "",
                      "| half_rows | ms/call | request sat. /s | step sat. /s | p50 step/request | p99 step/request | "
                      "p99 slowdown step/request |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in g["sensitivity"]:
                lines.append(f"| {r['half_rows']} | {r['call_ms']:.2f} | {r['saturation']['request']:.2f} | "
                             f"{r['saturation']['step']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                             f"{r['slowdown_p99']:.2f} |")
    update_block(readme, "\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="the plot and the targets' checks of a `serve_load.py measure` JSON")
    ap.add_argument("json", type=Path)
    ap.add_argument("--write", action="store_true", help="also write the result section of README.md")
    a = ap.parse_args(argv)
    data = json.loads(a.json.read_text())
    plot(data, a.json.with_suffix(".png"))
    print("\n".join(f"{k}: {v}" for k, v in checks(data).items()))
    if a.write:
        write_section(data)


if __name__ == "__main__":
    main()
