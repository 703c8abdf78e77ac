"""Checkpoint loading, the export command, and its failure modes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from ddt_export.export.checkpoint import convert_checkpoint, load_model, read_state_dict  # noqa: E402
from ddt_export.core.config import load_config  # noqa: E402
from ddt_export.core.errors import ArtifactError, CheckpointError  # noqa: E402
from runs import run_export_checkpoint as export_checkpoint, run_export_model as export_model  # noqa: E402
from ddt_export.core.artifacts import sha256_file  # noqa: E402
from ddt_export.core.manifest import read_manifest, verify_graphs  # noqa: E402
from ddt_export.core.provenance import WeightsRef  # noqa: E402
from references.official import official_forward  # noqa: E402

from conftest import CHILD_TIMEOUT, TINY, tiny_model  # noqa: E402


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT)


def test_lightning_ckpt_picks_ema_or_raw(official_ckpt):
    ckpt, yaml, ema = official_ckpt
    sd = read_state_dict(ckpt)
    assert all(torch.equal(sd[k], v) for k, v in ema.state_dict().items())
    raw = read_state_dict(ckpt, "raw")
    assert not torch.equal(raw["x_embedder.proj.weight"], sd["x_embedder.proj.weight"])
    assert torch.equal(raw["x_embedder.proj.weight"], tiny_model(2).state_dict()["x_embedder.proj.weight"])


def test_strict_check_lists_every_problem(official_ckpt):
    sd = dict(read_state_dict(official_ckpt[0]))
    sd.pop("blocks.0.attn.qkv.weight")
    sd.pop("final_layer.linear.bias")
    sd["blocks.9.foo"] = torch.zeros(1)
    sd["y_embedder.embedding_table.weight"] = torch.zeros(5, 64)
    with pytest.raises(CheckpointError) as e:
        load_model(TINY.model, sd)
    msg = str(e.value)
    for needle in ("2 missing", "blocks.0.attn.qkv.weight", "final_layer.linear.bias", "1 unexpected", "blocks.9.foo",
                   "y_embedder.embedding_table.weight (5, 64) vs (11, 64)"):
        assert needle in msg


class Foreign:  # a pickled object weights_only refuses
    pass


def test_pickle_refused_names_the_object(tmp_path):
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "cfg": Foreign()}, p)
    with pytest.raises(CheckpointError, match=r"Foreign.*--trust-checkpoint"):
        read_state_dict(p)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="an existing file"):
        read_state_dict(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        read_state_dict(bad)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(bad_st)


def test_convert_then_export_from_safetensors(official_ckpt, tmp_path):
    ckpt, yaml, ema = official_ckpt
    st, js = convert_checkpoint(ckpt, load_config(yaml), tmp_path / "m.safetensors")
    assert json.loads(js.read_text())["model"]["num_encoder_blocks"] == 3
    sd = read_state_dict(st)
    assert all(torch.equal(sd[k], v) for k, v in ema.state_dict().items())
    assert not list(tmp_path.glob("*.partial"))


def test_official_checkpoint_exports_to_official_numerics(official_ckpt, tmp_path):
    """Done-when: a Lightning .ckpt (EMA) + official YAML -> graphs reproducing the official forward to 1e-4."""
    ckpt, yaml, ema = official_ckpt
    out = tmp_path / "eng"
    man = export_checkpoint(ckpt, yaml, out)
    assert man.provenance.weights == sha256_file(ckpt) and man.provenance.weights_kind == "ema"
    sd = ema.state_dict()
    enc = ort.InferenceSession(str(out / "encoder.onnx"))
    dec = ort.InferenceSession(str(out / "decoder.onnx"))
    rng = np.random.default_rng(7)
    for b in (1, 4):
        x = rng.standard_normal((b, 4, 8, 8), dtype=np.float32)
        t = rng.uniform(size=b).astype(np.float32)
        y = rng.integers(0, 11, size=b)
        v_ref, s_ref = official_forward(sd, TINY.model, torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
        s = enc.run(None, {"x": x, "t": t, "y": y})[0]
        v = dec.run(None, {"x": x, "s": s})[0]
        assert np.abs(s - s_ref.numpy()).max() / np.abs(s_ref.numpy()).max() < 1e-4
        assert np.abs(v - v_ref.numpy()).max() / np.abs(v_ref.numpy()).max() < 1e-4
    for name in ("encoder", "decoder"):
        g = onnx.load(str(out / f"{name}.onnx"))
        assert not {"Col2Im", "DFT"} & {n.op_type for n in g.graph.node}
        assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    m = read_manifest(out)
    assert m.config.model == TINY.model.__class__(**{**TINY.model.__dict__})
    assert m.graphs["encoder"].parity["vs_pytorch"]["max_rel_err"] < 1e-4
    assert {"torch", "onnx", "onnxruntime"} <= set(m.versions)
    verify_graphs(m, out)
    (out / "decoder.onnx").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="sha256"):
        verify_graphs(m, out)


def test_foreign_folder_refused_unless_force(tiny_engines, tmp_path):
    out = tmp_path / "eng"
    export_model(tiny_model(0), TINY, out, weights=WeightsRef("aaa", "random"), check=False)
    with pytest.raises(ArtifactError, match="--force"):
        export_model(tiny_model(1), TINY, out, weights=WeightsRef("bbb", "random"), check=False)
    export_model(tiny_model(1), TINY, out, weights=WeightsRef("bbb", "random"), check=False,
                 force=True)
    assert read_manifest(out).provenance.weights == "bbb"


def test_failed_export_leaves_nothing_finished(tmp_path, monkeypatch):
    import ddt_export.export.exporter as ex

    def boom(*a, **k):
        raise RuntimeError("simulated crash while checking")

    monkeypatch.setattr(ex, "check_graph", boom)
    out = tmp_path / "eng"
    with pytest.raises(RuntimeError):
        export_model(tiny_model(0), TINY, out, weights=WeightsRef("a", "random"))
    assert sorted(p.name for p in out.iterdir()) == []  # no graph, no manifest, no scratch folder


def test_parity_failure_lists_outputs(tmp_path, monkeypatch):
    import ddt_export.export.exporter as ex
    from ddt_export.core.errors import NumericsError

    other = tiny_model(5)
    real_parity = ex.parity
    monkeypatch.setattr(ex, "parity", lambda path, spec, ref, *a, **k: real_parity(
        path, spec, type(ref)(other), *a, **k))  # compare against a different model: must fail loudly
    with pytest.raises(NumericsError, match=r"encoder.s @ batch 1: max rel err .* @ batch 3"):
        export_model(tiny_model(0), TINY, tmp_path / "e", weights=WeightsRef("a", "random"))


def test_vae_decoder_export(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)
    vae.save_pretrained(tmp_path / "vae")
    cfg = TINY.__class__("tiny-latent", TINY.model.__class__(**{**TINY.model.__dict__, "latent_scale": 0.18215}),
                         TINY.sampler)
    out = tmp_path / "eng"
    man = export_model(tiny_model(0), cfg, out, weights=WeightsRef("a", "random"),
                       vae_dir=tmp_path / "vae")
    assert man.graphs["vae_decoder"].parity["vs_pytorch"]["max_rel_err"] < 1e-4
    z = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    img = ort.InferenceSession(str(out / "vae_decoder.onnx")).run(None, {"latent": z})[0]
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z) / 0.18215).sample.numpy()  # the official LatentVAE.decode
    assert img.shape == (2, 3, 16, 16) and np.abs(img - ref).max() < 1e-4
    with pytest.raises(CheckpointError, match="config.json"):
        export_model(tiny_model(0), cfg, tmp_path / "e2", weights=WeightsRef("a", "random"),
                     vae_dir=tmp_path)


@pytest.mark.timeout(CHILD_TIMEOUT + 60)
def test_cli_errors_are_one_line(tmp_path):
    r = cli("export", "--ckpt", tmp_path / "missing.ckpt", "--config", "ddt-xl-256", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "CheckpointError" in lines[0] and "missing.ckpt" in lines[0]
    r = cli("export", "--config", "nope", "--out", tmp_path / "o")
    assert r.returncode == 2 and "ConfigError" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.timeout(2 * CHILD_TIMEOUT + 60)
def test_cli_export_and_convert(official_ckpt, tmp_path):
    ckpt, yaml, _ = official_ckpt
    r = cli("export", "--ckpt", ckpt, "--config", yaml, "--out", tmp_path / "e", "--weights", "raw")
    assert r.returncode == 0, r.stderr
    assert "max rel err" in r.stdout and read_manifest(tmp_path / "e").provenance.weights_kind == "raw"
    r = cli("convert", "--ckpt", ckpt, "--config", yaml, "--out", tmp_path / "m.safetensors")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.json").is_file()
