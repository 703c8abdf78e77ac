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

torch = pytest.importorskip("torch")


def official_sharing_sampler(net, noise, labels, *, num_steps, guidance, interval, last_step, recompute, null):
    """The official stateful_flow_matching EulerSampler._impl_sampling (ODE, simple_guidance_fn), restated in torch."""
    ts = torch.linspace(0.0, 1 - last_step, num_steps)
    ts = torch.cat([ts, torch.tensor([1.0])])
    ts = ts / (ts + (1 - ts) * 1.0)  # timeshift 1.0
    b = noise.shape[0]
    cond = torch.cat([torch.full((b,), null), labels])
    x, state = noise, None
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t_cur
        t = t_cur.repeat(b)
        if i in recompute:
            state = None
        out, state = net(torch.cat([x, x]), t.repeat(2), cond, state)
        scale = guidance if interval[0] < t[0] < interval[1] else 1.0
        u, c = out.chunk(2)
        x = x + (u + scale * (c - u)) * dt
    return x


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
        want = official_sharing_sampler(tiny_engines[1], torch.from_numpy(noise), torch.from_numpy(labels),
                                        num_steps=20, guidance=3.0, interval=(0.3, 1.0), last_step=0.04,
                                        recompute=list(recompute), null=m.null_class).numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"{schedule}: max rel err vs official sampler {rel:.2e}")
    assert rel < 1e-4
    assert len(list((tmp_path / "png").glob("*-class*.png"))) == 3 and (tmp_path / "png" / "preview" / "grid.png").is_file()
    assert "saved" in out


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
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["00000-class0.png", "notes.png", "preview"]
    assert "removed 3 samples of an earlier run" in out + err  # 00000-class2 included


def test_schedule_commands_and_dp_generate(engines_dir, tmp_path, capsys):
    code, out, err = run_cli(["schedule", "--engines", engines_dir, "--steps", 10, "--recompute", 4], capsys)
    assert code == 0, err
    rec = json.loads((engines_dir / "schedule-10-4.json").read_text())
    assert len(rec["recompute_steps"]) == 4 and rec["recompute_steps"][0] == 0 and rec["num_steps"] == 10
    assert rec["sampler"]["num_steps"] == 10 and (engines_dir / "schedule-10-4.png").is_file()
    sim = np.load(engines_dir / "similarity-10.npy")
    assert sim.shape == (10, 10)
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


def _bad_cases(engines_dir, tmp_path):
    np.save(tmp_path / "noise3.npy", np.zeros((2, 3, 8, 8), np.float32))
    nan = np.zeros((2, 4, 8, 8), np.float32)
    nan[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "wrong-n.json").write_text(json.dumps({"recompute_steps": [0, 3], "num_steps": 50}))
    (tmp_path / "late.json").write_text(json.dumps({"recompute_steps": [0, 30]}))
    g = ["generate", "--engines", engines_dir, "--out", tmp_path / "o"]
    return {
        "class": (g + ["--class", 10], "InputError: class"),
        "negative class": (g + ["--class", -1], "InputError: class"),
        "missing folder": (["generate", "--engines", tmp_path / "nope"], "ArtifactError"),
        "foreign folder": (["generate", "--engines", tmp_path], "ArtifactError"),
        "noise shape": (g + ["--noise", tmp_path / "noise3.npy"], "InputError: noise"),
        "noise NaN": (g + ["--noise", tmp_path / "nan.npy"], "InputError: noise"),
        "uniform:0": (g + ["--schedule", "uniform:0"], "InputError: --schedule"),
        "dp too many": (g + ["--schedule", "dp:21"], "InputError"),
        "schedule N": (g + ["--schedule", tmp_path / "wrong-n.json"], "num_steps"),
        "schedule step": (g + ["--schedule", tmp_path / "late.json"], "InputError"),
        "recompute K": (["schedule", "--engines", engines_dir, "--steps", 5, "--recompute", 6], "InputError"),
    }


def test_bad_input_one_line_nonzero(engines_dir, tmp_path, capsys):
    for name, (argv, expect) in _bad_cases(engines_dir, tmp_path).items():
        code, out, err = run_cli(argv, capsys)
        assert code == 2, name
        assert expect in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)


def test_cli_error_subprocess(engines_dir):
    r = subprocess.run([sys.executable, "-m", "cli", "generate", "--engines", str(engines_dir), "--class", "99"],
                       capture_output=True, text=True, timeout=60, cwd=Path(cli.__file__).parent)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: InputError: class: expected in [0, 10), got 99"]
