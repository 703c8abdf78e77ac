"""FID: the distance against independent formulas, the statistics loaders, the extractors, the `fid` command."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from ddt_export.core.images import images_from_samples
from ddt_export.evaluate import features as X, fid as F
from ddt_export.core.errors import ArtifactError, ConfigError, InputError, NumericsError
from conftest import CHILD_TIMEOUT


# --------------------------------------------------------------------------------------- references


def trace_sqrt_eig(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr sqrt(s1 s2) without sqrtm: s1 s2 is similar to the PSD s1^1/2 s2 s1^1/2; sum of its eigenvalues' roots."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # s1^1/2
    m = r @ s2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def fid_eig(mu1, s1, mu2, s2) -> float:
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_eig(s1, s2))


def gaussian_stats(rng, n: int, d: int, shift: float = 0.0):
    """mu, sigma of n correlated samples in d dims (rank-deficient when n <= d)."""
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    f = rng.standard_normal((n, d)) @ mix + shift
    return f.mean(0), np.cov(f, rowvar=False)


# --------------------------------------------------------------------------------------- distance


def one_blas_thread():
    """sqrtm of 2048x2048 takes ~10 s on one core; multithreaded BLAS on a shared 2-core box can take 50 s."""
    import scipy.linalg  # noqa: F401  loads scipy's own OpenBLAS now: threadpoolctl limits loaded libraries only

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def test_fid_matches_eigen_formula_on_rank_deficient_2048d():
    rng = np.random.default_rng(0)
    mu1, s1 = gaussian_stats(rng, 500, 2048)  # rank <= 499 of 2048 by construction, as 500 Inception features
    mu2, s2 = gaussian_stats(rng, 500, 2048, shift=0.05)
    with one_blas_thread():
        got = F.frechet_distance(mu1, s1, mu2, s2)
        want = fid_eig(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-6)


def test_fid_symmetric_and_zero_for_identical_stats():
    rng = np.random.default_rng(1)
    mu1, s1 = gaussian_stats(rng, 100, 256)  # rank 99 of 256
    mu2, s2 = gaussian_stats(rng, 150, 256, shift=0.1)
    with one_blas_thread():
        ab, ba = F.frechet_distance(mu1, s1, mu2, s2), F.frechet_distance(mu2, s2, mu1, s1)
        assert ab == pytest.approx(ba, rel=1e-8)
        assert ab == pytest.approx(fid_eig(mu1, s1, mu2, s2), rel=1e-7)
        assert abs(F.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)


def test_fid_closed_form_on_diagonal_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.random(64), rng.random(64)
    a[:10] = 0.0  # singular product
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert F.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_fid_eps_offset_when_sqrtm_not_finite(monkeypatch):
    rng = np.random.default_rng(3)
    mu1, s1 = gaussian_stats(rng, 20, 32)
    mu2, s2 = gaussian_stats(rng, 20, 32, shift=0.2)
    real_sqrtm, calls = F._sqrtm, []

    def flaky(a):  # the first (offset-free) product "fails", as near-singular products can
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(F, "_sqrtm", flaky)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        got = F.frechet_distance(mu1, s1, mu2, s2)
    eye = np.eye(32) * F.FID_EPS
    np.testing.assert_allclose(calls[1], (s1 + eye) @ (s2 + eye))
    # the offset enters the sqrt only (the traces keep the raw sigmas), as in pytorch-fid and ADM
    d = mu1 - mu2
    want = d @ d + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_eig(s1 + eye, s2 + eye)
    assert got == pytest.approx(want, rel=1e-7)


def test_fid_large_imaginary_part_is_an_error():
    with pytest.raises(NumericsError, match="imag"):
        F.frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), -np.eye(4))  # not a covariance


def test_fid_probe_against_the_distance_computed_twice():
    """FidProbe against the exact FID(P, D) - FID(R, D) (the distance computed on each set) for P a perturbation of
    R image by image (a shift and a linear map of size eps): the linear prediction's error falls as eps^2 while
    the difference falls as eps; the mean term is exact (a pure shift); the plug-in is exact on the whole set;
    `predict` is the mean of the two."""
    rng = np.random.default_rng(4)
    d, n = 6, 3000
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    r = rng.standard_normal((n, d)) @ mix
    data = F.stats_from_features(rng.standard_normal((n, d)) @ (mix + 0.3 * np.eye(d)) + 0.2)
    ref = F.stats_from_features(r)
    probe = F.fid_probe(ref, data)
    a, b = rng.standard_normal((d, d)), rng.standard_normal(d)

    def exact(p):
        return F.fid(F.stats_from_features(p), data) - F.fid(ref, data)

    errors = []
    for eps in (1e-2, 1e-3):
        p = r + eps * (r @ a + b)
        assert probe.linear(r, p) == pytest.approx(exact(p), rel=20 * eps)
        errors.append(abs(probe.linear(r, p) - exact(p)))
    assert errors[1] < errors[0] / 30  # second order
    shifted = r + 0.05 * b
    assert probe.linear(r, shifted) == pytest.approx(exact(shifted), abs=1e-9)
    big = r + 0.5 * (r @ a + b)  # far outside the linear regime: the plug-in is still exact on the whole set
    assert probe.plugin(r, big) == pytest.approx(exact(big), rel=1e-6)
    assert abs(probe.linear(r, big) - exact(big)) > 0.05 * abs(exact(big))
    assert probe.predict(r[:64], big[:64]) == pytest.approx(
        (probe.linear(r[:64], big[:64]) + probe.plugin(r[:64], big[:64])) / 2)
    with pytest.raises(InputError, match="paired features"):
        probe.linear(r[:5], p[:4])


def test_fid_dimension_mismatch_names_both_shapes():
    with pytest.raises(InputError, match=r"\(3,\).*\(4,\)"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --------------------------------------------------------------------------------------- fakes


def onnx_features_graph(path, c: int, size: int | None, dim: int, seed: int = 0):
    """image (N, c, H, W) -> features (N, dim): a fixed random linear map of the pixels (or of channel means)."""
    rng = np.random.default_rng(seed)
    h = w = size
    nodes, inits = [], []
    if size is None:  # any H, W: channel means -> (N, c)
        nodes.append(helper.make_node("ReduceMean", ["image", "axes"], ["flat"], keepdims=0))
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
        k = c
    else:
        nodes.append(helper.make_node("Flatten", ["image"], ["flat"], axis=1))
        k = c * size * size
    inits.append(numpy_helper.from_array(rng.standard_normal((k, dim)).astype(np.float32), "w"))
    nodes.append(helper.make_node("MatMul", ["flat", "w"], ["features"]))
    inits.append(numpy_helper.from_array(rng.standard_normal((dim, 10)).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", ["features", "head"], ["logits"]))
    graph = helper.make_graph(
        nodes, "fake", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", c, h or "H", w or "W"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dim]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.fixture
def fake_digits(tmp_path, monkeypatch):
    """A digits-shaped feature graph (N, 1, 16, 16) -> (N, 8), installed as the bundled one."""
    path = tmp_path / "digits_features.onnx"
    onnx_features_graph(path, 1, 16, 8)
    monkeypatch.setattr(X, "DIGITS_ONNX", path)
    return path


def digit_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def write_pngs(folder, images: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{i:05d}.png")
    return folder


# --------------------------------------------------------------------------------------- extractors


def test_digits_features_preprocess_and_batching(fake_digits):
    imgs = digit_images(23)
    ex = X.DigitsFeatures(batch=5)  # 23 = 4 * 5 + 3: a ragged last batch
    feats = ex.extract(imgs)
    w = numpy_helper.to_array(onnx.load(str(fake_digits)).graph.initializer[0])
    x = imgs[..., 0].reshape(23, -1).astype(np.float64) / 127.5 - 1.0  # official uint82fp
    assert feats.dtype == np.float64 and feats.shape == (23, 8)
    np.testing.assert_allclose(feats, x @ w, rtol=1e-4, atol=1e-3)
    rgb = np.repeat(imgs, 3, axis=-1)  # gray RGB converts back exactly
    np.testing.assert_array_equal(ex.extract(rgb), feats)
    with pytest.raises(InputError, match="16x16.*8x8"):
        ex.extract(imgs[:, :8, :8])
    with pytest.raises(InputError, match="uint8"):
        ex.extract(imgs.astype(np.float32))


def test_images_from_samples_rounds_like_official_fp2uint8():
    x = np.array([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5]).reshape(1, 1, 1, 6)
    np.testing.assert_array_equal(images_from_samples(x)[0, 0, :, 0], [0, 0, 128, 191, 255, 255])


def test_inception_features_convention_and_stale_graph(tmp_path):
    path = tmp_path / "inception_fid.onnx"
    onnx_features_graph(path, 3, None, X.INCEPTION_DIM)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    feats = X.InceptionFeatures(path).extract(imgs)
    w = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[1])
    np.testing.assert_allclose(feats, (imgs / 255.0).mean(axis=(1, 2)) @ w, rtol=1e-4, atol=1e-4)  # [0,1] RGB
    gray = imgs[..., :1]
    np.testing.assert_allclose(X.InceptionFeatures(path).extract(gray),
                               X.InceptionFeatures(path).extract(np.repeat(gray, 3, -1)))
    (tmp_path / "inception_fid.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match="fid-inception"):
        X.InceptionFeatures(path)


def test_extractor_graph_io_is_checked(tmp_path):
    path = tmp_path / "wrong.onnx"
    onnx_features_graph(path, 3, None, 16)  # 16-d, not 2048
    with pytest.raises(ArtifactError, match="2048"):
        X.InceptionFeatures(path)
    with pytest.raises(ArtifactError, match="no file"):
        X.InceptionFeatures(tmp_path / "missing.onnx")
    with pytest.raises(ConfigError, match="--inception-onnx"):
        X.make_extractor("inception", None)
    with pytest.raises(ConfigError, match="digits | inception"):
        X.make_extractor("clip")


# --------------------------------------------------------------------------------------- loaders


def test_npz_stats_arr0_and_folder_agree(fake_digits, tmp_path):
    imgs = digit_images(23)
    want = F.stats_from_features(X.DigitsFeatures().extract(imgs))
    np.savez(tmp_path / "arr.npz", arr_0=imgs[..., 0])  # (N, H, W): grayscale without a channel axis
    np.savez_compressed(tmp_path / "arrc.npz", arr_0=imgs)
    folder = write_pngs(tmp_path / "samples", imgs)
    (folder / "preview").mkdir()
    Image.new("L", (100, 60)).save(folder / "preview" / "grid.png")  # generate's preview: subfolders not read
    get = X.DigitsFeatures
    for src in (tmp_path / "arr.npz", tmp_path / "arrc.npz", folder):
        got = F.load_stats(src, get, batch=5)
        assert got.n == 23 and got.dim == 8
        np.testing.assert_allclose(got.mu, want.mu, rtol=1e-10)
        np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-10, atol=1e-12)
    want.save(tmp_path / "stats.npz")
    stored = F.load_stats(tmp_path / "stats.npz")  # no extractor needed
    assert stored.n is None
    np.testing.assert_array_equal(stored.sigma, want.sigma)


def test_adm_reference_batch_layout(fake_digits, tmp_path):
    """VIRTUAL_imagenet256_labeled.npz holds arr_0, mu, sigma, mu_s, sigma_s: stored stats unless from_images."""
    imgs = digit_images(12, seed=1)
    ref = tmp_path / "VIRTUAL_digits_labeled.npz"
    mu, sigma = np.arange(8.0), np.eye(8) * 2
    np.savez(ref, arr_0=imgs, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    called = []
    stored = F.load_stats(ref, lambda: called.append(1))
    assert not called and np.array_equal(stored.mu, mu) and np.array_equal(stored.sigma, sigma)
    fresh = F.load_stats(ref, X.DigitsFeatures, from_images=True)
    assert fresh.n == 12


def test_loader_errors(tmp_path):
    np.savez(tmp_path / "odd.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ArtifactError, match=r"keys \['images'\]"):
        F.load_stats(tmp_path / "odd.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ArtifactError, match="uint8"):
        F.load_stats(tmp_path / "float.npz", lambda: None)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="npz"):
        F.load_stats(tmp_path / "bad.npz")
    folder = write_pngs(tmp_path / "mixed", digit_images(3))
    Image.new("L", (8, 8)).save(folder / "00009.png")
    with pytest.raises(InputError, match="00009.png.*16x16.*8x8"):
        list(F.iter_folder_images(folder))
    (folder / "00009.png").write_bytes(b"not a png")  # a file named .png that is not an image
    with pytest.raises(InputError, match="00009.png"):
        list(F.iter_folder_images(folder))
    with pytest.raises(InputError, match="image files"):
        F.image_files((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(InputError, match="N >= 2"):
        F.stats_from_features(np.zeros((1, 8)))


# --------------------------------------------------------------------------------------- the command


def _run(args):
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_fid_prints_the_distance_last(fake_digits, tmp_path):
    rng = np.random.default_rng(5)
    sa = F.Stats(*gaussian_stats(rng, 40, 8))
    sb = F.Stats(*gaussian_stats(rng, 40, 8, shift=0.3))
    sa.save(tmp_path / "a.npz")
    sb.save(tmp_path / "b.npz")
    res = _run(["fid", tmp_path / "a.npz", tmp_path / "b.npz"])
    assert res.exit_code == 0, res.output
    assert float(res.stdout.strip().splitlines()[-1]) == pytest.approx(F.fid(sa, sb), abs=1e-6)

    imgs = digit_images(30, seed=2)
    folder = write_pngs(tmp_path / "pngs", imgs)
    np.savez(tmp_path / "ref.npz", arr_0=np.roll(imgs, 3, axis=2))
    res = _run(["fid", folder, tmp_path / "ref.npz", "--features", "digits", "--batch", "7"])
    assert res.exit_code == 0, res.output
    want = F.fid_from_paths(folder, tmp_path / "ref.npz").value
    assert float(res.stdout.strip().splitlines()[-1]) == pytest.approx(want, rel=1e-6)


def test_cli_fid_errors_are_one_line(tmp_path, capsys):
    import cli

    F.Stats(np.zeros(8), np.eye(8)).save(tmp_path / "a.npz")
    with pytest.raises(SystemExit) as e:
        cli.main(["fid", str(tmp_path / "a.npz"), str(tmp_path), "--features", "inception"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "--inception-onnx" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------- the bundled asset


@pytest.mark.skipif(not (X.DIGITS_ONNX.is_file() and X.DIGITS_STATS.is_file()),
                    reason="ddt_export/assets/digits_features.onnx / digits_stats.npz not built yet "
                           "(scripts/train_digits_features.py)")
def test_bundled_digits_features_on_real_digits():
    pytest.importorskip("sklearn.datasets", reason="real digits come from scikit-learn")
    pytest.importorskip("torch", reason="the digits' 8->16 bilinear upsampling")
    from conftest import train_digits

    x, _ = train_digits().load_digits_16()  # (1797, 1, 16, 16) in [-1, 1], as the model was trained on them
    real = images_from_samples(x.numpy())  # (1797, 16, 16, 1) uint8, as samples are saved
    ref = F.load_stats(X.DIGITS_STATS)
    ex = X.DigitsFeatures()
    real_stats = F.stats_from_features(ex.extract(real))
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    noise_stats = F.stats_from_features(ex.extract(noise))
    assert real_stats.dim == ref.dim
    close, far = F.fid(real_stats, ref), F.fid(noise_stats, ref)
    assert close < 0.01 * far, (close, far)  # uint8 quantization only vs noise


@pytest.mark.timeout(CHILD_TIMEOUT + 60)
def test_fid_command_runs_without_torch(tmp_path):
    """The production install has no PyTorch: `ddt-export fid` must not import it."""
    import subprocess
    import sys

    rng = np.random.default_rng(6)
    F.Stats(*gaussian_stats(rng, 30, 8)).save(tmp_path / "a.npz")
    F.Stats(*gaussian_stats(rng, 30, 8, shift=1.0)).save(tmp_path / "b.npz")
    code = ("import sys; sys.modules['torch'] = None; import cli; "
            f"cli.main(['fid', {str(tmp_path / 'a.npz')!r}, {str(tmp_path / 'b.npz')!r}])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert res.returncode == 0, res.stderr
    want = F.fid(F.load_stats(tmp_path / "a.npz"), F.load_stats(tmp_path / "b.npz"))
    assert float(res.stdout.strip().splitlines()[-1]) == pytest.approx(want, abs=1e-6)
