"""The bundled assets: ddt-tiny-digits weights + config, the digits feature extractor and its reference stats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ddt_export.core.config import PRESETS, Config, load_config

from conftest import train_digits

ASSETS = Path(__file__).resolve().parents[1] / "ddt_export" / "assets"
NAME = "ddt-tiny-digits"
WEIGHTS, CONFIG = ASSETS / f"{NAME}.safetensors", ASSETS / f"{NAME}.json"
FEATURES, STATS = ASSETS / "digits_features.onnx", ASSETS / "digits_stats.npz"
FEATURE_DIM, NUM_CLASSES, IMAGE = 64, 10, (1, 16, 16)
SPATIAL_DIM = 8 * 8 * 7  # the third conv's 8x8 map, its first 7 channels (as ADM's sFID takes Inception's)


def _real_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits, preprocessed as the training scripts do (needs torch and scikit-learn)."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    images, labels = train_digits().load_digits_16()
    return images.numpy(), labels.numpy()


def _session():
    import onnxruntime as ort

    return ort.InferenceSession(str(FEATURES), providers=["CPUExecutionProvider"])


def test_config_json_is_the_preset():
    assert json.loads(CONFIG.read_text()) == json.loads(PRESETS[NAME].to_json())
    assert Config.from_dict(json.loads(CONFIG.read_text())) == PRESETS[NAME]
    assert load_config(CONFIG) == PRESETS[NAME]


def test_weights_load_strict():
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ddt_export.export.model import DDT

    model = DDT(PRESETS[NAME].model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = load_file(str(WEIGHTS))
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    model.load_state_dict(state, strict=True)
    assert WEIGHTS.stat().st_size < 8e6  # "a few MB"
    with safe_open(str(WEIGHTS), "pt") as f:  # the training record travels with the weights
        meta = f.metadata()
    # the architecture it was trained as; the sampler (CFG scale) was tuned afterwards
    assert Config.from_dict(json.loads(meta["config"])).model == PRESETS[NAME].model
    # trained, not the zero-initialised output layer of a fresh official init
    assert state["final_layer.linear.weight"].abs().max() > 0


def test_model_denoises_real_digits():
    """One flow-matching loss evaluation on real digits: far below what an untrained model gets (~1.4)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from ddt_export.export.model import DDT

    images, labels = _real_digits()
    x, y = torch.from_numpy(images[:256]), torch.from_numpy(labels[:256])
    g = torch.Generator().manual_seed(0)
    t, noise = torch.rand(len(x), generator=g), torch.randn(x.shape, generator=g)
    model = DDT(PRESETS[NAME].model)
    model.load_state_dict(load_file(str(WEIGHTS)), strict=True)
    with torch.no_grad():
        tb = t.view(-1, 1, 1, 1)
        loss = (model(tb * x + (1 - tb) * noise, t, y)[0] - (x - noise)).pow(2).mean().item()
    assert loss < 0.4, loss


def test_features_onnx_io():
    sess = _session()
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type) == ("image", "tensor(float)")
    assert isinstance(inp.shape[0], str) and list(inp.shape[1:]) == list(IMAGE)
    outs = {o.name: o for o in sess.get_outputs()}
    assert set(outs) == {"features", "logits", "spatial"}
    assert all(o.type == "tensor(float)" for o in outs.values())
    for batch in (1, 5):
        f, lg, sp = sess.run(["features", "logits", "spatial"], {"image": np.full((batch, *IMAGE), -1.0, np.float32)})
        assert f.shape == (batch, FEATURE_DIM) and f.dtype == np.float32
        assert lg.shape == (batch, NUM_CLASSES) and lg.dtype == np.float32
        assert sp.shape == (batch, SPATIAL_DIM) and sp.dtype == np.float32


def test_spatial_is_the_third_conv_map_first_7_channels_nhwc(tmp_path):
    """`spatial` against the graph's own intermediate tensor, exposed as an extra output and cut in numpy."""
    import onnx

    model = onnx.load(str(FEATURES))
    act = [n for n in model.graph.node if n.op_type == "MaxPool"][1].input[0]  # feeds the second pool
    model.graph.output.append(onnx.helper.make_tensor_value_info(act, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "exposed.onnx"))
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(-1, 1, (6, *IMAGE)).astype(np.float32)
    sp, h = ort.InferenceSession(str(tmp_path / "exposed.onnx"), providers=["CPUExecutionProvider"]).run(
        ["spatial", act], {"image": x})
    assert h.shape == (6, 64, 8, 8)
    np.testing.assert_array_equal(sp, h[:, :7].transpose(0, 2, 3, 1).reshape(6, -1))


def test_features_onnx_classifies_real_digits():
    images, labels = _real_digits()
    f, lg = _session().run(["features", "logits"], {"image": images})
    assert np.isfinite(f).all() and np.isfinite(lg).all()
    assert (lg.argmax(1) == labels).mean() > 0.97  # 80% of them were its training set


def test_stats_shapes_symmetric_psd():
    with np.load(STATS) as z:  # an ADM-style reference batch
        assert set(z.files) == {"mu", "sigma", "mu_s", "sigma_s", "arr_0", "arr_1"}
        st = {k: z[k] for k in z.files}
    for m, s, d in (("mu", "sigma", FEATURE_DIM), ("mu_s", "sigma_s", SPATIAL_DIM)):
        mu, sigma = st[m], st[s]
        assert mu.shape == (d,) and sigma.shape == (d, d)
        assert mu.dtype == np.float64 and sigma.dtype == np.float64
        assert np.array_equal(sigma, sigma.T)
        eig = np.linalg.eigvalsh(sigma)
        assert eig.min() >= -1e-9 * eig.max(), eig.min()
    assert st["arr_0"].shape == (1797, 16, 16, 1) and st["arr_0"].dtype == np.uint8
    assert st["arr_1"].shape == (1797,) and set(st["arr_1"].tolist()) == set(range(NUM_CLASSES))


def test_stats_are_the_real_digits_through_the_onnx():
    images, labels = _real_digits()
    f, sp = (a.astype(np.float64) for a in _session().run(["features", "spatial"], {"image": images}))
    # Tolerances: the statistics were computed once, on one CPU; ONNX Runtime's float32 kernels accumulate in a
    # different order on another CPU (AVX2 vs AVX-512) or thread count, so each feature moves by ~1e-6 relative,
    # and covariance entries near zero (mean-subtracted products that cancel) move by far more relative to
    # themselves (2.5e-5 seen on a fresh machine). So every entry is compared against its matrix's scale, at
    # 1e-4 of it, and the number the statistics exist for, FID against them, must stay within 1e-3.
    from ddt_export.evaluate.fid import Stats, fid

    with np.load(STATS) as z:
        for name, got in (("mu", f.mean(0)), ("sigma", np.cov(f, rowvar=False)), ("mu_s", sp.mean(0)),
                          ("sigma_s", np.cov(sp, rowvar=False))):
            np.testing.assert_allclose(z[name], got, rtol=1e-4, atol=1e-4 * np.abs(z[name]).max(), err_msg=name)
        assert fid(Stats(f.mean(0), np.cov(f, rowvar=False)), Stats(z["mu"], z["sigma"])) < 1e-3
        from ddt_export.core.images import images_from_samples

        np.testing.assert_array_equal(z["arr_0"], images_from_samples(images))  # rounded as samples are
        np.testing.assert_array_equal(z["arr_1"], labels)


@pytest.mark.slow
def test_training_is_deterministic():
    """Two short runs of the training loop from the same seed give bit-identical EMA weights."""
    torch = pytest.importorskip("torch")
    td = train_digits()
    images, labels = td.load_digits_16()
    tc = td.TrainConfig(steps=4, batch=16, warmup=2, max_shift=1, log_every=2)
    runs = [td.train(PRESETS[NAME], images, labels, tc, log=lambda *_: None) for _ in range(2)]
    (a, ha, _), (b, hb, _) = runs
    assert a.keys() == b.keys() and ha == hb
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = td.make_model(PRESETS[NAME], tc.seed).state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a)  # it did train
