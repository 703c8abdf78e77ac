"""FID of the bundled digits model against the real digits: engine precisions x encoder schedules x seeds.

    python benchmarks/fid_digits/fid_digits.py --seeds 0 1 2           # the docs/validate.md table
    python benchmarks/fid_digits/fid_digits.py --precisions fp32 --schedules all --seeds 0 --num 20 \
        --validate-num 0 --bootstrap 0 --no-write                         # a smoke run

FID runs: `generate` on the engines (the production host loop, onnxruntime), digits features of the samples
against the bundled statistics of all 1797 real digits. Noise is shared by every row of one seed, so the
differences between rows of one seed are paired (the `paired` section reports them per seed). The real-data
floor is the FID of `num` real digits drawn without replacement (through the same uint8 path as the samples)
against the statistics of all 1797: what a perfect model would score at this sample size. Two paired measures
need no FID: the per-sample relative deviation ||x - x_all|| / ||x_all|| of a shared schedule's final samples
from the same engines' unshared (`all`) samples (what sharing costs), and of fp16/FP8 samples from the fp32
engines' under the same schedule (what the precision costs).
Validate runs: `ddt_export.validate.validate(engines, reference="torch")` on fewer samples per precision
(latent error, per-tensor parity, FID delta against the fp32 PyTorch reference from identical noise).
Recognition: the share of the FID samples (schedule `all`, first seed) an independent classifier (RBF SVC and
logistic regression, fit on 80% of the real 16x16 pixels) reads as the requested class.

Noise of the paired differences: each fp32 pair is bootstrapped over its samples (`--bootstrap` draws, the same
resampled indices on both sides), giving a per-seed standard deviation and a 95% interval of the seed mean.

Writes benchmarks/fid_digits/fid_digits.json (`--json`), the dated result between the markers of
benchmarks/fid_digits/README.md, and the table between the markers in docs/validate.md. On a shared 2-core CPU one 500-sample run takes 1 min (fp32) to 5 min (FP8,
emulated by onnxruntime); the whole default table with three seeds about an hour.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]  # run as a script: this checkout's ddt_export and benchmarks.common

from benchmarks.common.digits import bootstrap_draws, classifiers, deviation, fid_run, limit_threads  # noqa: E402
from benchmarks.common.digits import real_digits_16  # noqa: E402
from benchmarks.common.doc_blocks import update_block  # noqa: E402
from ddt_export.builder.engine import BuildOptions, build  # noqa: E402
from ddt_export.core.artifacts import library_versions, write_json  # noqa: E402
from ddt_export.core.config import load_config  # noqa: E402
from ddt_export.core.images import images_from_samples  # noqa: E402
from ddt_export.evaluate.features import DIGITS_STATS, DigitsFeatures  # noqa: E402
from ddt_export.evaluate.fid import fid, load_stats, stats_from_features  # noqa: E402
from ddt_export.evaluate.validate import ValidateOptions, validate  # noqa: E402
from ddt_export.runtime.sampling.request import RequestInput  # noqa: E402

HERE = Path(__file__).resolve().parent
SCHEDULES = ("all", "uniform:2", "dp:25", "uniform:4", "dp:13", "dp:12")
LOW_PRECISION_SCHEDULES = ("all", "dp:25")
PAIRS = (("dp:25", "uniform:2"), ("dp:13", "uniform:4"), ("dp:12", "uniform:4"))
MARK_BEGIN, MARK_END = "<!-- fid_digits table begin -->", "<!-- fid_digits table end -->"


def real_floor(num: int, seeds, data, ext) -> list[float]:
    x, _ = real_digits_16()
    out = []
    for s in seeds:
        pick = np.random.default_rng(s).choice(len(x), size=min(num, len(x)), replace=False)
        out.append(fid(stats_from_features(ext.extract(images_from_samples(x[pick]))), data))
    return out


def table(rows: list[dict], seeds, floor: list[float], num: int) -> str:
    s = [str(x) for x in seeds]
    head = ("| engines | schedule | encoder steps | " + " | ".join(f"FID seed {x}" for x in s)
            + " | mean | recognized (SVC) | rel. deviation from `all` | rel. deviation from fp32 |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        fids = [r["runs"][x]["fid"] for x in s]
        rec = statistics.mean(r["runs"][x]["recognized"]["svc"] for x in s)
        devs = [_mean_dev(r, s, k) for k in ("vs_all", "vs_fp32")]
        lines.append(f"| {r['precision']} | {r['schedule']} | {r['encoder_steps']} | "
                     + " | ".join(f"{v:.3f}" for v in fids) + f" | {statistics.mean(fids):.3f} | {rec:.1%} | "
                     + " | ".join("-" if d is None else f"{d:.2e}" for d in devs) + " |")
    lines.append(f"| real digits ({num} of 1797) | - | - | " + " | ".join(f"{v:.3f}" for v in floor)
                 + f" | {statistics.mean(floor):.3f} | - | - | - |")
    return "\n".join(lines)


def _mean_dev(row: dict, seeds: list[str], key: str) -> float | None:
    """Mean over seeds of the mean per-sample deviation stored under `key`, or None where not measured."""
    vals = [row["runs"][x][key]["mean"] for x in seeds if key in row["runs"][x]]
    return statistics.mean(vals) if vals else None


def paired(rows: list[dict], seeds) -> dict:
    """FID(dp) - FID(uniform) per seed, fp32 engines: same noise, so most sampling noise cancels."""
    by = {(r["precision"], r["schedule"]): r for r in rows}
    out = {}
    for dp, uni in PAIRS:
        if ("fp32", dp) in by and ("fp32", uni) in by:
            out[f"{dp} - {uni}"] = [by["fp32", dp]["runs"][str(s)]["fid"] - by["fp32", uni]["runs"][str(s)]["fid"]
                                    for s in seeds]
    return out


def bootstrap_pairs(features: dict, seeds, data, draws: int) -> dict:
    """Sampling noise of each paired difference FID(dp) - FID(uniform), fp32: per seed, resample the sample
    indices with replacement (the same indices on both sides, so the pairing is kept) `draws` times.
    Returns per pair: the per-seed bootstrap standard deviations and the pooled 95% interval of the seed mean."""
    out = {}
    for dp, uni in PAIRS:
        if not all(("fp32", s_, seed) in features for s_ in (dp, uni) for seed in seeds):
            continue
        per_seed = [bootstrap_draws(features["fp32", dp, seed], features["fp32", uni, seed], data, draws, 1000 + seed)
                    for seed in seeds]
        mean = np.mean(per_seed, axis=0)  # bootstrap distribution of the mean over seeds
        out[f"{dp} - {uni}"] = {"std_per_seed": [float(d.std(ddof=1)) for d in per_seed],
                                "seed_mean_ci95": [float(np.percentile(mean, 2.5)), float(np.percentile(mean, 97.5))],
                                "draws": draws}
    return out


def validate_table(vals: dict) -> str:
    lines = ["| engines vs torch fp32 | latent rel err mean / p99 / max | encoder max rel err | decoder max rel err "
             "| FID engine / reference vs data | delta | FID engine vs reference |", "|" + " --- |" * 7]
    for prec, v in vals.items():
        e, p, f = v["latent_rel_err"], v["parity"], v["fid"]
        lines.append(f"| {prec} | {e['mean']:.2e} / {e['p99']:.2e} / {e['max']:.2e} | "
                     f"{p['encoder']['max_rel_err']:.2e} | {p['decoder']['max_rel_err']:.2e} | "
                     f"{f['engine_vs_data']:.3f} / {f['reference_vs_data']:.3f} | {f['delta']:+.4f} | "
                     f"{f['engine_vs_reference']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "fp8"])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), help="for fp32; others run all and dp:25")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--num", type=int, default=500, help="samples per FID run")
    p.add_argument("--validate-num", type=int, default=200, help="samples per validate run (0: none)")
    p.add_argument("--work", type=Path, default=ROOT / "engines" / "fid_digits")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per onnxruntime session and torch")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws per paired difference (0: none)")
    p.add_argument("--json", type=Path, default=HERE / "fid_digits.json", help="raw results")
    p.add_argument("--no-write", action="store_true",
                   help="print only; leave the JSON, the README and docs/validate.md alone")
    p.add_argument("--json-only", action="store_true",
                   help="write --json only; leave the README and docs/validate.md alone")
    a = p.parse_args(argv)
    limit_threads(a.threads)
    cfg = load_config(None)
    data, ext, clfs = load_stats(DIGITS_STATS), DigitsFeatures(), classifiers()
    t_all = time.time()
    floor = real_floor(a.num, a.seeds, data, ext)
    print(f"real-data floor ({a.num} real digits vs all 1797): {floor}", flush=True)
    print("held-out accuracy: " + ", ".join(f"{n} {acc:.4f}" for n, _, acc in clfs), flush=True)
    rows, vals, folders, latents, features = [], {}, {}, {}, {}
    for prec in a.precisions:
        folders[prec] = a.work / prec
        t0 = time.time()
        build(prec, BuildOptions(backend="onnxruntime"), out=folders[prec],
              say=lambda m: print("  " + m, flush=True))
        print(f"{prec}: engines in {folders[prec]} ({time.time() - t0:.0f} s)", flush=True)
        for spec in (a.schedules if prec == "fp32" else [s for s in a.schedules if s in LOW_PRECISION_SCHEDULES]):
            row = {"precision": prec, "schedule": spec, "runs": {}}
            for seed in a.seeds:
                run = fid_run(folders[prec], a.num, seed, spec, data, ext, clfs)
                latents[prec, spec, seed], features[prec, spec, seed] = run.pop("latents"), run.pop("features")
                if spec != "all" and (prec, "all", seed) in latents:  # what sharing costs, same noise
                    run["vs_all"] = deviation(latents[prec, spec, seed], latents[prec, "all", seed])
                if prec != "fp32" and ("fp32", spec, seed) in latents:  # what the precision costs
                    run["vs_fp32"] = deviation(latents[prec, spec, seed], latents["fp32", spec, seed])
                row["encoder_steps"], row["recompute_steps"] = run.pop("encoder_steps"), run.pop("recompute_steps")
                row["runs"][str(seed)] = run
                print(f"{prec:>5} {spec:>10} seed {seed}: FID {run['fid']:.3f}, recognized {run['recognized']}, "
                      f"vs all {run.get('vs_all')}, vs fp32 {run.get('vs_fp32')} ({run['seconds']:.0f} s)", flush=True)
            rows.append(row)
    for prec in a.precisions if a.validate_num else ():
        t0 = time.time()
        rep = validate(folders[prec], RequestInput(num=a.validate_num, seed=a.seeds[0]),
                       ValidateOptions(reference="torch", stats=DIGITS_STATS, out=a.work / f"validate-{prec}"),
                       say=lambda m: None)
        rep["latent_rel_err"].pop("per_sample")
        vals[prec] = {k: rep[k] for k in ("latent_rel_err", "parity", "fid", "seconds", "num", "seed")}
        print(f"validate {prec} vs torch ({a.validate_num} samples, {time.time() - t0:.0f} s): "
              f"{vals[prec]['latent_rel_err']}, delta {rep['fid']['delta']:+.4f}", flush=True)
    md, pairs = table(rows, a.seeds, floor, a.num), paired(rows, a.seeds)
    boot = bootstrap_pairs(features, a.seeds, data, a.bootstrap) if a.bootstrap else {}
    pair_text = "; ".join(f"{k}: " + ", ".join(f"{d:+.3f}" for d in v_)
                          + (" (bootstrap sd per seed " + ", ".join(f"{s:.3f}" for s in boot[k]["std_per_seed"])
                             + f"; 95% interval of the seed mean {boot[k]['seed_mean_ci95'][0]:+.3f}.."
                             f"{boot[k]['seed_mean_ci95'][1]:+.3f})" if k in boot else "")
                          for k, v_ in pairs.items())
    vmd = validate_table(vals) if vals else ""
    print(md + "\n\nPaired differences FID(dp) - FID(uniform), fp32, per seed: " + pair_text + "\n\n" + vmd)
    result = {"date": time.strftime("%Y-%m-%d"), "num": a.num, "seeds": a.seeds, "steps": cfg.sampler.num_steps,
              "guidance": cfg.sampler.guidance, "real_floor": floor, "rows": rows, "paired_dp_minus_uniform": pairs,
              "paired_bootstrap": boot,
              "held_out_accuracy": {n: acc for n, _, acc in clfs}, "validate": vals,
              "machine": {"platform": platform.platform(), "versions": library_versions()},
              "wall_s": time.time() - t_all}
    if a.no_write:
        return 0
    write_json(a.json, result)
    if a.json_only:
        return 0
    v = library_versions()
    section = (f"Digits FID, {result['date']}: `python benchmarks/fid_digits/fid_digits.py "
               f"--seeds {' '.join(map(str, a.seeds))}`. {a.num} samples per FID run, {cfg.sampler.num_steps} steps, "
               f"CFG {cfg.sampler.guidance}, classes cycled, digits features against the bundled statistics of all "
               f"1797 real digits; onnxruntime CPU engines. {platform.machine()}, onnxruntime "
               f"{v.get('onnxruntime')}, torch {v.get('torch')}; {result['wall_s'] / 60:.0f} min in all. Raw "
               f"numbers: `{a.json.name}`.\n\n{md}\n\n"
               "Paired differences FID(dp) - FID(uniform), fp32, per seed: " + pair_text + "\n\n"
               + "Held-out accuracy of the independent classifiers: "
               + ", ".join(f"{n} {acc:.1%}" for n, _, acc in clfs)
               + (f"\n\n`validate --reference torch`, {a.validate_num} samples, seed {a.seeds[0]}, schedule all:\n\n"
                  f"{vmd}" if vmd else ""))
    update_block(HERE / "README.md", section)
    update_block(ROOT / "docs" / "validate.md", md, MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
