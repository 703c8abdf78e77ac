"""`ddt-export generate` / `schedule` end to end on the tiny exported graphs, against the official sampler."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cli
from conftest import CHILD_TIMEOUT

torch = pytest.importorskip("torch")

from references.official import official_sampler, official_similarity  # noqa: E402
from references.sharing_dp import official_dp  # noqa: E402


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def engines_dir(tiny_engines, tmp_path_factory):
    """A private copy: these tests write schedules into the folder."""
    d = tmp_path_factory.mktemp("gen") / "engines"
    shutil.copytree(tiny_engines[0], d)
    return d


@pytest.mark.parametrize("schedule, recompute", [("all", range(20)), ("uniform:2", range(0, 20, 2))])
def test_generate_matches_official_sampler(engines_dir, tiny_engines, tiny_cfg, tmp_path, capsys, schedule, recompute):
    m = tiny_cfg.model
    rng = np.random.default_rng(11)
    noise = rng.standard_normal((3, *m.latent_shape), dtype=np.float32)
    labels = np.array([1, 7, 3], np.int64)
    np.save(tmp_path / "noise.npy", noise)
    np.save(tmp_path / "labels.npy", labels)
    code, out, err = run_cli(["generate", "--engines", engines_dir, "--noise", tmp_path / "noise.npy", "--labels",
                              tmp_path / "labels.npy", "--steps", 20, "--cfg", 3.0, "--schedule", schedule,
                              "--latents-out", tmp_path / "lat.npy", "--out", tmp_path / "png"], capsys)
    assert code == 0, err
    got = np.load(tmp_path / "lat.npy")
    with torch.no_grad():
        want = official_sampler(tiny_engines[1], torch.from_numpy(noise), torch.from_numpy(labels),
                                        num_steps=20, guidance=3.0, interval=(0.3, 1.0), last_step=0.04,
                                        recompute=list(recompute), null=m.null_class).numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"{schedule}: max rel err vs official sampler {rel:.2e}")
    assert rel < 1e-4
    assert len(list((tmp_path / "png").glob("*-class*.png"))) == 3 and (tmp_path / "png" / "preview" / "grid.png").is_file()
    assert "saved" in out


@pytest.mark.parametrize("step_fn, shift", [("sde", 1.0), ("sde_preserve", 1.0), ("ode", 3.0)])
def test_sampler_matches_official_sde_and_timeshift(engines_dir, tiny_engines, tiny_cfg, step_fn, shift):
    """The host loop against the official sampler restated in torch, for a noisy step function (the step noise
    drawn in the same order from the same generator) and for a timeshift other than 1."""
    import dataclasses

    from ddt_export.runtime import load_engines, sample

    m = tiny_cfg.model
    sampler = dataclasses.replace(tiny_cfg.sampler, step_fn=step_fn, timeshift=shift)
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((2, *m.latent_shape), dtype=np.float32)
    labels = np.array([4, 9], np.int64)
    with load_engines(engines_dir) as engines:
        got = sample(engines, noise, labels, sampler, list(range(0, 20, 2)), rng=np.random.default_rng(8))
    draws = np.random.default_rng(8)
    with torch.no_grad():
        want = official_sampler(tiny_engines[1], torch.from_numpy(noise), torch.from_numpy(labels), num_steps=20,
                                guidance=3.0, interval=(0.3, 1.0), last_step=0.04, recompute=list(range(0, 20, 2)),
                                null=m.null_class, shift=shift, step_fn=step_fn,
                                step_noise=lambda i: torch.from_numpy(draws.standard_normal(noise.shape,
                                                                                            dtype=np.float32))).numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"{step_fn}, timeshift {shift}: max rel err vs official sampler {rel:.2e}")
    assert rel < 1e-4


def test_seeded_noise_and_classes(engines_dir, tmp_path, capsys):
    code, out, err = run_cli(["generate", "--engines", engines_dir, "--class", 2, "--class", 5, "--num", 3, "--seed",
                              4, "--steps", 4, "--latents-out", tmp_path / "a.npy", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "o").glob("0*.png"))
    assert names == ["00000-class2.png", "00001-class5.png", "00002-class2.png"]
    code, *_ = run_cli(["generate", "--engines", engines_dir, "--class", 2, "--class", 5, "--num", 3, "--seed", 4,
                        "--steps", 4, "--latents-out", tmp_path / "b.npy", "--out", tmp_path / "o"], capsys)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    (tmp_path / "o" / "notes.png").write_bytes(b"not a sample")  # the user's file: left alone
    code, out, err = run_cli(["generate", "--engines", engines_dir, "--num", 1, "--steps", 2, "--out", tmp_path / "o"],
                             capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["00000-class0.png", "notes.png", "preview", "run.json"]
    assert "removed 3 samples of an earlier run" in out + err  # 00000-class2 included


def test_images_do_not_depend_on_the_batch(engines_dir, tmp_path, capsys):
    """Per-sample noise: image i of seed S is the same in a run of 2 and in a run of 5 (other batch composition)."""
    runs = {}
    for num in (2, 5):
        code, out, err = run_cli(["generate", "--engines", engines_dir, "--num", num, "--seed", 9, "--steps", 6,
                                  "--latents-out", tmp_path / f"{num}.npy", "--out", tmp_path / f"o{num}"], capsys)
        assert code == 0, err
        runs[num] = np.load(tmp_path / f"{num}.npy")
    np.testing.assert_allclose(runs[5][:2], runs[2], rtol=0, atol=2e-6)  # float rounding of another batch only
    from PIL import Image

    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "o2" / f"0000{i}-class{i}.png"))
        b = np.asarray(Image.open(tmp_path / "o5" / f"0000{i}-class{i}.png"))
        np.testing.assert_array_equal(a, b)  # equal to the uint8 pixel


def test_schedule_commands_and_dp_generate(engines_dir, tmp_path, capsys):
    code, out, err = run_cli(["schedule", "--engines", engines_dir, "--steps", 10, "--recompute", 4], capsys)
    assert code == 0, err
    rec = json.loads((engines_dir / "schedule-10-4.json").read_text())
    assert rec["num_steps"] == 10 and rec["provenance"]["sampler"]["num_steps"] == 10
    assert (engines_dir / "schedule-10-4.png").is_file()
    sim = np.load(engines_dir / "similarity-10.npy")
    # the official DP on the official similarity of the template trajectory's states (8 samples, seed 0)
    import dataclasses

    from ddt_export.runtime import load_engines, record_states

    with load_engines(engines_dir) as engines:
        m = engines.config.model
        noise = np.stack([np.random.default_rng([0, i]).standard_normal(m.latent_shape, dtype=np.float32)
                          for i in range(8)])  # the documented per-sample noise of seed 0
        labels = np.random.default_rng(0).integers(0, m.num_classes, 8, dtype=np.int64)
        states = record_states(engines, noise, labels, dataclasses.replace(engines.config.sampler, num_steps=10))
    want_sim = official_similarity(states).numpy()
    np.testing.assert_allclose(sim, want_sim, atol=1e-10)
    assert rec["recompute_steps"] == official_dp(want_sim, 4)
    code, out, err = run_cli(["schedule", "--from-similarity", engines_dir / "similarity-10.npy", "--recompute", 4,
                              "--out", tmp_path / "s.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["recompute_steps"] == rec["recompute_steps"]
    code, out, err = run_cli(["generate", "--engines", engines_dir, "--steps", 10, "--schedule", "dp:4", "--num", 2,
                              "--out", tmp_path / "o"], capsys)
    assert code == 0 and "using" in err and "encoder 4/10" in out
    code, out, err = run_cli(["generate", "--engines", engines_dir, "--steps", 10, "--schedule", "dp:3", "--num", 2,
                              "--out", tmp_path / "o"], capsys)
    assert code == 0 and "running the 8-sample template" in err and (engines_dir / "schedule-10-3.json").is_file()
    code, out, err = run_cli(["generate", "--engines", engines_dir, "--steps", 10, "--schedule",
                              tmp_path / "s.json", "--num", 1, "--out", tmp_path / "o"], capsys)
    assert code == 0 and "encoder 4/10" in out


def test_dp_on_the_forecast_error_on_request(engines_dir, tmp_path, capsys):
    """`schedule --forecast 1 --dp-error forecast`: the DP over the forecast's error of the template states
    (recorded here again). The default under forecasting is the reuse error (the measured choice), so
    `generate --forecast 1 --schedule dp:K` does not take that schedule: it computes the reuse DP's, which a
    second run then uses."""
    import dataclasses

    from ddt_export.core.sampling import step_times
    from ddt_export.runtime import load_engines, record_states
    from ddt_export.runtime.sampling.dp import forecast_errors, similarity, solve_dp, solve_forecast_dp

    code, out, err = run_cli(["schedule", "--engines", engines_dir, "--steps", 12, "--recompute", 4, "--solver",
                              "adams:2", "--forecast", 1, "--dp-error", "forecast"], capsys)
    assert code == 0, err
    rec = json.loads((engines_dir / "schedule-12-4.json").read_text())
    assert rec["method"] == "dp-forecast1" and rec["provenance"]["sampler"]["forecast"] == 1
    assert "forecast error: dp" in out
    with load_engines(engines_dir) as engines:
        m = engines.config.model
        sampler = dataclasses.replace(engines.config.sampler, num_steps=12, solver="adams:2", forecast=1)
        noise = np.stack([np.random.default_rng([0, i]).standard_normal(m.latent_shape, dtype=np.float32)
                          for i in range(8)])
        labels = np.random.default_rng(0).integers(0, m.num_classes, 8, dtype=np.int64)
        states = record_states(engines, noise, labels, sampler)
    steps, cost = solve_forecast_dp(forecast_errors(states, step_times(sampler)[0], 1), 4)
    assert rec["recompute_steps"] == steps and rec["cost"] == pytest.approx(cost, rel=1e-9)
    gen = ["generate", "--engines", engines_dir, "--steps", 12, "--solver", "adams:2", "--forecast", 1,
           "--schedule", "dp:4", "--num", 1]
    code, out, err = run_cli(gen + ["--out", tmp_path / "a"], capsys)
    assert code == 0 and "minimized another error" in err and "encoder 4/12" in out
    assert json.loads((engines_dir / "schedule-12-4.json").read_text())["method"] == "dp-forecast1"  # kept
    (other,) = engines_dir.glob("schedule-12-4-*.json")  # the reuse DP's, beside it under its settings' digest
    rec = json.loads(other.read_text())
    assert rec["method"] == "dp" and rec["recompute_steps"] == solve_dp(similarity(states), 4)[0]
    code, out, err = run_cli(gen + ["--out", tmp_path / "b"], capsys)
    assert code == 0 and "using" in err and "encoder 4/12" in out
    code, out, err = run_cli(["schedule", "--engines", engines_dir, "--steps", 12, "--recompute", 4,
                              "--dp-error", "both"], capsys)
    assert code == 2 and "--dp-error" in err and "reuse | forecast" in err and "both" in err
    code, out, err = run_cli(["generate", "--engines", engines_dir, "--steps", 12, "--solver", "adams:2",
                              "--schedule", "dp:4", "--num", 1, "--out", tmp_path / "c"], capsys)  # forecast 0: the
    # official DP, computed again
    assert code == 0 and "computed under other settings" in err


def test_schedules_of_other_settings_do_not_replace_each_other(engines_dir, tmp_path, capsys):
    """dp:K at two cfgs, one after the other and back: each is computed once and then read (a server alternating
    between them ran the template trajectory on every request when both shared schedule-N-K.json)."""
    runs = []
    for cfg in (1.0, 2.5, 1.0, 2.5):
        code, out, err = run_cli(["generate", "--engines", engines_dir, "--steps", 9, "--cfg", cfg, "--schedule",
                                  "dp:3", "--num", 1, "--out", tmp_path / f"o{len(runs)}"], capsys)
        assert code == 0, err
        runs.append("running the 8-sample template" in err)
    assert runs == [True, True, False, False]
    files = sorted(engines_dir.glob("schedule-9-3*.json"))
    assert (engines_dir / "schedule-9-3.json") in files and len(files) == 2
    cfgs = sorted(json.loads(f.read_text())["provenance"]["sampler"]["guidance"] for f in files)
    assert cfgs == [1.0, 2.5]
    assert (engines_dir / "similarity-9.npy").is_file() and len(list(engines_dir.glob("similarity-9-*.npy"))) == 1


def test_a_dp_plan_runs_the_steps_it_was_measured_with(engines_dir, tmp_path, capsys):
    """A dp:K plan records its recompute steps (tune's `measured.recompute_steps`); a request on it runs those,
    not a DP solved again (another default error, other template settings), and a record that does not fit its
    schedule is refused."""
    from ddt_export.core.manifest import read_manifest
    from ddt_export.runtime.sampling.plans import Plan, write_plan

    import dataclasses

    manifest = read_manifest(engines_dir)
    sampler = dataclasses.replace(manifest.config.sampler, num_steps=10)  # the model's own, at 10 steps
    for name, steps in (("pinned", [0, 1, 7]), ("broken", [0, 4])):
        write_plan(engines_dir, Plan.of(name, sampler, "dp:3", {"recompute_steps": steps}), manifest.provenance)
    code, out, err = run_cli(["generate", "--engines", engines_dir, "--plan", "pinned", "--num", 1,
                              "--latents-out", tmp_path / "p.npy", "--out", tmp_path / "p"], capsys)
    assert code == 0 and "template" not in err and "encoder 3/10" in out, err
    (tmp_path / "s.json").write_text(json.dumps({"recompute_steps": [0, 1, 7], "num_steps": 10}))
    code, out, err = run_cli(["generate", "--engines", engines_dir, "--steps", 10, "--schedule", tmp_path / "s.json",
                              "--num", 1, "--latents-out", tmp_path / "f.npy", "--out", tmp_path / "f"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), np.load(tmp_path / "f.npy"))  # the same steps
    code, out, err = run_cli(["generate", "--engines", engines_dir, "--plan", "broken", "--num", 1, "--out",
                              tmp_path / "b"], capsys)
    assert code == 2 and "plan broken: recompute_steps" in err and "expected 3 steps" in err and "got 2" in err


def _bad_cases(engines_dir, tmp_path):
    np.save(tmp_path / "noise3.npy", np.zeros((2, 3, 8, 8), np.float32))
    nan = np.zeros((2, 4, 8, 8), np.float32)
    nan[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "wrong-n.json").write_text(json.dumps({"recompute_steps": [0, 3], "num_steps": 50}))
    (tmp_path / "late.json").write_text(json.dumps({"recompute_steps": [0, 30]}))
    g = ["generate", "--engines", engines_dir, "--out", tmp_path / "o"]
    return {
        "class": (g + ["--class", 10], "InputError: --class: expected a class id in [0, 10), got 10"),
        "negative class": (g + ["--class", -1], "InputError: --class"),
        "missing folder": (["generate", "--engines", tmp_path / "nope"], "ArtifactError"),
        "foreign folder": (["generate", "--engines", tmp_path], "ArtifactError"),
        "noise shape": (g + ["--noise", tmp_path / "noise3.npy"], "InputError: noise"),
        "noise NaN": (g + ["--noise", tmp_path / "nan.npy"], "InputError: noise"),
        "uniform:0": (g + ["--schedule", "uniform:0"], "InputError: --schedule"),
        "dp too many": (g + ["--schedule", "dp:21"], "InputError"),
        "schedule N": (g + ["--schedule", tmp_path / "wrong-n.json"], "num_steps"),
        "schedule step": (g + ["--schedule", tmp_path / "late.json"], "InputError"),
        "recompute K": (["schedule", "--engines", engines_dir, "--steps", 5, "--recompute", 6], "InputError"),
        "out is a file": (["generate", "--engines", engines_dir, "--out", tmp_path / "late.json"], "InputError: --out"),
        "cfg NaN": (g + ["--cfg", "nan"], "InputError: --cfg"),
        "cfg Inf": (g + ["--cfg", "inf"], "InputError: --cfg"),
        "cfg out of range": (g + ["--cfg", "-1"], "InputError: --cfg: expected a finite number in [0, 100]"),
        "seed": (g + ["--seed", -3], "InputError: --seed: expected an integer in [0, 9223372036854775807], got -3"),
        "steps": (g + ["--steps", 0], "InputError: --steps: expected an integer >= 1, got 0"),
        "before build": (["generate", "--engines", tmp_path / "engines" / "default"], "build them first"),
    }


def test_bad_input_one_line_nonzero(engines_dir, tmp_path, capsys):
    for name, (argv, expect) in _bad_cases(engines_dir, tmp_path).items():
        code, out, err = run_cli(argv, capsys)
        assert code == 2, name
        assert expect in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)


@pytest.mark.timeout(CHILD_TIMEOUT + 60)
def test_cli_error_subprocess(engines_dir):
    r = subprocess.run([sys.executable, "-m", "cli", "generate", "--engines", str(engines_dir), "--class", "99"],
                       capture_output=True, text=True, timeout=CHILD_TIMEOUT, cwd=Path(cli.__file__).parent)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: InputError: --class: expected a class id in [0, 10), got 99"]
