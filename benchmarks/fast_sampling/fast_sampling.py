"""Fast sampling on the bundled digits model: plans against its own 50-step Euler reference (issue 21).

    python benchmarks/fast_sampling/fast_sampling.py tune       # ddt-export tune on a copy (digits-fp32-tune5), budget |dFID| <= 0.1
    python benchmarks/fast_sampling/fast_sampling.py families   # FID per solver x steps, then schedules x forecasts
    python benchmarks/fast_sampling/fast_sampling.py probe      # does a 32-sample probe predict dFID?
    python benchmarks/fast_sampling/fast_sampling.py dp         # reuse-DP vs forecast-DP under forecast 1 and 2
    python benchmarks/fast_sampling/fast_sampling.py screen --spec adams:2,14,uniform:2,2,1,0.3-1  # 3 x 500
    python benchmarks/fast_sampling/fast_sampling.py confirm    # `fast`: 3 seeds x 2000 samples, paired bootstrap
    python benchmarks/fast_sampling/fast_sampling.py choose     # `fast` := the cheapest confirmed one meeting the target
    python benchmarks/fast_sampling/fast_sampling.py xl         # the FLOP model at DDT-XL 256 and 512
    python benchmarks/fast_sampling/fast_sampling.py wall       # bench --plan fast: digits and ddt-xl-cpu
    python benchmarks/fast_sampling/fast_sampling.py report     # the tables of README.md from results.json

The protocol is in study.py. Every step writes results.json as it goes and reuses the cached samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]  # run as a script: this checkout's ddt_export, benchmarks

from benchmarks.fast_sampling.study import (BUDGET, RECALL, ROOT, TARGET_SPEEDUP, WORK, Runner,  # noqa: E402
                                            Structure, compare, digits_engines, limit_threads, load, save, say)

REF = Structure()  # the digits model's own trajectory: 50 Euler steps, every step, interval (0.3, 1)
SOLVERS = ("euler", "adams:2", "adams:3", "adams:4")
FAMILY_STEPS = (8, 10, 12, 16, 20)
ENCODER_STEPS = (12, 16)  # the encoder variants run on the best solver at these step counts
PROBE_SIZES = (32, 64)
PREDICTORS = ("linear", "plugin", "predict")  # fid.FidProbe's
TUNE_COPY = "digits-fp32-tune5"  # tune runs here, not in the study's folder (its `fast` is the 3 x 2000 one)


def stored_plan(folder: Path, name: str | None = None):
    """The plan `name` stored in the engine folder (default `fast`)."""
    from ddt_export.core.manifest import read_manifest
    from ddt_export.runtime.sampling.plans import FAST, read_plan

    return read_plan(folder, read_manifest(folder), name or FAST)


def step_tune(a) -> None:
    """The library's tune with the default search space, 500 samples of seed 0 per confirmed candidate, on a
    copy of the study's engines (TUNE_COPY): the study's folder keeps its 3 x 2000-confirmed `fast`, which the
    serving benchmark uses."""
    import shutil

    from ddt_export.core.errors import NumericsError
    from ddt_export.evaluate.tune import tune
    from ddt_export.evaluate.tune_space import TuneOptions

    study = digits_engines()
    n = a.confirm or 12
    folder, entry = (WORK / TUNE_COPY, "digits") if n == 12 else (WORK / f"{TUNE_COPY}-confirm{n}", f"digits_confirm{n}")
    opts = TuneOptions(max_fid_delta=BUDGET, max_recall_delta=RECALL, num=a.num or 500, seeds=tuple(a.seeds or [0]),
                       confirm=n)
    key = f"{opts.num}x{list(opts.seeds)}-confirm{opts.confirm}-probe{opts.probe}-fidprobe-mean-walk"
    if load().get("tune", {}).get(entry, {}).get("key") == key and (folder / "plans" / "frontier.json").is_file():
        return say("tune: done (results.json)")
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(study, folder, ignore=shutil.ignore_patterns("plans", "*.lock"))
    t0, last = time.time(), [0.0]

    def progress(done: int, total: int) -> None:
        if done / max(total, 1) >= last[0] + 0.05:
            last[0] = done / total
            say(f"tune: {done}/{total} sample-steps ({time.time() - t0:.0f} s)")

    try:
        tune(folder, opts, progress=progress, say=say)
    except NumericsError as e:  # nothing within the budget: the frontier is written all the same
        say(f"tune: {e}")
    rec = json.loads((folder / "plans" / "frontier.json").read_text())
    save("tune", entry, {"key": key, "command": f"ddt-export tune --engines {folder.relative_to(ROOT)} "
                         f"--max-fid-delta {BUDGET} --confirm {n}", "fast": rec["fast"],
                         "probed": len(rec["candidates"]) - 1, "confirmed": rec["confirmed"],
                         "seconds": rec["seconds"], "space": rec["protocol"]["space"]})


def step_families(a) -> None:
    """dFID (seed 0, 500 samples, paired with the reference) of each solver at each step count (every step
    recomputed); then, on the solver with the least mean |dFID| and on adams:2, encoder schedules x forecast
    orders."""
    run, num, seeds = Runner(digits_engines()), a.num or 500, a.seeds or [0]
    done = load().get("families", {})
    for solver in SOLVERS:
        for n in FAMILY_STEPS:
            _row(run, "families", Structure(solver, n), seeds, num, done)
    rows = load()["families"]
    best = min(SOLVERS, key=lambda s: statistics.mean(abs(r["mean_dfid"]) for r in rows.values()
                                                     if r["structure"]["solver"] == s and r["structure"]["schedule"]
                                                     == "all"))
    for solver in dict.fromkeys((best, "adams:2")):  # the least mean |dFID|, and the solver tune picks
        _encoder_rows(run, solver, seeds, num, done)


def _encoder_rows(run: Runner, best: str, seeds, num: int, done: dict) -> None:
    say(f"families: encoder variants on {best}")
    for n in ENCODER_STEPS:
        for spec in ["uniform:2", f"dp:{round(n / 3)}", f"dp:{round(n / 4)}"]:
            for f in (0, 1, 2):
                _row(run, "families", Structure(best, n, spec, f), seeds, num, done)


def _row(run: Runner, section: str, s: Structure, seeds, num: int, done: dict, draws: int = 0,
         extra: dict | None = None) -> dict:
    key = f"{s.key}-n{num}-s{''.join(map(str, seeds))}"
    if key not in done:
        row = dict(compare(run, s, REF, list(seeds), num, draws), **(extra or {}))
        save(section, key, row)
        done[key] = row
        say(f"{section} {s.key}: {row['gflop']:.3f} GFLOP, dFID {', '.join(f'{d:+.3f}' for d in row['dfid'])}, "
            f"d recall {row['mean_drecall']:+.4f}")
    return done[key]


def step_probe(a) -> None:
    """How well a small paired batch predicts dFID: over the `families` plans (seed 0), the final-latent error and
    the three predictions of `fid.FidProbe` (linear, plug-in, their mean) from their first 32 and 64 samples,
    against the dFID of all 500."""
    import numpy as np
    from scipy.stats import spearmanr

    from ddt_export.core.numerics import relative_errors
    from ddt_export.evaluate.fid import fid_probe, stats_from_features

    run = Runner(digits_engines())
    ref = run.chunk(REF, 0, 0)
    probe = fid_probe(stats_from_features(ref["features"]), run.data.stats)
    rows = []
    for r in load().get("families", {}).values():
        z = run.chunk(Structure(**dict(r["structure"], interval=tuple(r["structure"]["interval"]))), 0, 0)
        row = {"key": r["key"], "dfid": r["dfid"][0]}
        for n in PROBE_SIZES:
            row[f"trajectory_error_{n}"] = float(relative_errors(z["latents"][:n], ref["latents"][:n]).mean())
            for what in PREDICTORS:
                row[f"{what}_{n}"] = getattr(probe, what)(ref["features"][:n], z["features"][:n])
        rows.append(row)
    out = {"rows": rows, "n_plans": len(rows)}
    truth = [abs(r["dfid"]) for r in rows]
    for n in PROBE_SIZES:
        for what in ("trajectory_error", *PREDICTORS):
            x = [abs(r[f"{what}_{n}"]) for r in rows]
            out[f"{what}_{n}"] = {"pearson": float(np.corrcoef(x, truth)[0, 1]),
                                  "spearman": float(spearmanr(x, truth).correlation)}
    save("probe", "families", out)
    say("probe: " + "; ".join(f"{k} {v}" for k, v in out.items() if isinstance(v, dict)))


def step_dp(a) -> None:
    """dp:K chosen on the reuse error (the official) and on the forecast's error, the same solver, steps, shift,
    interval and K, under --forecasts (2 1), 3 seeds x 500 samples: FID per encoder call for both. The base is the
    plan or structure given (default the stored `fast`); K: --k, else the base's own dp:K, else steps / 4."""
    folder = digits_engines()
    run, num, seeds = Runner(folder), a.num or 500, a.seeds or [0, 1, 2]
    s0 = _structure(a, folder)
    base = dataclasses.replace(s0, schedule="all", forecast=0)
    ks = a.k or ([int(s0.schedule[3:])] if s0.schedule.startswith("dp:") else [round(base.steps / 4)])
    done = load().get("dp", {})
    for f in a.forecasts:
        for k in ks:
            for method in ("reuse", "forecast"):
                s = dataclasses.replace(base, schedule=f"dp:{k}", forecast=f, dp=method)
                _row(run, "dp", s, seeds, num, done, draws=1000,
                     extra={"recompute_steps": list(map(int, run.resolved(s)[1]))})
    save("dp", "base", dataclasses.asdict(base))


def step_screen(a) -> None:
    """Structures given as --spec SOLVER,STEPS,SCHEDULE,FORECAST,SHIFT,LO-HI on 3 seeds x 500 samples (the first
    chunk of what confirm samples): which one to confirm."""
    run, num, seeds = Runner(digits_engines()), a.num or 500, a.seeds or [0, 1, 2]
    done = load().get("screen", {})
    for spec in a.spec or []:
        solver, steps, schedule, forecast, shift, iv = spec.split(",")
        lo, hi = map(float, iv.split("-"))
        _row(run, "screen", Structure(solver, int(steps), schedule, int(forecast), float(shift), (lo, hi)), seeds,
             num, done, draws=200)


def step_confirm(a) -> None:
    """`fast` against the reference, 3 seeds x 2000 samples, the paired bootstrap interval; the target check."""
    folder = digits_engines()
    run, num, seeds = Runner(folder), a.num or 2000, a.seeds or [0, 1, 2]
    if a.reference_only:
        for seed in seeds:
            run.features(REF, seed, num)
        return
    s = _structure(a, folder)
    row = compare(run, s, REF, list(seeds), num, 1000)
    ref_g = run.gflop(REF)
    row.update(reference_gflop=ref_g, speedup=ref_g / row["gflop"], flop_fraction=row["gflop"] / ref_g,
               meets_target=bool(row["mean_abs_dfid"] <= BUDGET and abs(row["mean_drecall"]) <= RECALL
                                 and ref_g / row["gflop"] >= TARGET_SPEEDUP))
    save("confirm", f"{s.key}-n{num}", row)
    say(f"confirm {s.key}: dFID {row['dfid']}, mean |dFID| {row['mean_abs_dfid']:.3f}, 95% {row['ci95']}, "
        f"d recall {row['drecall']}, {row['speedup']:.2f}x: target {'met' if row['meets_target'] else 'missed'}")


def _structure(a, folder: Path) -> Structure:
    """The structure a step measures: --solver/--steps/... when given, else the stored plan --plan (default
    `fast`)."""
    if a.steps is not None:
        return Structure(a.solver, a.steps, a.schedule, a.forecast, a.timeshift,
                         tuple(map(float, a.interval.split("-"))))
    return Structure.of_plan(stored_plan(folder, a.plan))


def step_choose(a) -> None:
    """`fast` := the cheapest structure confirmed at 3 seeds x 2000 samples that meets the target (none meeting
    it: the one least over it, max(mean |dFID| / 0.1, |mean d recall| / 0.01), among those at >= 5x); written to
    the engine folder as plans/fast.json and under its own name, with the confirmation's numbers."""
    from ddt_export.core.manifest import read_manifest
    from ddt_export.evaluate.frontier import plan_name
    from ddt_export.runtime.sampling.plans import FAST, Plan, write_plan

    folder = digits_engines()
    rows = [r for r in load().get("confirm", {}).values() if r["num"] == (a.num or 2000)]
    met = [r for r in rows if r["meets_target"]]
    over = lambda r: max(r["mean_abs_dfid"] / BUDGET, abs(r["mean_drecall"]) / RECALL)  # noqa: E731
    pick = min(met, key=lambda r: (r["gflop"], r["mean_abs_dfid"])) if met else \
        min((r for r in rows if r["speedup"] >= TARGET_SPEEDUP), key=over)
    st = Structure(**dict(pick["structure"], interval=tuple(pick["structure"]["interval"])))
    name = plan_name(st.solver, st.steps, st.schedule, st.forecast, st.timeshift, st.interval, REF.interval)
    steps = list(map(int, Runner(folder).resolved(st)[1]))
    tune = load().get("tune", {}).get("digits", {})
    measured = {
        "dfid": pick["mean_dfid"], "dfid_per_seed": pick["dfid"], "mean_abs_dfid": pick["mean_abs_dfid"],
        "ci95": pick["ci95"], "fid": pick["fid"], "fid_reference": pick["fid_reference"],
        "dprecision": pick["mean_dprecision"], "dprecision_per_seed": pick["dprecision"],
        "drecall": pick["mean_drecall"], "drecall_per_seed": pick["drecall"],
        "gflop_per_image": pick["gflop"], "reference_gflop_per_image": pick["reference_gflop"],
        "speedup": pick["speedup"], "encoder_calls": len(steps), "recompute_steps": steps,
        "within_budget": abs(pick["mean_dfid"]) <= BUDGET and abs(pick["mean_drecall"]) <= RECALL,
        "meets_target": pick["meets_target"], "structure": name,
        "protocol": {"samples": pick["num"], "seeds": pick["seeds"], "bootstrap": "paired, 1000 draws per seed",
                     "reference": "euler, 50 steps, all, interval (0.3, 1)",
                     "chosen_by": "benchmarks/fast_sampling/fast_sampling.py choose: the cheapest structure "
                                  "confirmed at 3 seeds x 2000 samples that meets the target (issue 21)"
                                  + ("" if met else "; none met it: the one least over it"),
                     "target": {"mean_abs_dfid": BUDGET, "recall": RECALL, "speedup": TARGET_SPEEDUP},
                     "candidates": sorted(r["key"] for r in rows),
                     "tune": {"fast": tune.get("fast"), "command": tune.get("command"), "note": tune.get("note")}}}
    man = read_manifest(folder)
    for n in (FAST, name):
        write_plan(folder, Plan(n, st.steps, st.solver, st.forecast, st.timeshift, tuple(st.interval), st.schedule,
                                measured), man.provenance)
    save("choice", "fast", {"structure": name, "key": pick["key"], "met": bool(met), "over": over(pick),
                            "candidates": {r["key"]: r["meets_target"] for r in rows}})
    say(f"fast := {name} ({pick['speedup']:.2f}x, mean |dFID| {pick['mean_abs_dfid']:.3f}, d recall "
        f"{pick['mean_drecall']:+.4f}): target {'met' if met else 'missed by every candidate'}")


def step_xl(a) -> None:
    from benchmarks.fast_sampling.fast_sampling_xl import xl_rows

    folder = digits_engines()
    save("xl", "rows", xl_rows(stored_plan(folder)))


def step_wall(a) -> None:
    from benchmarks.fast_sampling.fast_sampling_xl import wall

    folder = digits_engines()
    for name, row in wall(folder, stored_plan(folder), WORK, say).items():
        save("wall", name, row)


def step_report(a) -> None:
    from benchmarks.fast_sampling.fast_sampling_report import report

    report(load())


STEPS = {"tune": step_tune, "families": step_families, "probe": step_probe, "dp": step_dp,
         "screen": step_screen, "confirm": step_confirm, "choose": step_choose, "xl": step_xl, "wall": step_wall, "report": step_report}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=list(STEPS))
    p.add_argument("--num", type=int, default=None, help="samples per seed (confirm: 2000; others: 500)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per onnxruntime session")
    p.add_argument("--plan", default="fast", help="confirm, dp: the stored plan to measure (default fast)")
    p.add_argument("--solver", default="euler", help="confirm, dp: a structure instead of a stored plan (with --steps)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--schedule", default="all")
    p.add_argument("--forecast", type=int, default=0)
    p.add_argument("--timeshift", type=float, default=1.0)
    p.add_argument("--interval", default="0.3-1", help="the guidance interval LO-HI")
    p.add_argument("--spec", nargs="+", default=None, help="screen: SOLVER,STEPS,SCHEDULE,FORECAST,SHIFT,LO-HI")
    p.add_argument("--forecasts", type=int, nargs="+", default=[2, 1], help="dp: the forecast orders")
    p.add_argument("--k", type=int, nargs="+", default=None, help="dp: the K of dp:K (default: the base's)")
    p.add_argument("--confirm", type=int, default=None, help="tune: candidates confirmed, at most (default 12)")
    p.add_argument("--reference-only", action="store_true", help="confirm: sample the reference only (start early)")
    a = p.parse_args(argv)
    limit_threads(a.threads)
    STEPS[a.what](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
