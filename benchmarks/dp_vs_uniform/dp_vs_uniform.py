"""DP against uniform encoder schedules at equal K on the bundled digits model: every K that a uniform:R gives.

    python benchmarks/dp_vs_uniform/dp_vs_uniform.py       # fp32 engines, 500 samples, seed 0, R = 2..10
    python benchmarks/dp_vs_uniform/dp_vs_uniform.py --num 20 --ratios 10 --bootstrap 20 --no-write   # a smoke run

For each R, `uniform:R` (K = ceil(N / R) encoder steps) and `dp:K` run from the same noise and labels, with the
fp32 onnxruntime engines and the production host loop. Two measures:
- fidelity: the per-sample relative deviation ||x - x_all|| / ||x_all|| of the final samples from the unshared
  (`all`) samples of the same noise. Nearly noise-free; it is what sharing the encoder state costs;
- FID against the real digits (digits features, bundled statistics), and the paired difference
  FID(dp:K) - FID(uniform:R) with a bootstrap over the samples (same resampled indices on both sides).
Writes dp_vs_uniform.json and the dated table between the markers of README.md, both in this folder.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]  # run as a script: this checkout's ddt_export and benchmarks.common

from benchmarks.common.digits import bootstrap_draws, classifiers, deviation, fid_run, limit_threads  # noqa: E402
from benchmarks.common.doc_blocks import update_block  # noqa: E402
from ddt_export.builder.engine import BuildOptions, build  # noqa: E402
from ddt_export.core.artifacts import library_versions, write_json  # noqa: E402
from ddt_export.core.config import load_config  # noqa: E402
from ddt_export.evaluate.features import DIGITS_STATS, DigitsFeatures  # noqa: E402
from ddt_export.evaluate.fid import load_stats  # noqa: E402

HERE = Path(__file__).resolve().parent


def paired_bootstrap(a: np.ndarray, b: np.ndarray, data, draws: int, seed: int) -> dict:
    """FID(a) - FID(b) for features of the same samples (N, d): bootstrap sd and 95% interval."""
    d = bootstrap_draws(a, b, data, draws, seed)
    return {"sd": float(d.std(ddof=1)), "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]}


def table(rows: list[dict]) -> str:
    lines = ["| R | K | uniform:R steps | dp:K steps | deviation from `all`, uniform / dp (mean) | FID uniform / dp "
             "| FID(dp) - FID(uniform) [95% bootstrap] |", "|" + " --- |" * 7]
    for r in rows:
        u, d, b = r["uniform"], r["dp"], r["paired"]
        lines.append(f"| {r['ratio']} | {r['k']} | {','.join(map(str, u['steps']))} | {','.join(map(str, d['steps']))}"
                     f" | {u['vs_all']['mean']:.2e} / {d['vs_all']['mean']:.2e} | {u['fid']:.3f} / {d['fid']:.3f} | "
                     f"{d['fid'] - u['fid']:+.3f} [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}] |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", nargs="+", type=int, default=list(range(2, 11)))
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--work", type=Path, default=ROOT / "engines" / "dp_vs_uniform")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    limit_threads(a.threads)
    cfg = load_config(None)
    n = cfg.sampler.num_steps
    data, ext, clfs = load_stats(DIGITS_STATS), DigitsFeatures(), classifiers()
    t0 = time.time()
    folder = a.work / "fp32"
    build("fp32", BuildOptions(backend="onnxruntime"), out=folder, say=lambda m: None)
    base = fid_run(folder, a.num, a.seed, "all", data, ext, clfs)
    print(f"all: FID {base['fid']:.3f}", flush=True)
    rows = []
    for ratio in a.ratios:
        k = math.ceil(n / ratio)
        row = {"ratio": ratio, "k": k}
        for name, spec in (("uniform", f"uniform:{ratio}"), ("dp", f"dp:{k}")):
            run = fid_run(folder, a.num, a.seed, spec, data, ext, clfs)
            row[name] = {"spec": spec, "steps": run["recompute_steps"], "fid": run["fid"],
                         "vs_all": deviation(run["latents"], base["latents"]), "features": run["features"]}
        row["paired"] = paired_bootstrap(row["dp"].pop("features"), row["uniform"].pop("features"), data,
                                         a.bootstrap, a.seed)
        rows.append(row)
        print(f"R {ratio} K {k}: deviation uniform {row['uniform']['vs_all']['mean']:.3e} dp "
              f"{row['dp']['vs_all']['mean']:.3e}; FID uniform {row['uniform']['fid']:.3f} dp {row['dp']['fid']:.3f}"
              f" (bootstrap sd {row['paired']['sd']:.3f})", flush=True)
    md = table(rows)
    print(md)
    result = {"date": time.strftime("%Y-%m-%d"), "num": a.num, "seed": a.seed, "steps": n,
              "guidance": cfg.sampler.guidance, "fid_all": base["fid"], "rows": rows,
              "machine": {"platform": platform.platform(), "versions": library_versions()},
              "wall_s": time.time() - t0}
    if a.no_write:
        return 0
    write_json(HERE / "dp_vs_uniform.json", result)
    update_block(HERE / "README.md", f"DP vs uniform at equal K, {result['date']}: `python benchmarks/dp_vs_uniform/"
                 f"dp_vs_uniform.py`. Digits model, fp32 onnxruntime engines, {a.num} samples, seed {a.seed}, {n} "
                 f"steps, CFG {cfg.sampler.guidance}; FID of `all` {base['fid']:.3f}; {result['wall_s'] / 60:.0f} min."
                 f"\n\n{md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
