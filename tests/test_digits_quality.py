"""The done-when check of the bundled model: on a fresh install, `build --precision fp16` with no other argument,
then the torch-free host loop, draws digits that an independent classifier reads as the requested class.

The classifier is not the project's feature extractor: an RBF SVC (scikit-learn) fit on the real digits'
16x16 pixels (80/20 stratified split; its held-out accuracy is checked too). 40 samples, 4 per class.
`validate` then runs end to end on the same engines with every default of the digits model.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the bundled model's build needs the [export] extra (torch)")

from ddt_export.core.config import bundled_weights, load_config  # noqa: E402

from conftest import train_digits  # noqa: E402
from engines_cache import run_cli  # noqa: E402
pytest.importorskip("sklearn", reason="the independent classifier is scikit-learn's SVC")

CFG = load_config(None)
pytestmark = pytest.mark.skipif(bundled_weights(CFG) is None,
                                reason=f"bundled weights ddt_export/assets/{CFG.name}.safetensors not present")
PER_CLASS = 4  # 40 samples: the test stays under 30 s on 2 cores; benchmarks/fid_digits/ measures 500+
MIN_RECOGNIZED = 0.90


@pytest.fixture(scope="module")
def fp16_default(digits_engines):
    """`ddt-export build --precision fp16` with no checkpoint: the bundled model (built once per session)."""
    return digits_engines


def test_default_model_draws_recognizable_digits(fp16_default):
    from ddt_export.core.images import images_from_samples
    from runs import run_generate as generate

    td = train_digits()
    clf, held_out = td.fit_classifier(*td.load_digits_16())  # RBF SVC, 80/20 stratified split, seed 0
    assert held_out >= 0.97, held_out

    res = generate(fp16_default, num=CFG.model.num_classes * PER_CLASS, seed=7, say=lambda m: None)
    assert res.sampler.num_steps == CFG.sampler.num_steps and res.schedule_spec == "all"
    samples = np.clip(res.latents, -1.0, 1.0).reshape(len(res.latents), -1)
    recognized = float((clf.predict(samples) == res.labels).mean())
    print(f"held-out accuracy {held_out:.4f}; generated recognized as requested {recognized:.4f}")
    assert recognized >= MIN_RECOGNIZED, recognized
    # bright strokes on a dark background, like the data (real digits: mean 78, 44% of pixels < 30, 11% > 200)
    u8 = images_from_samples(res.latents)
    print(f"generated: mean {u8.mean():.1f}, dark {(u8 < 30).mean():.2f}, bright {(u8 > 200).mean():.2f}")
    assert 50 < u8.mean() < 110 and (u8 < 30).mean() > 0.3 and (u8 > 200).mean() > 0.05


def test_validate_end_to_end_on_the_default_model(fp16_default, tmp_path):
    """`ddt-export validate` on the digits model with its defaults: PyTorch fp32 reference rebuilt from the bundled
    weights, digits features, the bundled statistics of the real digits; the gate passes at a loose bound."""
    import json

    code, text = run_cli(["validate", "--engines", fp16_default, "--num", 20, "--max-fid-delta", 5.0,
                          "--min-precision-ratio", 0.8, "--min-recall-ratio", 0.8, "--out", tmp_path / "val"])
    assert code == 0, text
    rep = json.loads((tmp_path / "val" / "report.json").read_text())
    adm = rep["adm"]  # all five for both sides against the real digits (the bundled reference batch has arr_0)
    for side in ("engine", "reference"):
        assert adm[side]["skipped"] == {} and all(adm[side][k] is not None for k in
                                                  ("inception_score", "fid", "sfid", "precision", "recall"))
        assert adm[side]["inception_score"] > 5  # ten classes, drawn recognizably
    assert adm["gates"]["precision"]["passed"] and adm["gates"]["recall"]["passed"]
    assert "Recall: engine" in text and "gate precision(engine) / precision(reference)" in text
    assert rep["num"] == 20 and rep["fid"]["features"] == "digits"
    assert rep["fid"]["stats"].endswith("digits_stats.npz") and rep["fid"]["gate"]["passed"]
    assert rep["latent_rel_err"]["max"] < 1e-2  # fp16 engines vs fp32 PyTorch (measured 1.4e-3 at 200 samples)
    assert rep["parity"]["encoder"]["within_tolerance"] and rep["parity"]["decoder"]["within_tolerance"]
    assert (tmp_path / "val" / "side_by_side.png").is_file()


def test_evaluate_a_digits_sample_folder(fp16_default, tmp_path):
    """`ddt-export evaluate` on a folder written by `generate`, against the bundled reference batch: five numbers."""
    import json

    code, text = run_cli(["generate", "--engines", fp16_default, "--num", 40, "--seed", 3, "--out", tmp_path / "s"])
    assert code == 0, text
    from ddt_export.evaluate.features import DIGITS_STATS

    code, text = run_cli(["evaluate", tmp_path / "s", DIGITS_STATS, "--json", tmp_path / "adm.json"])
    assert code == 0, text
    rec = json.loads((tmp_path / "adm.json").read_text())
    assert rec["skipped"] == {} and rec["n_samples"] == 40 and rec["n_reference"] == 1797
    assert 5 < rec["inception_score"] <= 10 and rec["reference_inception_score"] > 9  # 10 classes at most
    assert 0.5 < rec["precision"] <= 1 and 0.3 < rec["recall"] <= 1
    for label in ("Inception Score", "FID", "sFID", "Precision", "Recall"):
        assert f"{label}: " in text
