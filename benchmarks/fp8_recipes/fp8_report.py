"""Tables and the Pareto plot of `fp8_sensitivity.py`'s results (its `report` step).

    python benchmarks/fp8_recipes/fp8_sensitivity.py report   # prints the tables, writes docs/img/fp8-pareto.png

The tables also replace the blocks between `<!-- fp8 TABLE begin -->` and `<!-- fp8 TABLE end -->` in docs/fp8.md.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.common.doc_blocks import update_block

ROOT = Path(__file__).resolve().parents[2]
PLOT = ROOT / "docs" / "img" / "fp8-pareto.png"
DOC = ROOT / "docs" / "fp8.md"


def _rule(r: dict | None) -> str:
    if r is None:
        return "none (the fp16 export)"
    if "quantize" not in r:  # a study-only variant recorded by its description (per-phase scales)
        return r.get("description", r["name"])
    text = ", ".join(f"`{x}`" for x in r["quantize"])
    if r.get("exclude"):
        text += " minus " + ", ".join(f"`{x}`" for x in r["exclude"])
    extra = [x for x in (r.get("calibration") != "max" and r.get("calibration"),
                         r.get("calibration_rows") not in (None, "all") and f"{r['calibration_rows']} rows") if x]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _share(row: dict, key: str = "model") -> str:
    s = row.get("shares", {}).get(key)
    return "0%" if s is None else f"{s['of_block_gemm_flops']:.0%}"


def _speed(row: dict, key: str = "model") -> str:
    s = row.get("shares", {}).get(key)
    return "1.00x" if s is None else f"{s['predicted_speedup']:.2f}x"


def deviation_table(rows: dict, fid1: dict, model: str = "digits") -> str:
    head = (f"| recipe | FP8 GEMMs | share of block GEMM FLOPs ({model} / XL-256) | predicted speed-up ({model} / "
            "XL-256) | encoder / decoder rel. L2 vs fp32 (calibration rows) | final-latent deviation mean / max "
            "| dFID seed 0 [95%] |")
    lines = [head, "|" + " --- |" * 7]
    for name, r in rows.items():
        g = r.get("graph_rel_l2")
        f = fid1.get(name)
        lines.append(f"| {name} | {_rule(r['recipe'])} | {_share(r)} / {_share(r, 'xl256')} | {_speed(r)} / "
                     f"{_speed(r, 'xl256')} | " + (f"{g['encoder']:.1e} / {g['decoder']:.1e}" if g else "-")
                     + f" | {r['mean']:.2e} / {r['max']:.2e} | "
                     + (f"{f['delta'][0]:+.3f} [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}]" if f else "-") + " |")
    return "\n".join(lines)


def fid_table(rows: dict) -> str:
    lines = ["| recipe | FP8 GEMMs | share of block GEMM FLOPs | predicted speed-up (digits / XL-256) | FID fp32 "
             "(3 seeds) | FID FP8 | dFID per seed | mean dFID | mean abs dFID | paired 95% interval of the mean | "
             "dFID of the 3 seeds pooled | change of the features' covariance trace per seed | deviation | bar |",
             "|" + " --- |" * 14]
    for name, r in rows.items():
        lines.append(f"| {name} | {_rule(r['recipe'])} | {_share(r)} | {_speed(r)} / {_speed(r, 'xl256')} | "
                     + ", ".join(f"{v:.3f}" for v in r["fid_fp32"]) + " | " + ", ".join(f"{v:.3f}" for v in r["fid"])
                     + " | " + ", ".join(f"{v:+.3f}" for v in r["delta"]) + f" | {r['mean_delta']:+.3f} | "
                     f"{r['mean_abs_delta']:.3f} | [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | "
                     + (f"{r['pooled_delta']:+.3f}" if "pooled_delta" in r else "-") + " | "
                     + _trace(r) + f" | {r['deviation']:.2e} | "
                     + ("met" if r["meets_bar"] else "missed") + " |")
    return "\n".join(lines)


def bias_table(rows: dict) -> str:
    lines = ["| recipe | share of the GEMM error's mean square that is its per-channel mean (encoder / decoder) | "
             "final-latent deviation before / after | dFID per seed before | dFID per seed after |",
             "|" + " --- |" * 5]
    for name, r in rows.items():
        rec = r["records"]
        lines.append(f"| {name} | {rec['encoder']['mean_share_of_error_before']:.0%} / "
                     f"{rec['decoder']['mean_share_of_error_before']:.0%} (after: "
                     f"{max(rec[g]['mean_share_of_error_after'] for g in rec):.0e}) | "
                     f"{r['deviation_before'][0]:.2e} / {r['deviation_after'][0]:.2e} | "
                     + ", ".join(f"{v:+.3f}" for v in r["delta_before"]) + " | "
                     + ", ".join(f"{v:+.3f}" for v in r["delta_after"]) + " |")
    return "\n".join(lines)


def _trace(r: dict) -> str:
    return ", ".join(f"{v:+.2f}" for v in r["trace_change"]) if "trace_change" in r else "-"


def screen_table(rows: dict) -> str:
    lines = ["| recipe | FP8 GEMMs | share of block GEMM FLOPs | predicted speed-up (digits / XL-256) | FID fp32 | "
             "FID FP8 | dFID [paired 95%] | change of the features' covariance trace | deviation |",
             "|" + " --- |" * 9]
    for name, r in rows.items():
        lines.append(f"| {name} | {_rule(r['recipe'])} | {_share(r)} | {_speed(r)} / {_speed(r, 'xl256')} | "
                     f"{r['fid_fp32'][0]:.3f} | {r['fid'][0]:.3f} | {r['delta'][0]:+.3f} "
                     f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {_trace(r)} | {r['deviation']:.2e} |")
    return "\n".join(lines)


def pareto_plot(res: dict, path: Path | None = None) -> Path:
    """dFID against predicted speed-up: 3-seed means with their paired 95% intervals, single-seed screens
    hollow; the +-0.05 band is the bar. Written to `path`, default PLOT."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path or PLOT)

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.axhspan(-0.05, 0.05, color="0.9", label="bar: |dFID| <= 0.05")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.plot([1.0], [0.0], "s", color="0.3", label="fp16 (no FP8)")
    three = res.get("fid", {})
    for name, r in res.get("fid-seed0", {}).items():
        if name in three:
            continue
        x = r["shares"]["model"]["predicted_speedup"]
        ax.errorbar([x], [r["delta"][0]], yerr=[[r["delta"][0] - r["ci95"][0]], [r["ci95"][1] - r["delta"][0]]],
                    fmt="o", mfc="none", color="tab:blue", capsize=3, alpha=0.8)
        ax.annotate(name.removeprefix("only-"), (x, r["delta"][0]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7, color="tab:blue")
    for name, r in three.items():
        x = r["shares"]["model"]["predicted_speedup"]
        m = r["mean_delta"]
        ax.errorbar([x], [m], yerr=[[m - r["ci95"][0]], [r["ci95"][1] - m]], fmt="o",
                    color="tab:green" if r["meets_bar"] else "tab:red", capsize=4)
        ax.annotate(name, (x, m), textcoords="offset points", xytext=(5, -10), fontsize=8, weight="bold")
    for key in (k for k in res if k.startswith("fid-n")):
        for name, r in res[key].items():
            x, m = r["shares"]["model"]["predicted_speedup"], r["mean_delta"]
            ax.errorbar([x], [m], yerr=[[m - r["ci95"][0]], [r["ci95"][1] - m]], fmt="D", ms=7,
                        color="tab:green" if r["meets_bar"] else "tab:red", capsize=5)
            ax.annotate(f"{name} ({key.removeprefix('fid-n')}/seed)", (x, m), textcoords="offset points",
                        xytext=(6, 6), fontsize=8, weight="bold")
    ax.plot([], [], "o", mfc="none", color="tab:blue", label="1 seed, 500 samples (screen)")
    ax.plot([], [], "D", color="0.4", label="3 seeds, 2000 samples each")
    ax.plot([], [], "o", color="tab:green", label="3 seeds, 500 each: bar met (green) / missed (red)")
    ax.set_xlabel("predicted step speed-up (FP8 share of a step's FLOPs, FP8 = 2x fp16)")
    ax.set_ylabel("dFID vs fp32 (digits; 3-seed mean and its paired 95% interval)")
    ax.set_title("FP8 recipes: quality vs predicted speed-up (ONNX Runtime CPU emulation of Q/DQ)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _ordered(rows: dict) -> dict:
    """fp16 first, then by FP8 share of the block GEMM FLOPs, largest first."""
    key = lambda kv: (kv[0] != "fp16", -kv[1].get("shares", {}).get("model", {}).get("of_block_gemm_flops", 0))  # noqa: E731
    return dict(sorted(rows.items(), key=key))


def report(res: dict) -> int:
    fid1 = res.get("fid-seed0", {})
    tables = {}
    for title, key in (("Sensitivity (digits)", "deviation"), ("Calibration choices (digits)", "calibration"),
                       ("XL-shaped model (ddt-xl-cpu, random weights)", "xl")):
        if key in res:
            tables[key] = (deviation_table(_ordered(res[key]), fid1) if key != "xl"
                           else deviation_table(_ordered(res[key]), {}, "ddt-xl-cpu"))
            print(f"\n### {title}\n\n{tables[key]}")
    if fid1:
        tables["screen"] = screen_table(_ordered(fid1))
        print(f"\n### FID screen, seed 0\n\n{tables['screen']}")
    if "fid" in res:
        tables["fid"] = fid_table(_ordered(res["fid"]))
        print(f"\n### FID, 3 seeds\n\n{tables['fid']}")
    for key in sorted(k for k in res if k.startswith("fid-n")):  # the same, more samples per seed
        tables[key.removeprefix("fid-")] = fid_table(_ordered(res[key]))
        print(f"\n### FID, 3 seeds, {key.removeprefix('fid-n')} samples each\n\n{tables[key.removeprefix('fid-')]}")
    if "bias_correction" in res:
        tables["bias"] = bias_table(res["bias_correction"])
        print(f"\n### Bias correction\n\n{tables['bias']}")
    if fid1 or "fid" in res:
        print(f"\nwrote {pareto_plot(res)}")
    for name, table in tables.items():
        update_block(DOC, table, f"<!-- fp8 {name} begin -->", f"<!-- fp8 {name} end -->")
    return 0
