"""Calibration capture: every step, the full CFG batch, the schedule that will run, bounded rows, a manifest."""
from __future__ import annotations

import numpy as np
import pytest

from ddt_export.builder.calibrate import calibration_inputs, capture, read_calibration, read_classes
from ddt_export.core.errors import ArtifactError, InputError
from ddt_export.runtime.sampling.request import RequestInput
from ddt_export.core.sampling import step_times
from ddt_export.core.specs import DECODER
from engines_cache import fp8_build, run_cli

pytest.importorskip("modelopt.onnx.quantization", reason="the shared FP8 build needs nvidia-modelopt")


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory, official_ckpt):
    return fp8_build(tmp_path_factory, official_ckpt)[0] / "stages" / "fp32"


def test_capture_counts_and_schedule(fp32_dir, tmp_path, tiny_cfg):
    num, steps = 2, tiny_cfg.sampler.num_steps
    _, rec = capture(fp32_dir, tmp_path / "c", RequestInput(num=num, seed=3, schedule="uniform:4", classes=(5, 7)),
                     say=lambda m: None)
    enc = np.load(tmp_path / "c" / "encoder.npz")
    dec = np.load(tmp_path / "c" / "decoder.npz")
    schedule = list(range(0, steps, 4))
    # encoder: only its recompute steps, the 2B batch [uncond; cond]; decoder: every step, 2B rows
    assert rec["graphs"]["encoder"]["rows_captured"] == len(enc["step"]) == len(schedule) * 2 * num
    assert rec["graphs"]["decoder"]["rows_captured"] == len(dec["step"]) == steps * 2 * num
    assert sorted(set(enc["step"].tolist())) == schedule and sorted(set(dec["step"].tolist())) == list(range(steps))
    t, _ = step_times(tiny_cfg.sampler)
    for i in schedule:
        rows = enc["step"] == i
        assert enc["y"][rows].tolist() == [tiny_cfg.model.null_class] * num + [5, 7]
        assert np.all(enc["t"][rows] == t[i])
    assert enc["x"].shape == (len(schedule) * 2 * num, 4, 8, 8) and dec["s"].shape == (steps * 2 * num, 16, 64)
    # decoder x rows are the duplicated latents [x; x] of their step
    first = dec["x"][dec["step"] == 0]
    assert np.array_equal(first[:num], first[num:])
    assert rec["schedule"] == {"spec": "uniform:4", "recompute_steps": schedule} and rec["cond_only_outside"] is False
    assert rec["seed"] == 3 and rec["labels"] == [5, 7]
    src = read_calibration(tmp_path / "c")["source"]
    assert src["precision"] == "fp32" and len(src["graphs"]["decoder"]) == 64


def test_rows_are_subsampled_over_the_whole_trajectory(fp32_dir, tmp_path, tiny_cfg):
    _, rec = capture(fp32_dir, tmp_path / "c", RequestInput(num=2), max_rows=30, say=lambda m: None)
    g = rec["graphs"]["decoder"]
    assert g["rows_captured"] == tiny_cfg.sampler.num_steps * 4 and g["rows_stored"] == 30
    steps = np.load(tmp_path / "c" / "decoder.npz")["step"]
    assert steps.min() == 0 and steps.max() == tiny_cfg.sampler.num_steps - 1
    assert calibration_inputs(tmp_path / "c", DECODER)["s"].shape[0] == 30


def test_tampering_and_wrong_inputs_are_refused(fp32_dir, tmp_path):
    capture(fp32_dir, tmp_path / "c", RequestInput(num=1, steps=4), say=lambda m: None)
    with open(tmp_path / "c" / "decoder.npz", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="calibrate again"):
        read_calibration(tmp_path / "c")
    with pytest.raises(InputError, match="fp32"):
        capture(fp32_dir.parent / "fp16", tmp_path / "d", RequestInput(num=1), say=lambda m: None)


def test_classes_file(tmp_path):
    (tmp_path / "c.txt").write_text("# ids\n1, 2\n3 4  # more\n")
    assert read_classes(tmp_path / "c.txt") == [1, 2, 3, 4]
    np.save(tmp_path / "c.npy", np.array([9, 8]))
    assert read_classes(tmp_path / "c.npy") == [9, 8]
    (tmp_path / "bad.txt").write_text("1 two")
    with pytest.raises(InputError, match="integers"):
        read_classes(tmp_path / "bad.txt")


def test_cli(fp32_dir, tmp_path):
    (tmp_path / "classes.txt").write_text("1 2 3")
    code, text = run_cli(["calibrate", "--engines", fp32_dir, "--num", 3, "--steps", 5, "--schedule", "uniform:2",
                          "--classes", tmp_path / "classes.txt", "--out", tmp_path / "cal"])
    assert code == 0, text
    assert "decoder: 30 of 30 rows" in text and "schedule uniform:2" in text
    assert read_calibration(tmp_path / "cal")["labels"] == [1, 2, 3]
