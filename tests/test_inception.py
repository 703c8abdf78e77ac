"""FID Inception-v3 without torchvision: checkpoint keys, strict loading, the ONNX export against PyTorch."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Inception export needs the [export] extra (torch)")

from ddt_export.export import inception as I  # noqa: E402
from ddt_export.core.errors import CheckpointError  # noqa: E402
from ddt_export.evaluate.features import InceptionFeatures  # noqa: E402

SMALL = 139  # same graph as 299 at ~1/4 of the compute; Mixed_7c still sees 3x3 maps, so its pools matter


def randomized(size: int = I.FID_SIZE, seed: int = 0) -> I.FIDInceptionV3:
    """Random convs and BN affines; BN statistics from one batch, so activations stay O(1) through 94 layers."""
    torch.manual_seed(seed)
    m = I.FIDInceptionV3(size=size)
    g = torch.Generator().manual_seed(seed)
    for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
        bn.weight.data = 0.5 + torch.rand(bn.weight.shape, generator=g)
        bn.bias.data = 0.2 * torch.randn(bn.bias.shape, generator=g)
        bn.momentum = None  # running stats = this batch's
    with torch.no_grad():
        m.train()(torch.rand(8, 3, 64, 64, generator=g))
    return m.eval()


@pytest.fixture(scope="module")
def small_model() -> I.FIDInceptionV3:
    return randomized(SMALL)


def test_state_dict_has_the_pytorch_fid_keys():
    sd = I.FIDInceptionV3().state_dict()
    params = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(params) == 472  # 94 conv (1 weight each) + 94 BN (4 each) + fc weight and bias
    shapes = {  # spot checks of torchvision's Inception3(num_classes=1008, aux_logits=False) names
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert not any(k.startswith("AuxLogits") for k in sd)
    # torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696), plus 8 classes (16,392)
    assert sum(p.numel() for p in I.FIDInceptionV3().parameters()) == 23_850_960


def test_strict_loading_lists_every_mismatch(tmp_path):
    src = I.FIDInceptionV3()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}  # as old files
    good = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, good)
    dst = I.FIDInceptionV3()
    info = I.load_fid_weights(dst, good)
    assert not info["official"] and len(info["sha256"]) == 64  # not the real file: its sha256 differs
    assert all(torch.equal(a, b) for a, b in zip(src.parameters(), dst.parameters()))

    bad = dict(sd)
    del bad["Mixed_6c.branch7x7_2.bn.running_mean"]
    bad["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    bad["Mixed_7b.branch_pool.conv.weight"] = torch.zeros(192, 1280, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        I.load_fid_weights(I.FIDInceptionV3(), tmp_path / "bad.pth")
    msg = str(e.value)
    assert "1 missing: Mixed_6c.branch7x7_2.bn.running_mean" in msg  # the one strict check's wording
    assert "1 unexpected: AuxLogits.fc.weight" in msg
    assert "1 shape (file vs model): Mixed_7b.branch_pool.conv.weight (192, 1280, 3, 3) vs (192, 1280, 1, 1)" in msg

    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="state dict"):
        I.load_fid_weights(I.FIDInceptionV3(), tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="no file"):
        I.load_fid_weights(I.FIDInceptionV3(), tmp_path / "missing.pth")


def test_fid_patches_are_in_the_forward(small_model):
    """count_include_pad=False average pools and Mixed_7c's max pool: changing either changes the features."""
    m = small_model
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        ref = m(x)
        alt = copy.deepcopy(m)
        alt.Mixed_7c.max_pool = False
        assert (alt(x) - ref).abs().max() > 1e-2 * ref.abs().max()
        y = torch.rand(1, 4, 5, 5)
        pooled = I._tf_avg_pool(y)
        assert torch.allclose(pooled[..., 0, 0], y[..., :2, :2].mean(dim=(2, 3)))  # corner: 4 real inputs


def test_onnx_export_matches_torch(small_model, tmp_path):
    m = small_model
    out = tmp_path / "fid"
    path = I.export_inception(None, out, model=m)
    assert sorted(p.name for p in out.iterdir()) == [I.INFO_NAME, I.ONNX_NAME]  # no partial files left
    info = json.loads((out / I.INFO_NAME).read_text())
    assert info["parity"]["max_rel_err"] <= info["parity"]["tol"] <= I.PARITY_TOL + 4 * 1e-3

    # the torch-free extractor on another batch and size (dynamic N, H, W): uint8 NHWC -> /255 NCHW on the host,
    # the rest in the graph. (A wrong pool in Mixed_7c moves features by > 1e-2: test_fid_patches_are_in_the_forward.)
    u8 = np.random.default_rng(1).integers(0, 256, (3, 48, 37, 3), dtype=np.uint8)
    feats = InceptionFeatures(path, batch=2).extract(u8)
    with torch.no_grad():
        want = m(torch.from_numpy(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255)).double().numpy()
    assert feats.shape == (3, I.FID_DIM)
    assert np.abs(feats - want).max() <= 1e-3 * np.abs(want).max()  # fp32 rounding, amplified by random weights


def test_adm_outputs_match_the_rebuild(small_model, tmp_path):
    """`spatial` and `logits` of the exported graph against the PyTorch rebuild taken apart independently: a forward
    hook on Mixed_6d.branch1x1 (TF's mixed_6/conv) during the plain pool_3 forward, cut to its first 7 channels and
    flattened NHWC as ADM does; logits = pool_3 @ fc.weight.T without fc.bias (ADM's softmax/logits/MatMul)."""
    m = copy.deepcopy(small_model)
    with torch.no_grad():  # a non-zero bias, so that leaving it out is visible
        m.fc.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        m.fc.bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(4))
    path = I.export_inception(None, tmp_path / "fid", model=m)
    info = json.loads((tmp_path / "fid" / I.INFO_NAME).read_text())
    assert set(info["parity"]["outputs"]) == {"features", "spatial", "logits"}
    assert info["outputs"]["logits"]["shape"] == ["N", I.FID_CLASSES]

    u8 = np.random.default_rng(5).integers(0, 256, (2, 40, 52, 3), dtype=np.uint8)
    x = torch.from_numpy(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    seen = {}
    hook = m.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: seen.update(b1=out))
    with torch.no_grad():
        pool = m(x)
    hook.remove()
    b1 = seen["b1"].double().numpy()  # N x 192 x h x w (7 x 7 at SMALL; 17 x 17 at 299)
    assert b1.shape[1] == 192
    want_spatial = b1[:, :7].transpose(0, 2, 3, 1).reshape(2, -1)
    want_logits = pool.double().numpy() @ m.fc.weight.detach().double().numpy().T
    acts = InceptionFeatures(path).activations(u8)
    assert acts.spatial.shape == (2, 7 * b1.shape[2] * b1.shape[3]) and acts.logits.shape == (2, I.FID_CLASSES)
    np.testing.assert_allclose(acts.spatial, want_spatial, rtol=0, atol=1e-3 * np.abs(want_spatial).max())
    np.testing.assert_allclose(acts.logits, want_logits, rtol=0, atol=1e-3 * np.abs(want_logits).max())
    with_bias = want_logits + m.fc.bias.detach().double().numpy()
    assert np.abs(acts.logits - with_bias).max() > 0.5  # the bias is really left out


@pytest.mark.slow
def test_cli_exports_299_from_a_pth(tmp_path):
    """The full-size graph from a .pth file through `ddt-export fid-inception` (about a minute on 2 cores)."""
    from typer.testing import CliRunner

    from cli import app

    m = randomized(I.FID_SIZE)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    res = CliRunner().invoke(app, ["fid-inception", "--weights", str(tmp_path / "w.pth"), "--out",
                                   str(tmp_path / "fid")])
    assert res.exit_code == 0, res.output
    assert "not pytorch-fid's 6726825d" in res.output
    info = json.loads((tmp_path / "fid" / I.INFO_NAME).read_text())
    assert info["source"]["sha256"] and info["parity"]["max_rel_err"] <= info["parity"]["tol"]
    x = np.random.default_rng(2).random((2, 3, 256, 256), dtype=np.float32)  # ImageNet-256 samples
    rep = I.onnx_parity(m, tmp_path / "fid" / I.ONNX_NAME, x)
    assert rep["onnx"] <= I.parity_tolerance(rep), rep
    assert rep["outputs"]["spatial"]["dim"] == I.SPATIAL_DIM == 2023  # ADM's 17 x 17 x 7 at 299
