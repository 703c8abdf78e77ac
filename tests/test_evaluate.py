"""`ddt-export evaluate` and evaluate.suite: ADM's five numbers over folders and .npz batches, checked against the
independent restatements (tests/test_adm.py, tests/test_fid.py) on a small fixed random feature graph with the
three outputs (`features`, `spatial`, `logits`); stored statistics; skipped metrics and why; the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ddt_export.core.errors import ArtifactError, ConfigError, InputError
from ddt_export.evaluate import features as X, suite as S

from engines_cache import run_cli
from references.adm import ref_inception_score, ref_precision_recall
from test_fid import digit_images, fid_eig, one_blas_thread, write_pngs

DIM, SPATIAL, CLASSES = 8, 12, 10


def three_output_graph(path, outputs=("features", "spatial", "logits"), seed: int = 0):
    """image (N, 1, 16, 16) -> features = x W (N, 8), spatial = x V (N, 12), logits = features H (N, 10)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((256, DIM)).astype(np.float32) / 16
    v = rng.standard_normal((256, SPATIAL)).astype(np.float32) / 16
    h = rng.standard_normal((DIM, CLASSES)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["features"]),
             helper.make_node("MatMul", ["flat", "v"], ["spatial"]),
             helper.make_node("MatMul", ["features", "h"], ["logits"])]
    shapes = {"features": DIM, "spatial": SPATIAL, "logits": CLASSES}
    graph = helper.make_graph(
        nodes, "three", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", shapes[o]]) for o in outputs],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (v, "v"), (h, "h"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return w.astype(np.float64), v.astype(np.float64), h.astype(np.float64)


@pytest.fixture
def graph(tmp_path, monkeypatch):
    """The three-output graph installed as the bundled digits extractor; returns its weights."""
    path = tmp_path / "digits_features.onnx"
    weights = three_output_graph(path)
    monkeypatch.setattr(X, "DIGITS_ONNX", path)
    return weights


def by_hand(images: np.ndarray, weights) -> dict:
    """features, spatial, logits of uint8 (N, 16, 16, 1) images in float64, from the weights."""
    w, v, h = weights
    x = images[..., 0].reshape(len(images), -1).astype(np.float64) / 127.5 - 1.0  # official uint82fp
    return {"features": x @ w, "spatial": x @ v, "logits": x @ w @ h}


def fid_of(a: np.ndarray, b: np.ndarray) -> float:
    return fid_eig(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def test_folder_vs_npz_matches_the_restatements(graph, tmp_path):
    samples, ref = digit_images(37, seed=1), digit_images(45, seed=2)
    ref[:20] = samples[:20]  # some overlap, so precision and recall are strictly between 0 and 1
    folder = write_pngs(tmp_path / "samples", samples)
    np.savez(tmp_path / "ref.npz", arr_0=ref, arr_1=np.arange(45) % 10)
    res = S.evaluate_paths(folder, tmp_path / "ref.npz", batch=10)  # 37 = 3 * 10 + 7: ragged batches
    got, a, b = res.numbers, by_hand(samples, graph), by_hand(ref, graph)
    assert got["inception_score"] == pytest.approx(ref_inception_score(a["logits"]), rel=1e-5)
    assert got["inception_score_splits"] == 1 and got["is_split_size"] == 5000
    assert got["reference_inception_score"] == pytest.approx(ref_inception_score(b["logits"]), rel=1e-5)
    assert got["fid"] == pytest.approx(fid_of(a["features"], b["features"]), rel=1e-4)
    assert got["sfid"] == pytest.approx(fid_of(a["spatial"], b["spatial"]), rel=1e-4)
    assert (got["precision"], got["recall"]) == pytest.approx(ref_precision_recall(b["features"], a["features"]))
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1
    assert got["skipped"] == {} and got["n_samples"] == 37 and got["n_reference"] == 45


def test_npz_vs_npz_reference_with_stored_statistics(graph, tmp_path):
    """ADM's reference batch layout: arr_0 plus mu/sigma and mu_s/sigma_s. The stored statistics are used for
    FID and sFID (here deliberately not the images' own), arr_0 for precision and recall."""
    samples, ref = digit_images(30, seed=3), digit_images(40, seed=4)
    rng = np.random.default_rng(0)
    mu, mu_s = rng.standard_normal(DIM), rng.standard_normal(SPATIAL)
    sigma, sigma_s = np.eye(DIM) * 0.5, np.eye(SPATIAL) * 0.2
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.arange(30) % 10)  # generate --format npz layout
    np.savez(tmp_path / "ref.npz", arr_0=ref, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    res = S.evaluate_paths(tmp_path / "samples.npz", tmp_path / "ref.npz")
    a, b = by_hand(samples, graph), by_hand(ref, graph)
    fa, sa = a["features"], a["spatial"]
    assert res.numbers["fid"] == pytest.approx(fid_eig(fa.mean(0), np.cov(fa, rowvar=False), mu, sigma), rel=1e-4)
    assert res.numbers["sfid"] == pytest.approx(fid_eig(sa.mean(0), np.cov(sa, rowvar=False), mu_s, sigma_s),
                                                rel=1e-4)
    assert (res.numbers["precision"], res.numbers["recall"]) == pytest.approx(
        ref_precision_recall(b["features"], fa))
    assert "stored mu/sigma" in res.reference.describe() and "stored mu_s/sigma_s" in res.reference.describe()
    again = S.evaluate_paths(tmp_path / "samples.npz", tmp_path / "ref.npz", from_images=True)  # from arr_0
    assert again.numbers["fid"] == pytest.approx(fid_of(fa, b["features"]), rel=1e-4)


def test_statistics_only_reference_skips_precision_recall(graph, tmp_path):
    samples = digit_images(30, seed=5)
    f = by_hand(digit_images(50, seed=6), graph)["features"]
    np.savez(tmp_path / "stats.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))  # no arr_0, no mu_s
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    got = S.evaluate_paths(tmp_path / "samples.npz", tmp_path / "stats.npz").numbers
    assert got["fid"] == pytest.approx(fid_of(by_hand(samples, graph)["features"], f), rel=1e-4)
    assert got["inception_score"] > 1
    for k in ("precision", "recall", "sfid", "reference_inception_score"):
        assert got[k] is None and "stats.npz" in got["skipped"][k], k
    assert "arr_0" in got["skipped"]["precision"] and "mu_s" in got["skipped"]["sfid"]
    lines = S.format_numbers(got)
    assert [ln.split(":")[0] for ln in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert lines[3].startswith("Precision: skipped (needs the images of both sides")


def test_graph_without_spatial_and_logits(tmp_path, monkeypatch):
    """An extractor with `features` only (an Inception graph exported before the ADM outputs): FID, precision and
    recall; IS and sFID skipped, saying which output is missing."""
    path = tmp_path / "old.onnx"
    three_output_graph(path, outputs=("features",))
    monkeypatch.setattr(X, "DIGITS_ONNX", path)
    write_pngs(tmp_path / "a", digit_images(20, seed=7))
    write_pngs(tmp_path / "b", digit_images(20, seed=8))
    got = S.evaluate_paths(tmp_path / "a", tmp_path / "b").numbers
    assert got["fid"] > 0 and got["precision"] is not None and got["recall"] is not None
    assert "no `logits` output" in got["skipped"]["inception_score"]
    assert "no `spatial` output" in got["skipped"]["sfid"]


def test_input_errors(graph, tmp_path):
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    with pytest.raises(ArtifactError, match="arr_0"):
        S.evaluate_paths(tmp_path / "junk.npz", tmp_path / "junk.npz")
    with pytest.raises(InputError, match="folder of images"):
        S.evaluate_paths(tmp_path / "missing.npz", tmp_path / "junk.npz")
    with pytest.raises(ConfigError, match="digits | inception"):
        S.evaluate_paths(tmp_path, tmp_path, features="clip")
    np.savez(tmp_path / "three.npz", arr_0=digit_images(3))
    np.savez(tmp_path / "ten.npz", arr_0=digit_images(10))
    with pytest.raises(InputError, match="N >= 4"):  # k = 3 neighbours besides self
        S.evaluate_paths(tmp_path / "three.npz", tmp_path / "ten.npz")


def test_cli_evaluate_prints_five_numbers_and_json(graph, tmp_path):
    folder = write_pngs(tmp_path / "samples", digit_images(24, seed=9))
    np.savez(tmp_path / "ref.npz", arr_0=digit_images(30, seed=10))
    code, text = run_cli(["evaluate", folder, tmp_path / "ref.npz", "--json", tmp_path / "out.json"])
    assert code == 0, text
    rec = json.loads((tmp_path / "out.json").read_text())
    for label, key in (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                       ("Precision", "precision"), ("Recall", "recall")):
        assert f"{label}: {rec[key]:.4f}" in text, (label, text)
    assert rec["features"] == "digits" and rec["n_samples"] == 24
    code, text = run_cli(["evaluate", folder, tmp_path / "nothing.npz"])
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: InputError") and "Traceback" not in text


@pytest.mark.slow  # ~20-40 s: sqrtm of a singular 2048 x 2048 product, twice; the digits twin above is fast
def test_cli_inception_graph_without_adm_outputs(tmp_path):
    """An inception_fid.onnx exported before `spatial`/`logits`: FID, precision and recall; IS and sFID skipped,
    telling the user to export it again."""
    w = np.random.default_rng(12).standard_normal((3, X.INCEPTION_DIM)).astype(np.float32)
    graph = helper.make_graph(  # channel means -> a random 2048-d projection; `features` only
        [helper.make_node("ReduceMean", ["image", "axes"], ["m"], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["features"])], "old_inception",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", X.INCEPTION_DIM])],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"), numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
              str(tmp_path / "inception_fid.onnx"))
    rng = np.random.default_rng(11)
    np.savez(tmp_path / "a.npz", arr_0=rng.integers(0, 256, (12, 20, 24, 3), dtype=np.uint8))
    np.savez(tmp_path / "b.npz", arr_0=rng.integers(0, 256, (14, 20, 24, 3), dtype=np.uint8))
    with one_blas_thread():  # sqrtm of 2048 x 2048
        code, text = run_cli(["evaluate", tmp_path / "a.npz", tmp_path / "b.npz", "--features", "inception",
                              "--inception-onnx", tmp_path / "inception_fid.onnx", "--json", tmp_path / "o.json"])
    assert code == 0, text
    rec = json.loads((tmp_path / "o.json").read_text())
    assert rec["fid"] is not None and rec["precision"] is not None and rec["recall"] is not None
    assert rec["inception_score"] is None and rec["sfid"] is None
    assert "export it again with `ddt-export fid-inception`" in rec["skipped"]["inception_score"]
    assert "Inception Score: skipped" in text and "sFID: skipped" in text


def write_streamed_npz(path, images: np.ndarray, labels: np.ndarray):
    """`generate --format npz`'s layout, written the way its assembler writes it (restated here, not imported):
    an uncompressed zip of ZIP64 entries `arr_0.npy` uint8 (N, H, W, C) and `arr_1.npy` int64 (N,), npy 1.0."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in (("arr_0.npy", images.astype(np.uint8)), ("arr_1.npy", labels.astype(np.int64))):
            with zf.open(name, "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(a.dtype),
                                                         "fortran_order": False, "shape": a.shape})
                f.write(np.ascontiguousarray(a).tobytes())
    return path


def test_cli_evaluate_generated_npz_layout_against_a_digits_reference_npz(tmp_path):
    """Done-when: `evaluate` on an npz sample batch (generate --format npz's layout) against an npz reference
    (the bundled extractor; stored mu/sigma, mu_s/sigma_s and arr_0), each number against the restatements with
    the features taken straight from onnxruntime."""
    import onnxruntime

    with np.load(X.DIGITS_STATS) as z:
        real, stored = z["arr_0"], {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    rng = np.random.default_rng(13)
    ref = real[rng.choice(len(real), 300, replace=False)]
    samples = np.roll(real[rng.choice(len(real), 60, replace=False)], 1, axis=2)  # shifted a pixel right
    samples = np.clip(samples.astype(np.int16) + rng.integers(-40, 41, samples.shape), 0, 255).astype(np.uint8)
    write_streamed_npz(tmp_path / "samples.npz", samples, np.arange(60) % 10)
    np.savez(tmp_path / "ref.npz", arr_0=ref, **stored)
    code, text = run_cli(["evaluate", tmp_path / "samples.npz", tmp_path / "ref.npz", "--json", tmp_path / "o.json"])
    assert code == 0, text
    rec = json.loads((tmp_path / "o.json").read_text())

    sess = onnxruntime.InferenceSession(str(X.DIGITS_ONNX), providers=["CPUExecutionProvider"])  # independent

    def acts(u8):
        x = (u8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - 1).astype(np.float32)
        return {k: v.astype(np.float64) for k, v in zip(("features", "spatial", "logits"),
                                                          sess.run(["features", "spatial", "logits"], {"image": x}))}

    a, b = acts(samples), acts(ref)
    fa, sa = a["features"], a["spatial"]
    want_fid = fid_eig(fa.mean(0), np.cov(fa, rowvar=False), stored["mu"], stored["sigma"])
    want_sfid = fid_eig(sa.mean(0), np.cov(sa, rowvar=False), stored["mu_s"], stored["sigma_s"])
    assert rec["inception_score"] == pytest.approx(ref_inception_score(a["logits"]), rel=1e-5)
    assert rec["fid"] == pytest.approx(want_fid, rel=1e-4) and rec["sfid"] == pytest.approx(want_sfid, rel=1e-4)
    assert (rec["precision"], rec["recall"]) == pytest.approx(ref_precision_recall(b["features"], fa), abs=1e-12)
    assert 0 < rec["precision"] < 1 and 0 < rec["recall"] < 1, rec  # the perturbation is visible to both
    assert rec["skipped"] == {} and rec["n_samples"] == 60 and rec["n_reference"] == 300
    for label, key in (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                       ("Precision", "precision"), ("Recall", "recall")):
        assert f"{label}: {rec[key]:.4f}" in text, (label, text)
    np.savez(tmp_path / "plain.npz", arr_0=samples, arr_1=np.arange(60) % 10)  # np.savez's layout: the same numbers
    code, text = run_cli(["evaluate", tmp_path / "plain.npz", tmp_path / "ref.npz", "--json", tmp_path / "p.json"])
    assert code == 0, text
    plain = json.loads((tmp_path / "p.json").read_text())
    assert all(plain[k] == rec[k] for k in S.METRICS)
