"""ADM's five numbers on the bundled digits model: engine precisions x encoder schedules x seeds.

    python benchmarks/adm_digits/adm_digits.py            # the runs (resumable), into adm_digits.json
    python benchmarks/adm_digits/adm_digits.py --report   # the tables: README.md here and docs/metrics.md
    python benchmarks/adm_digits/adm_digits.py --precisions fp32 --schedules all --seeds 0 --num 20 --no-write

Each run: `generate` on onnxruntime CPU engines (the production host loop), then the digits extractor's
activations of the samples against the bundled reference batch (`digits_stats.npz`: all 1797 real digits, their
stored mu/sigma and mu_s/sigma_s, their images for precision and recall): Inception Score (the CNN's 10 logits),
FID (64-d features), sFID (448-d spatial features), precision and recall (k = 3 on the 64-d features).
Noise is shared by every row of one seed, so the rows of one seed differ only by engines and schedule.
The real-data row: `num` real digits drawn without replacement (seed s), through the same uint8 path, against
the same reference; they are part of the reference set, so their precision is 1 by construction.

Results are written after every run to `--json` and a rerun resumes from it (same num, seeds and sampler);
`--report` writes the table of the finished rows (and their paired differences from fp32 `all`) between the
markers of this folder's README.md and of docs/metrics.md.
On a shared 2-core CPU a 500-sample run takes about 1 min (fp32) to 5 min (FP8, emulated by onnxruntime).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]  # run as a script: this checkout's ddt_export and benchmarks.common

from benchmarks.common.digits import limit_threads  # noqa: E402
from benchmarks.common.doc_blocks import update_block  # noqa: E402
from ddt_export.builder.engine import BuildOptions, build  # noqa: E402
from ddt_export.core.artifacts import library_versions, write_json  # noqa: E402
from ddt_export.core.config import load_config  # noqa: E402
from ddt_export.core.images import images_from_samples  # noqa: E402
from ddt_export.core.manifest import read_manifest  # noqa: E402
from ddt_export.evaluate.features import DIGITS_STATS, DigitsFeatures  # noqa: E402
from ddt_export.evaluate.suite import adm_numbers, batch_from_activations, read_batch  # noqa: E402
from ddt_export.runtime.generate.generate import RunOptions, generate  # noqa: E402
from ddt_export.runtime.sampling.request import CLI, RequestInput, resolve  # noqa: E402

HERE = Path(__file__).resolve().parent
SCHEDULES = ("all", "uniform:2", "dp:25", "uniform:4", "dp:13")
PRECISIONS = ("fp32", "fp16", "fp8")
FIRST = ("all", "dp:25")  # the low-precision rows of the fid_digits study run before the rest
MARK_BEGIN, MARK_END = "<!-- adm table begin -->", "<!-- adm table end -->"  # docs/metrics.md
METRICS = (("fid", "FID", 3), ("inception_score", "IS", 3), ("sfid", "sFID", 2), ("precision", "precision", 3),
           ("recall", "recall", 3))


def numbers(images: np.ndarray, ext: DigitsFeatures, ref, source: str) -> dict:
    """ADM's numbers of uint8 (N, 16, 16, 1) images against the reference batch."""
    nums = adm_numbers(batch_from_activations(ext.activations(images), source), ref)
    return {k: nums[k] for k, _, _ in METRICS}


def recompute_steps(folder: Path, spec: str) -> list[int]:
    """The steps `spec` resolves to on these engines (dp:K: the stored or computed DP schedule)."""
    from ddt_export.runtime import load_engines
    from ddt_export.runtime.sampling.schedules import resolve_schedule

    with load_engines(folder, "onnxruntime") as engines:
        request = resolve(engines.config, RequestInput(schedule=spec), CLI)
        return list(resolve_schedule(request, engines, say=lambda m: None).recompute)


def run_one(folder: Path, num: int, seed: int, spec: str, ext, ref) -> dict:
    t0 = time.time()
    res = generate(folder, RequestInput(num=num, seed=seed, schedule=spec), RunOptions(), say=lambda m: None)
    out = numbers(images_from_samples(res.latents), ext, ref, f"{folder.name} {spec} seed {seed}")
    return dict(out, seconds=time.time() - t0)


def plan(precisions, schedules) -> list[tuple[str, str]]:
    """fp32 rows, then the rows of the existing FID table at lower precisions, then the rest of the grid."""
    rows = [(p, s) for p in precisions for s in schedules if p == "fp32" or s in FIRST]
    return rows + [(p, s) for p in precisions for s in schedules if (p, s) not in rows]


def real_rows(num: int, seeds, ext, ref) -> dict:
    with np.load(DIGITS_STATS) as z:
        real = z["arr_0"]  # (1797, 16, 16, 1) uint8
    out = {}
    for s in seeds:
        pick = np.random.default_rng(s).choice(len(real), size=min(num, len(real)), replace=False)
        out[str(s)] = numbers(real[pick], ext, ref, f"real digits seed {s}")
    return out


def mean_sd(values: list[float], digits: int) -> str:
    m = statistics.mean(values)
    return f"{m:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def ordered_rows(result: dict) -> list[tuple[str, dict]]:
    """The rows in table order: precisions, then schedules, as PRECISIONS and SCHEDULES list them."""
    def rank(key):
        prec, spec = key.split(" ")
        return (PRECISIONS.index(prec) if prec in PRECISIONS else len(PRECISIONS),
                SCHEDULES.index(spec) if spec in SCHEDULES else len(SCHEDULES), key)
    return [(k, result["rows"][k]) for k in sorted(result["rows"], key=rank)]


def table(result: dict) -> str:
    seeds = [str(s) for s in result["seeds"]]
    head = "| engines | schedule | encoder steps | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for key, row in ordered_rows(result):
        if not all(s in row["runs"] for s in seeds):
            continue
        prec, spec = key.split(" ")
        cells = [mean_sd([row["runs"][s][k] for s in seeds], d) for k, _, d in METRICS]
        lines.append(f"| {prec} | {spec} | {row['encoder_steps']} | " + " | ".join(cells) + " |")
    real = result.get("real", {})
    if all(s in real for s in seeds):
        cells = [mean_sd([real[s][k] for s in seeds], d) for k, _, d in METRICS]
        lines.append(f"| real digits ({result['num']} of 1797) | - | - | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(result: dict, base: str = "fp32 all") -> str:
    """Each finished row minus `base`, seed by seed (the same noise on both sides), mean ± sd over seeds."""
    seeds = [str(s) for s in result["seeds"]]
    b = result["rows"].get(base, {}).get("runs", {})
    if not all(s in b for s in seeds):
        return ""
    head = "| engines | schedule | " + " | ".join(f"Δ{label}" for _, label, _ in METRICS) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for key, row in ordered_rows(result):
        if key == base or not all(s in row["runs"] for s in seeds):
            continue
        cells = []
        for k, _, d in METRICS:
            diffs = [row["runs"][s][k] - b[s][k] for s in seeds]
            cells.append(f"{statistics.mean(diffs):+.{d}f}"
                         + (f" ± {statistics.stdev(diffs):.{d}f}" if len(diffs) > 1 else ""))
        lines.append("| " + " | ".join(key.split(" ")) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--num", type=int, default=500, help="samples per run")
    p.add_argument("--work", type=Path, default=ROOT / "engines" / "adm_digits")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=HERE / "adm_digits.json")
    p.add_argument("--no-write", action="store_true", help="print only; leave --json alone")
    p.add_argument("--report", action="store_true",
                   help="no runs: the tables of the finished rows in --json, into README.md and docs/metrics.md")
    a = p.parse_args(argv)
    if a.report:
        return report(json.loads(a.json.read_text()), a.json.name)
    limit_threads(a.threads)  # one onnxruntime thread per session: twice as fast on 2 shared cores
    cfg = load_config(None)
    ext = DigitsFeatures()
    ref = read_batch(DIGITS_STATS, lambda: ext)
    key = json.loads(json.dumps({"num": a.num, "seeds": a.seeds, "sampler": dataclasses.asdict(cfg.sampler)}))
    result = json.loads(a.json.read_text()) if a.json.is_file() and not a.no_write else {}
    if {k: result.get(k) for k in key} != key:
        result = dict(key, rows={}, builds={})
    result.setdefault("builds", {})
    t_all = time.time()
    if "real" not in result:
        result["real"] = real_rows(a.num, a.seeds, ext, ref)
        print(f"real digits: {result['real']}", flush=True)
    folders = {}
    for prec, spec in plan(a.precisions, a.schedules):
        if prec not in folders:
            folders[prec] = a.work / prec
            t0 = time.time()
            build(prec, BuildOptions(backend="onnxruntime"), out=folders[prec],
                  say=lambda m: print("  " + m, flush=True))
            man = read_manifest(folders[prec])
            result["builds"][prec] = {"folder": str(folders[prec]), "options": dict(man.provenance.options),
                                      "seconds": time.time() - t0}
        row = result["rows"].setdefault(f"{prec} {spec}", {"runs": {}})
        steps = recompute_steps(folders[prec], spec)
        row.update(encoder_steps=len(steps), recompute_steps=steps)
        twin = next((k for k, r in result["rows"].items() if k != f"{prec} {spec}" and k.startswith(prec + " ")
                     and r.get("recompute_steps") == steps), None)  # uniform:2 and dp:25 are one schedule here
        for seed in a.seeds:
            if str(seed) in row["runs"]:
                continue
            if twin is not None and str(seed) in result["rows"][twin]["runs"]:
                run = dict(result["rows"][twin]["runs"][str(seed)], same_samples_as=twin, seconds=0.0)
            else:
                run = run_one(folders[prec], a.num, seed, spec, ext, ref)
            row["runs"][str(seed)] = run
            print(f"{prec:>5} {spec:>10} seed {seed}: " + ", ".join(f"{label} {run[k]:.4f}" for k, label, _ in METRICS)
                  + f" ({run['seconds']:.0f} s)", flush=True)
            if not a.no_write:
                result.update(date=time.strftime("%Y-%m-%d"), versions=library_versions(),
                              machine=platform.platform())
                write_json(a.json, result)
    print(table(result))
    if not a.no_write:
        result["wall_s_last_session"] = time.time() - t_all
        write_json(a.json, result)
    return 0


def twins_text(result: dict) -> str:
    """Which rows resolved to the same encoder steps as another row of their precision (their samples are shared)."""
    twins = sorted({f"{k} = {run['same_samples_as']}" for k, row in result["rows"].items()
                    for run in row["runs"].values() if "same_samples_as" in run})
    return (f"Same encoder steps, so the same samples (run once): {'; '.join(twins)}. " if twins else "")


def report(result: dict, json_name: str = "adm_digits.json") -> int:
    """The finished rows of a result JSON: the dated section of this folder's README and docs/metrics.md's table."""
    md, pmd, cfg, v = table(result), paired_table(result), load_config(None), result.get("versions", {})
    fp8 = result["builds"].get("fp8", {}).get("options")
    run_s = sum(r["seconds"] for row in result["rows"].values() for r in row["runs"].values())
    update_block(HERE / "README.md",
                 f"ADM metrics on the digits model, {result['date']}: `python benchmarks/adm_digits/adm_digits.py`. "
                 f"{result['num']} samples per run, seeds {', '.join(map(str, result['seeds']))} (mean ± sd over "
                 f"seeds), {cfg.sampler.num_steps} steps, CFG {cfg.sampler.guidance}, classes cycled; the digits "
                 "extractor against the bundled reference batch of all 1797 real digits (IS: the CNN's 10 logits; "
                 "FID: 64-d features; sFID: 448-d spatial features; precision/recall: k = 3 on the 64-d features). "
                 f"onnxruntime {v.get('onnxruntime')} CPU engines on a shared 2-core machine ({run_s / 60:.0f} min "
                 f"of runs). FP8: the ModelOpt recipe of this date ({fp8}). {twins_text(result)}Raw numbers: "
                 f"`{json_name}`.\n\n{md}"
                 + (f"\n\nPaired differences from fp32 `all`, seed by seed (same noise), mean ± sd over seeds:\n\n"
                    f"{pmd}" if pmd else ""))
    body = md + (f"\n\nPaired differences from fp32 `all` (same noise, seed by seed):\n\n{pmd}" if pmd else "")
    update_block(ROOT / "docs" / "metrics.md", body, MARK_BEGIN, MARK_END)
    print(md + "\n\n" + pmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
