"""The fast-sampling study's tables (README.md, between its markers) and plot, from results.json."""
from __future__ import annotations

import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
PLOT = HERE.parents[1] / "docs" / "img" / "fast-sampling-frontier.png"


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """`text` with what lies between the markers replaced by `body` (unchanged without them)."""
    if begin not in text:
        return text
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def _s(v, fmt="+.3f"):
    return "-" if v is None else format(v, fmt)


def tune_table(res: dict) -> str:
    t = res["tune"]["digits"]
    ref = t["confirmed"][0]
    lines = ["| plan | solver | steps | schedule | forecast | shift | interval | encoder calls | GFLOP / image | "
             "speed-up | trajectory error | dFID | d precision | d recall | |", "|" + " --- |" * 15]
    for c in t["confirmed"]:
        study = res.get("choice", {}).get("fast", {}).get("structure")
        mark = ("tune's `fast`" + ("" if c["name"] == study else f"; the study's `fast` is {study} (3 x 2000)")
                if c.get("plan") == "fast" else "frontier" if c["frontier"] else "")
        lines.append(f"| {c['name']} | {c['solver']} | {c['steps']} | {c['schedule']} | {c['forecast']} | "
                     f"{c['timeshift']:g} | {c['interval'][0]:g}-{c['interval'][1]:g} | {c['encoder_calls']} | "
                     f"{c['gflop']:.3f} | {ref['gflop'] / c['gflop']:.2f}x | {_s(c['trajectory_error'], '.4f')} | "
                     f"{c['dfid']:+.3f} | {c['dprecision']:+.4f} | {c['drecall']:+.4f} | {mark} |")
    return "\n".join(lines)


def families_table(res: dict, ref_gflop: float) -> str:
    rows = sorted(res.get("families", {}).values(), key=lambda r: (r["structure"]["schedule"] != "all",
                                                                    r["structure"]["solver"], r["structure"]["steps"],
                                                                    r["structure"]["schedule"],
                                                                    r["structure"]["forecast"]))
    lines = ["| solver | steps | schedule | forecast | encoder calls | GFLOP / image | speed-up | FID | dFID | "
             "d precision | d recall |", "|" + " --- |" * 11]
    for r in rows:
        s = r["structure"]
        lines.append(f"| {s['solver']} | {s['steps']} | {s['schedule']} | {s['forecast']} | {r['encoder_calls']} | "
                     f"{r['gflop']:.3f} | {ref_gflop / r['gflop']:.2f}x | {r['fid'][0]:.3f} | {r['dfid'][0]:+.3f} | "
                     f"{r['dprecision'][0]:+.4f} | {r['drecall'][0]:+.4f} |")
    return "\n".join(lines)


def probe_table(res: dict) -> str:
    p = res.get("probe", {}).get("families")
    if not p:
        return ""
    lines = ["| plan | dFID (500 samples) | final-latent error (64) | predicted dFID (64): linear | plug-in | mean "
             "(tune's) | mean, 32 samples |", "|" + " --- |" * 7]
    for r in sorted(p["rows"], key=lambda r: r["key"]):
        lines.append(f"| {r['key']} | {r['dfid']:+.3f} | {r['trajectory_error_64']:.4f} | {r['linear_64']:+.3f} | "
                     f"{r['plugin_64']:+.3f} | {r['predict_64']:+.3f} | {r['predict_32']:+.3f} |")
    lines.append("")
    corr = [f"{what.replace('_', ' ')} ({n}): Pearson {p[f'{what}_{n}']['pearson']:.2f}, Spearman "
            f"{p[f'{what}_{n}']['spearman']:.2f}" for what in ("trajectory_error", "linear", "plugin", "predict")
            for n in (32, 64)]
    lines.append(f"Correlation with |dFID| over these {p['n_plans']} plans (absolute values; samples in brackets): "
                 + "; ".join(corr) + ".")
    return "\n".join(lines)


def dp_table(res: dict) -> str:
    rows = [r for k, r in res.get("dp", {}).items() if k != "base"]
    by = {}
    for r in rows:
        s = r["structure"]
        by.setdefault((s["forecast"], int(s["schedule"][3:])), {})[s["dp"]] = r
    lines = ["| forecast | K (encoder calls) | recompute steps, reuse DP | recompute steps, forecast DP | FID reuse DP "
             "(3 seeds) | FID forecast DP | mean dFID reuse DP [95%] | mean dFID forecast DP [95%] | "
             "forecast - reuse |", "|" + " --- |" * 9]
    for (f, k), pair in sorted(by.items()):
        if set(pair) != {"reuse", "forecast"}:
            continue
        a, b = pair["reuse"], pair["forecast"]
        diff = statistics.mean(x - y for x, y in zip(b["fid"], a["fid"]))
        lines.append(f"| {f} | {k} | {a.get('recompute_steps')} | {b.get('recompute_steps')} | "
                     f"{', '.join(f'{v:.3f}' for v in a['fid'])} | {', '.join(f'{v:.3f}' for v in b['fid'])} | "
                     f"{a['mean_dfid']:+.3f} [{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}] | "
                     f"{b['mean_dfid']:+.3f} [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}] | {diff:+.3f} |")
    return "\n".join(lines)


def confirm_table(res: dict) -> str:
    lines = ["| plan | samples x seeds | GFLOP / image (reference) | speed-up | FID reference | FID plan | dFID per "
             "seed | mean dFID | mean abs dFID | paired 95% interval of the mean | d precision per seed | d recall "
             "per seed | target |", "|" + " --- |" * 13]
    for r in res.get("confirm", {}).values():
        lines.append(f"| {r['key']} | {r['num']} x {len(r['seeds'])} | {r['gflop']:.3f} ({r['reference_gflop']:.3f}) "
                     f"| {r['speedup']:.2f}x | {', '.join(f'{v:.3f}' for v in r['fid_reference'])} | "
                     f"{', '.join(f'{v:.3f}' for v in r['fid'])} | {', '.join(f'{v:+.3f}' for v in r['dfid'])} | "
                     f"{r['mean_dfid']:+.3f} | {r['mean_abs_dfid']:.3f} | [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] "
                     f"| {', '.join(f'{v:+.4f}' for v in r['dprecision'])} | "
                     f"{', '.join(f'{v:+.4f}' for v in r['drecall'])} | {'met' if r['meets_target'] else 'missed'} |")
    return "\n".join(lines)


def screen_table(res: dict, ref_gflop: float) -> str:
    lines = ["| structure | samples x seeds | GFLOP / image | speed-up | dFID per seed | mean dFID | mean abs dFID | "
             "paired 95% interval (200 draws) | mean d precision | d recall per seed | mean d recall |",
             "|" + " --- |" * 11]
    for r in sorted(res.get("screen", {}).values(), key=lambda r: r["gflop"]):
        lines.append(f"| {r['key']} | {r['num']} x {len(r['seeds'])} | {r['gflop']:.3f} | "
                     f"{ref_gflop / r['gflop']:.2f}x | {', '.join(f'{v:+.3f}' for v in r['dfid'])} | "
                     f"{r['mean_dfid']:+.3f} | {r['mean_abs_dfid']:.3f} | [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | "
                     f"{r['mean_dprecision']:+.4f} | {', '.join(f'{v:+.4f}' for v in r['drecall'])} | "
                     f"{r['mean_drecall']:+.4f} |")
    return "\n".join(lines)


def xl_table(res: dict) -> str:
    lines = ["| model | structure | steps | encoder calls | GFLOP / image | official Euler (250, full CFG batch) | "
             "speed-up | official DP example (51 of 250) | speed-up | this runtime's `all` (cond-only rows) | "
             "speed-up |", "|" + " --- |" * 11]
    for r in res.get("xl", {}).get("rows", []):
        lines.append(f"| {r['model']} | {r['structure']} | {r['steps']} | {r['encoder_calls']} | {r['gflop']:.0f} | "
                     f"{r['official_euler_gflop']:.0f} | {r['speedup_vs_official_euler']:.2f}x | "
                     f"{r['official_dp_gflop']:.0f} | {r['speedup_vs_official_dp']:.2f}x | "
                     f"{r['all_cond_only_gflop']:.0f} | {r['speedup_vs_all']:.2f}x |")
    return "\n".join(lines)


def wall_table(res: dict) -> str:
    lines = ["| model | batch | `all` Euler: steps, median s | `fast`: steps, encoder calls, median s | measured "
             "speed-up | FLOP model | CPU |", "|" + " --- |" * 7]
    for r in res.get("wall", {}).values():
        cpu = r["cpu"]
        isa = "AVX-512" if cpu["avx512f"] else ("AVX2" if cpu["avx2"] else "neither AVX2 nor AVX-512")
        lines.append(f"| {r['model']} | {r['batch']} | {r['steps_reference']}, {r['all_s']['median']:.2f} | "
                     f"{r['steps_plan']}, {r['encoder_calls_plan']}, {r['plan_s']['median']:.2f} | "
                     f"{r['measured_speedup']:.2f}x | {r['predicted_speedup']:.2f}x | {cpu['model']}, {isa}, "
                     f"{r['machine'].get('cores')} cores |")
    return "\n".join(lines)


def plot(res: dict, ref_gflop: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    fams = list(res.get("families", {}).values())
    for solver in ("euler", "adams:2", "adams:3", "adams:4"):
        pts = sorted((r["gflop"], abs(r["dfid"][0])) for r in fams if r["structure"]["solver"] == solver
                     and r["structure"]["schedule"] == "all")
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, label=f"{solver}, encoder every step")
    enc = [(r["gflop"], abs(r["dfid"][0]), r["structure"]["forecast"]) for r in fams
           if r["structure"]["schedule"] != "all"]
    for f, marker in ((0, "x"), (1, "^"), (2, "s")):
        pts = [(g, d) for g, d, ff in enc if ff == f]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, s=18, label=f"shared encoder, forecast {f}")
    fast = res.get("choice", {}).get("fast", {}).get("key")
    for r in res.get("confirm", {}).values():
        ax.plot([r["gflop"]], [r["mean_abs_dfid"]], "*", ms=12 if r["key"] == fast else 8,
                c="tab:red" if r["key"] == fast else "tab:gray",
                label=f"{'fast: ' if r['key'] == fast else ''}{r['key'].split('-ts')[0]}, {r['num']} x "
                      f"{len(r['seeds'])}: mean |dFID|, target {'met' if r['meets_target'] else 'missed'}")
    ax.axhline(0.1, c="grey", ls="--", lw=0.8)
    ax.axvline(ref_gflop / 5, c="tab:green", ls=":", lw=0.8, label="20% of the reference's FLOPs")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.1)  # linear up to the target, logarithmic beyond
    ax.set_ylim(bottom=0)
    ax.set_xlabel("network GFLOP per image (reference: %.1f)" % ref_gflop)
    ax.set_ylabel("|dFID| vs the 50-step Euler reference")
    ax.set_title("digits model: plans against the 50-step Euler reference (500 samples of seed 0; stars: 3 x 2000)",
                 fontsize=9)
    ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120)


def report(res: dict) -> int:
    ref_gflop = res["tune"]["digits"]["confirmed"][0]["gflop"] if "tune" in res else 12.03
    blocks = {"tune": tune_table(res) if "tune" in res else "", "families": families_table(res, ref_gflop),
              "probe": probe_table(res), "screen": screen_table(res, ref_gflop),
              "dp": dp_table(res), "confirm": confirm_table(res), "xl": xl_table(res), "wall": wall_table(res)}
    text = README.read_text() if README.is_file() else ""
    for name, body in blocks.items():
        print(f"\n## {name}\n\n{body}")
        text = replace_between(text, f"<!-- {name} begin -->", f"<!-- {name} end -->", body)
    if README.is_file():
        README.write_text(text)
    if res.get("families"):
        plot(res, ref_gflop)
    return 0
