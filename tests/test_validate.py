"""`validate`: engines against the PyTorch reference and against a second folder, the FID gate, the CLI.

Tiny random models (4x8x8 latents, no VAE: the latents are the images, 8x8 with 3 of their 4 channels) and a
small random ONNX feature graph standing in for the digits/Inception extractors.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ddt_export.core.errors import ArtifactError
from runs import run_export_checkpoint as export_checkpoint
from ddt_export.core.numerics import relative_errors
from runs import run_validate as validate

from conftest import TINY
from engines_cache import run_cli

NUM = 24  # samples per run: FID of 16-d features needs a few more than 16


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny GEMMs: one thread is faster, and far faster on a busy 2-core machine (restored afterwards)."""
    try:
        import torch
    except ImportError:  # the production install: the tests that need torch skip by themselves
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folders(official_ckpt, tmp_path_factory):
    """fp32 and fp16 exports of the official-format Lightning checkpoint (.ckpt + YAML); the manifests point at it."""
    ckpt, yaml, _ = official_ckpt
    root = tmp_path_factory.mktemp("validate")
    export_checkpoint(ckpt, yaml, root / "fp32")
    export_checkpoint(ckpt, yaml, root / "fp16", precision="fp16")
    return root / "fp32", root / "fp16"


def edited_copy(folder: Path, dest: Path, key: str = "source", **changes) -> Path:
    """A copy of an engine folder whose manifest records another `source` (where the weights came from) or
    `provenance` (what they are)."""
    shutil.copytree(folder, dest)
    man = json.loads((dest / "manifest.json").read_text())
    man[key].update(changes)
    (dest / "manifest.json").write_text(json.dumps(man))
    return dest


def test_relative_errors_per_sample():
    b = np.ones((2, 3, 4), np.float32)
    a = b.copy()
    a[1] *= 1.5
    assert relative_errors(a, b).tolist() == pytest.approx([0.0, 0.5])


def test_fp32_engines_match_torch_official_checkpoint(folders, official_ckpt, features, tmp_path):
    ckpt = official_ckpt[0]
    rep = validate(folders[0], reference="torch", num=NUM, seed=1, features=features, max_fid_delta=1e-3,
                   out=tmp_path, batch=10, say=lambda m: None)
    assert rep["reference"] == {"kind": "torch", "precision": "fp32", "backend": "torch-eager-fp32 (official loop)",
                                "checkpoint": str(ckpt.resolve())}
    err = rep["latent_rel_err"]
    assert err["max"] < 1e-4 and err["mean"] <= err["p99"] <= err["max"]
    assert len(err["per_sample"]) == NUM
    for graph in ("encoder", "decoder"):
        p = rep["parity"][graph]
        assert p["within_tolerance"] and p["max_rel_err"] < 1e-4 and p["step"] == TINY.sampler.num_steps // 2
    assert abs(rep["fid"]["engine_vs_reference"]) < 1e-3
    assert rep["fid"]["delta_definition"] == "FID(engine, reference)" and rep["fid"]["gate"]["passed"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["latent_rel_err"]["max"] == err["max"]
    from PIL import Image

    with Image.open(tmp_path / "side_by_side.png") as im:  # pairs of rows (engine above reference) of 16 samples
        assert im.mode == "RGB" and im.width >= 512 and im.height > im.width / 8


def test_dp_schedule_on_both_sides(folders, features):
    rep = validate(folders[0], num=NUM, seed=0, schedule="dp:5", features=features, say=lambda m: None)
    assert len(rep["schedule"]["recompute_steps"]) == 5 and rep["latent_rel_err"]["max"] < 1e-4


def test_fp16_vs_fp32_folder_bounded_and_gate(folders, features, tmp_path, monkeypatch):
    fp32, fp16 = folders
    rep = validate(fp16, reference=fp32, num=NUM, seed=1, schedule="uniform:2", features=features,
                   max_fid_delta=10.0, say=lambda m: None)
    err = rep["latent_rel_err"]
    assert 1e-5 < err["mean"] and err["max"] < 5e-2, err
    assert rep["reference"] == {"kind": "engines", "path": str(fp32), "precision": "fp32",
                                "backend": rep["reference"]["backend"]}
    assert rep["schedule"]["recompute_steps"] == list(range(0, 20, 2))
    assert all(p["within_tolerance"] for p in rep["parity"].values())
    fid_value = rep["fid"]["engine_vs_reference"]
    assert rep["fid"]["gate"]["passed"] and 0 < fid_value < 1.0
    # the same run with a bound below the measured delta: exit 2, one line, no traceback, report still written
    import ddt_export.evaluate.validate as V

    monkeypatch.setattr(V, "choose_features", lambda *a: (features, ""))  # the CLI knows digits/inception only
    code, text = run_cli(["validate", "--engines", fp16, "--reference", fp32, "--num", NUM, "--seed", 1,
                          "--schedule", "uniform:2", "--max-fid-delta", f"{fid_value / 2:.3e}", "--out", tmp_path])
    assert code == 2, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert "Traceback" not in text and len(lines) == 1 and lines[0].startswith("error: NumericsError: FID delta")
    assert json.loads((tmp_path / "report.json").read_text())["fid"]["gate"]["passed"] is False


def test_foreign_reference_refused(folders, features, tmp_path):
    foreign = edited_copy(folders[1], tmp_path / "foreign", "provenance", weights="0" * 64)
    with pytest.raises(ArtifactError, match="same model"):
        validate(folders[0], reference=foreign, num=NUM, features=features, say=lambda m: None)
    code, text = run_cli(["validate", "--engines", folders[0], "--reference", foreign, "--num", NUM])
    assert code == 2 and "ArtifactError" in text and "Traceback" not in text


def test_torch_reference_must_be_rebuildable(folders, official_ckpt, features, tmp_path):
    gone = edited_copy(folders[0], tmp_path / "gone", path=str(tmp_path / "deleted.ckpt"))
    with pytest.raises(ArtifactError, match="--reference torch.*checkpoint on this machine"):
        validate(gone, num=NUM, features=features, say=lambda m: None)
    changed = tmp_path / "changed.ckpt"
    changed.write_bytes(official_ckpt[0].read_bytes() + b"\0")
    stale = edited_copy(folders[0], tmp_path / "stale", path=str(changed))
    with pytest.raises(ArtifactError, match="changed since the export"):
        validate(stale, num=NUM, features=features, say=lambda m: None)


def test_cli_validate_without_features_reports_latents(folders, tmp_path):
    code, text = run_cli(["validate", "--engines", folders[0], "--num", 4, "--out", tmp_path])
    assert code == 0, text
    rep = json.loads((tmp_path / "report.json").read_text())
    assert "skipped" in rep["fid"] and rep["latent_rel_err"]["max"] < 1e-4
    assert "FID skipped" in text


def test_adm_section_and_precision_recall_gates(folders, features, tmp_path, monkeypatch):
    """ADM's numbers for both sides and their deltas; against data with images (arr_0) precision and recall are
    each side's against the data; the ratio gates pass, fail (exit 2, one line, report written) and refuse to
    start on statistics without images."""
    from ddt_export.core.errors import ConfigError, NumericsError
    import ddt_export.evaluate.validate as V

    fp32, fp16 = folders
    data = np.random.default_rng(3).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", arr_0=data)
    monkeypatch.setattr(V, "choose_features", lambda *a: (features, ""))  # the CLI knows digits/inception only
    common = ["validate", "--engines", fp16, "--reference", fp32, "--num", NUM, "--seed", 2,
              "--stats", tmp_path / "data.npz"]
    code, text = run_cli(common + ["--min-precision-ratio", 0.5, "--min-recall-ratio", 0.5, "--out", tmp_path / "w"])
    assert code == 0, text
    assert "ADM metrics against" in text and "Precision: engine" in text and "gate recall(engine)" in text
    rep = json.loads((tmp_path / "w" / "report.json").read_text())
    adm = rep["adm"]
    assert "data.npz: 40 images" in adm["against"]
    for side in ("engine", "reference"):
        s = adm[side]
        assert s["fid"] == pytest.approx(rep["fid"][f"{side}_vs_data"], rel=1e-9)  # the same FID as the FID section
        assert 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1 and s["n_samples"] == NUM
        assert s["inception_score"] is None and "no `logits`" in s["skipped"]["inception_score"]  # tiny graph
        assert s["sfid"] is None
    assert adm["delta"]["fid"] == pytest.approx(rep["fid"]["delta"], rel=1e-9)
    assert adm["delta"]["precision"] == pytest.approx(adm["engine"]["precision"] - adm["reference"]["precision"])
    for k in ("precision", "recall"):
        g = adm["gates"][k]
        assert g["ratio"] == pytest.approx(adm["engine"][k] / adm["reference"][k]) and g["passed"], g

    # no data statistics: the reference samples are the reference batch, so the reference side is 1 and 1 by
    # definition and a recall ratio of 1.5 cannot pass; the report is written before the error
    with pytest.raises(NumericsError, match="precision/recall gate.*recall\\(engine\\) / recall\\(reference\\)"):
        validate(fp16, reference=fp32, num=NUM, seed=2, features=features, min_recall_ratio=1.5,
                 out=tmp_path / "nodata", say=lambda m: None)
    ref_side = json.loads((tmp_path / "nodata" / "report.json").read_text())["adm"]["reference"]
    assert ref_side["precision"] == 1.0 and ref_side["recall"] == 1.0
    assert ref_side["fid"] == pytest.approx(0.0, abs=1e-6)

    f = features.extract(data)
    np.savez(tmp_path / "stats.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    with pytest.raises(ConfigError, match="--min-recall-ratio.*arr_0"):  # before any sampling
        validate(fp16, reference=fp32, num=NUM, features=features, stats=tmp_path / "stats.npz",
                 min_recall_ratio=0.9, say=lambda m: None)

    code, text = run_cli(common + ["--min-precision-ratio", 2, "--out", tmp_path / "v"])
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in text and len(errors) == 1, text
    assert errors[0].startswith("error: NumericsError: precision/recall gate") and \
        "precision(engine) / precision(reference) = 1 < 2" in errors[0], text
    saved = json.loads((tmp_path / "v" / "report.json").read_text())["adm"]
    assert saved["gates"]["precision"]["passed"] is False and saved["gates"]["precision"]["min"] == 2
    code, text = run_cli(["validate", "--engines", fp16, "--min-recall-ratio", "nan"])
    assert code == 2 and "--min-recall-ratio" in text
