"""`tune`: a tiny search on the tiny random engines (seconds), its frontier, `fast`, the plan files, the CLI.

The plans are checked against what they claim: the frontier against the Pareto definition over the confirmed
candidates, `fast` against the budget rule, a plan's FID against `generate --plan` + the features + FID computed
here, its GFLOP against the row count of its schedule written out by hand, and `validate --plan fast` against
the dFID tune recorded.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ddt_export.core.errors import ArtifactError, ConfigError, InputError, NumericsError
from ddt_export.core.flops import step_flops
from ddt_export.core.images import images_from_samples
from ddt_export.core.manifest import read_manifest
from ddt_export.evaluate import tune as T
from ddt_export.evaluate.tune_space import SearchSpace, TuneOptions
from ddt_export.evaluate.fid import fid, stats_from_features
from ddt_export.evaluate.frontier import pareto
from ddt_export.runtime.sampling.plans import FAST, plan_names, read_plan
from engines_cache import run_cli
from runs import run_generate, run_validate

NUM = 24  # FID samples (16-d features)
SPACE = SearchSpace(solvers=("euler", "adams:2"), steps=(5, 10), timeshifts=(1.0,), rates=(2,),
                      dp_fractions=(0.5,), forecasts=(0, 1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data batch with images (precision and recall need them): 40 random 8x8 RGB images."""
    path = tmp_path_factory.mktemp("data") / "data.npz"
    np.savez(path, arr_0=np.random.default_rng(3).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def tuned(tiny_engines, features, data, tmp_path_factory):
    """A copy of the tiny engines, tuned with a budget everything meets; (folder, result, progress calls)."""
    folder = tmp_path_factory.mktemp("tune") / "fp32"
    shutil.copytree(tiny_engines[0], folder)
    calls = []
    res = T.tune(folder, TuneOptions(max_fid_delta=1e6, max_recall_delta=1.0, num=NUM, seeds=(0, 1), probe=4,
                                       confirm=4, space=SPACE, features=features, stats=data),
                 progress=lambda d, t: calls.append((d, t)), say=lambda m: None)
    return folder, res, calls


def _dominated(a, b) -> bool:
    """b dominates a: no costlier and no farther, strictly better in one."""
    return (b["gflop"] <= a["gflop"] and abs(b["dfid"]) <= abs(a["dfid"])
            and (b["gflop"] < a["gflop"] or abs(b["dfid"]) < abs(a["dfid"])))


def test_search_covers_the_space_and_reports_progress(tuned):
    folder, res, calls = tuned
    rec = res.record
    stages = {c["stage"] for c in rec["candidates"]}
    assert stages == {"reference", "solver", "encoder", "interval"}
    solver_stage = [c for c in rec["candidates"] if c["stage"] == "solver"]
    assert {(c["solver"], c["steps"]) for c in solver_stage} == {(s, n) for s in SPACE.solvers for n in (5, 10)}
    enc = {(c["schedule"], c["forecast"]) for c in rec["candidates"] if c["stage"] == "encoder" and c["steps"] == 10}
    assert enc == {(s, f) for s in ("uniform:2", "dp:5") for f in (0, 1)}
    assert {tuple(c["interval"]) for c in rec["candidates"] if c["stage"] == "interval"} == {
        (0.25, 1.0), (0.35, 1.0), (0.4, 1.0)}  # the reference's (0.3, 1) with its lower edge -0.05, +0.05, +0.1
    # the probe ranks by |predicted dFID| (data statistics given); the probe frontier is Pareto in it
    probed = [c for c in rec["candidates"] if c["stage"] != "reference"]
    assert all(c["metric"] == pytest.approx(abs(c["predicted_dfid"])) for c in probed)
    front = [c for c in rec["candidates"] if c["frontier"]]
    for c in probed:  # on the frontier: nothing else is as good on both axes; off it: something on it is
        if c["frontier"]:
            assert not any(o is not c and o["gflop"] <= c["gflop"] and o["metric"] <= c["metric"]
                           for o in rec["candidates"] if o["frontier"] or (o["gflop"], o["metric"]) != (
                               c["gflop"], c["metric"])), c["name"]
        else:
            assert any(o["gflop"] <= c["gflop"] and o["metric"] <= c["metric"] for o in front), c["name"]
    ref = rec["candidates"][0]
    assert ref["name"] == "reference" and ref["steps"] == 20 and ref["trajectory_error"] == 0.0
    assert 1 <= len(rec["confirmed"]) - 1 <= 4  # at most `confirm`, the reference aside
    # a budget everything meets: the walk confirms the cheapest probed candidate, and it passes; the rest of
    # `confirm` goes to the probe frontier beyond it
    cheapest = min(c["gflop"] for c in probed)
    walked, *rest = sorted(rec["confirmed"][1:], key=lambda c: c["gflop"])
    assert walked["gflop"] == cheapest and walked["within_budget"]
    assert all(c["name"] in {f["name"] for f in front} and c["gflop"] > cheapest for c in rest)
    # progress: called, never backwards, ends with done == total
    assert len(calls) > 10 and all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))
    assert calls[-1][0] == calls[-1][1] and all(d <= t for d, t in calls)


def test_frontier_is_pareto_and_fast_is_the_cheapest_within(tuned):
    folder, res, _ = tuned
    conf = res.record["confirmed"]
    front = [c for c in conf if c["frontier"]]
    for c in conf:
        beaten = any(_dominated(c, o) for o in conf if o is not c)
        assert c["frontier"] == (not beaten), c["name"]  # on the frontier exactly when nothing dominates it
    within = [c for c in conf[1:] if abs(c["dfid"]) <= 1e6 and abs(c["drecall"]) <= 1.0]
    fast = read_plan(folder, read_manifest(folder), FAST)
    cheapest = min(within, key=lambda c: c["gflop"])
    assert fast.measured["structure"] == cheapest["name"] == res.fast
    assert fast.measured["gflop_per_image"] == cheapest["gflop"]
    # the files: the frontier (the reference included) and fast; nothing else
    assert set(plan_names(folder)) == {c["name"] for c in front} | {FAST}
    assert (folder / "plans" / "frontier.json").is_file() and (folder / "plans" / "frontier.png").stat().st_size > 0


def test_plan_records_what_it_measured(tuned, tiny_cfg, features, data):
    """fast's FID is what generate --plan fast gives through the features, its GFLOP the rows of its schedule
    counted by hand, its deltas the recorded sides' differences, its protocol the seeds and samples."""
    folder, res, _ = tuned
    man = read_manifest(folder)
    fast = read_plan(folder, man, FAST)
    m = fast.measured
    assert m["protocol"]["seeds"] == [0, 1] and m["protocol"]["samples"] == NUM and m["protocol"]["probe_samples"] == 4
    assert m["dfid"] == pytest.approx(np.mean(np.subtract(m["fid"], m["fid_reference"])), abs=1e-12)
    assert m["drecall"] == pytest.approx(np.mean(m["recall"]) - np.mean(m["recall_reference"]), abs=1e-12)
    assert m["speedup"] == pytest.approx(m["reference_gflop_per_image"] / m["gflop_per_image"])
    run = run_generate(folder, plan=FAST, num=NUM, seed=1)
    from ddt_export.evaluate.suite import read_batch

    data_stats = read_batch(data, lambda: features).stats
    got = fid(stats_from_features(features.extract(images_from_samples(run.latents))), data_stats)
    assert got == pytest.approx(m["fid"][1], rel=1e-6)
    # GFLOP by hand: encoder rows at its recompute steps, decoder rows every step; 2 rows per sample where the
    # step is guided (t in (0.3, 1)), else 1; the encoder computes both halves when a guided step will use it
    from ddt_export.core.sampling import step_times

    t, _ = step_times(dataclasses_replace(tiny_cfg.sampler, fast))
    guided = [0.3 < float(x) < 1.0 for x in t]
    rec = m["recompute_steps"]
    enc_rows = sum(2 if any(guided[i:(rec + [fast.steps])[k + 1]]) else 1 for k, i in enumerate(rec))
    dec_rows = sum(2 if g else 1 for g in guided)
    f = step_flops(tiny_cfg.model)
    assert m["gflop_per_image"] == pytest.approx((enc_rows * f.encoder + dec_rows * f.decoder) / 1e9, rel=1e-12)


def dataclasses_replace(sampler, plan):
    import dataclasses

    return dataclasses.replace(sampler, num_steps=plan.steps, timeshift=plan.timeshift,
                               guidance_interval=tuple(plan.interval))


def test_validate_plan_fast_reproduces_the_recorded_delta(tuned, features, data, tmp_path):
    """`validate --plan fast` against the same engines (a second folder) on tune's first seed and sample count:
    the same dFID tune recorded for that seed."""
    folder, res, _ = tuned
    ref = tmp_path / "ref"
    shutil.copytree(folder, ref)
    fast = read_plan(folder, read_manifest(folder), FAST)
    rep = run_validate(folder, reference=ref, plan=FAST, num=NUM, seed=0, features=features, stats=data)
    assert rep["plan"] == FAST and rep["sampler"]["solver"] == fast.solver
    assert rep["fid"]["delta"] == pytest.approx(fast.measured["dfid_per_seed"][0], abs=1e-6)


def test_plans_refused_for_other_weights(tuned, tmp_path):
    folder, _, _ = tuned
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    man = json.loads((foreign / "manifest.json").read_text())
    man["provenance"]["weights"] = "0" * 64
    (foreign / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="weights"):
        read_plan(foreign, read_manifest(foreign), FAST)
    code, text = run_cli(["generate", "--engines", foreign, "--plan", FAST, "--num", 1, "--out", tmp_path / "o"])
    assert code == 2 and "weights" in text and "Traceback" not in text


def test_nothing_within_the_budget(tiny_engines, features, data, tmp_path):
    """Budget 0: nothing passes; the frontier and the record are written, no `fast` (a stale one removed), and
    the error says so."""
    folder = tmp_path / "fp32"
    shutil.copytree(tiny_engines[0], folder)
    (folder / "plans").mkdir()
    (folder / "plans" / "fast.json").write_text("{}")  # an earlier run's
    small = SearchSpace(solvers=("euler",), steps=(5,), timeshifts=(1.0,), rates=(), dp_fractions=(),
                          forecasts=(0,), intervals=())
    with pytest.raises(NumericsError, match="tune budget.*no `fast` plan written"):
        T.tune(folder, TuneOptions(max_fid_delta=0.0, max_recall_delta=0.0, num=NUM, probe=2, confirm=1,
                                     space=small, features=features, stats=data), say=lambda m: None)
    assert FAST not in plan_names(folder) and "reference" in plan_names(folder)
    assert json.loads((folder / "plans" / "frontier.json").read_text())["fast"] is None


@pytest.mark.parametrize("args, flag", [
    (["--max-fid-delta", "-1"], "--max-fid-delta"), (["--max-fid-delta", "nan"], "--max-fid-delta"),
    (["--num", "1"], "--num"), (["--probe", "1"], "--probe"), (["--probe", "600"], "--probe"),
    (["--confirm", "0"], "--confirm"),
    (["--solvers", "euler,adams:5"], "--solvers"), (["--solvers", "rk4"], "--solvers"),
    (["--forecasts", "3"], "--forecasts"), (["--steps", "0,5"], "--steps"), (["--steps", "five"], "--steps"),
    (["--timeshifts", "0"], "--timeshifts"), (["--rates", "1"], "--rates"),
    (["--dp-fractions", "1.5"], "--dp-fractions"),
    (["--interval", "0.5"], "--interval"), (["--interval", "0.8,0.2"], "--interval"), (["--seed", "-1"], "--seed"),
    (["--max-recall-delta", "-0.1"], "--max-recall-delta")])
def test_bad_flags_one_line(args, flag, tiny_engines):
    argv = ["tune", "--engines", tiny_engines[0], *args] + ([] if "--max-fid-delta" in args else
                                                           ["--max-fid-delta", "0.1"])
    code, text = run_cli(argv)
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and flag in errors[0] and "Traceback" not in text, text


def test_no_feature_extractor_and_reserved_name(tiny_engines, tmp_path):
    with pytest.raises(ConfigError, match="feature extractor"):
        T.tune(tiny_engines[0], TuneOptions(max_fid_delta=0.1, space=SPACE), say=lambda m: None)
    code, text = run_cli(["generate", "--engines", tiny_engines[0], "--plan", "frontier", "--num", 1, "--out",
                          tmp_path / "o"])
    assert code == 2 and "--plan" in text and "not frontier" in text
    with pytest.raises(InputError, match="--plan"):
        read_plan(tiny_engines[0], read_manifest(tiny_engines[0]), "nosuch")


# --------------------------------------------------------------------------------------- the confirm walk


def _row(name, gflop, pred, traj=None):
    """A probed row as tune keeps it (|predicted dFID| is the probe's metric)."""
    return {"name": name, "stage": "encoder", "gflop": gflop, "predicted_dfid": pred, "metric": abs(pred),
            "trajectory_error": abs(pred) / 10 if traj is None else traj}


def _walk(rows, budget, limit, truth):
    """tune's confirm choice with a stubbed scorer: `truth` maps a name to (dFID, d recall) on the full sample."""
    front = pareto(rows, lambda r: (r["gflop"], r["metric"]))
    calls, plans = [], []

    def measure(r):
        calls.append(r["name"])
        dfid, drec = truth[r["name"]]
        return abs(dfid) <= 0.1 and abs(drec) <= 0.01

    got = T.confirm_plan(rows, front, budget, limit, measure, lambda rs: plans.append([r["name"] for r in rs]))
    return calls, [r["name"] for r in got], plans, front


def test_confirm_walk_finds_what_the_probe_frontier_missed():
    """The defect of the digits study: the probe's Pareto points (few-step Euler) lose recall, the cheapest plan
    within the budget is off that set; the walk confirms it, a search of the frontier alone cannot."""
    rows = [_row("euler-6", 0.72, 3.37), _row("euler-8-u2", 1.29, -0.037), _row("euler-8-dp4", 1.29, -0.037),
            _row("euler-8", 1.86, 0.023), _row("adams3-12-u2", 1.91, -0.062), _row("adams3-12-u2-f1", 1.91, 0.082),
            _row("adams4-17-dp4", 1.96, 0.5), _row("adams4-17-dp8", 2.63, 0.003), _row("euler-17", 2.7, 0.2)]
    truth = {"euler-6": (2.6, -0.12), "euler-8-u2": (-0.107, -0.07), "euler-8-dp4": (-0.107, -0.07),
             "euler-8": (0.005, -0.068), "adams3-12-u2": (-0.04, 0.009), "adams3-12-u2-f1": (0.11, 0.01),
             "adams4-17-dp4": (0.3, 0.0), "adams4-17-dp8": (-0.044, 0.01), "euler-17": (0.0, 0.0)}
    calls, got, plans, front = _walk(rows, 0.1, 6, truth)
    assert "adams3-12-u2" not in [r["name"] for r in front]  # the old rule never measured it
    # cheapest first over |predicted| <= 0.1, one of the two identical probe results, stopping at the first pass;
    # then the rest of the 6 on the probe frontier beyond it
    assert calls == got == ["euler-8-u2", "euler-8", "adams3-12-u2", "adams4-17-dp8"]
    assert plans == [["euler-8-u2", "euler-8", "adams3-12-u2", "adams3-12-u2-f1", "adams4-17-dp8"], got]
    calls, _, _, _ = _walk(rows, 0.1, 2, truth)  # a bound too small to reach it: 2 confirms, none passes
    assert calls == ["euler-8-u2", "euler-8"]


@pytest.mark.parametrize("seed", range(20))
def test_confirm_walk_against_brute_force(seed):
    """Random small spaces, a random scorer: with room for every candidate the walk's pass is the cheapest that
    passes among those predicted within the budget (brute force over all of them); with a bound it never
    measures more than the bound, nor one candidate twice."""
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for i in range(12):
        gflop, pred = float(rng.choice([1.0, 1.5, 2.0, 3.0])), float(rng.normal(0, 0.15))
        if i and rng.random() < 0.2:  # an alias: the same probe result, the same trajectory
            twin = rows[int(rng.integers(len(rows)))]
            gflop, pred = twin["gflop"], twin["predicted_dfid"]
        rows.append(_row(f"c{i}", gflop, pred))
        twin = next((r for r in rows[:-1] if (r["gflop"], r["predicted_dfid"]) == (gflop, pred)), None)
        truth[f"c{i}"] = truth[twin["name"]] if twin else (float(rng.normal(0, 0.1)), float(rng.normal(0, 0.01)))
    passes = {n for n, (f, r) in truth.items() if abs(f) <= 0.1 and abs(r) <= 0.01}
    within = [r for r in rows if r["metric"] <= 0.1]
    brute = min((r for r in within if r["name"] in passes), key=lambda r: (r["gflop"], r["metric"]), default=None)
    calls, got, _, _ = _walk(rows, 0.1, len(rows), truth)
    first_pass = next((n for n in calls if n in passes), None)
    if brute is None:
        assert first_pass is None or first_pass not in {r["name"] for r in within}
    else:
        hit = next(r for r in rows if r["name"] == first_pass)
        assert (hit["gflop"], hit["metric"]) == (brute["gflop"], brute["metric"])
    for limit in (1, 3):
        calls, _, _, _ = _walk(rows, 0.1, limit, truth)
        assert len(calls) <= limit and len(set(calls)) == len(calls)
