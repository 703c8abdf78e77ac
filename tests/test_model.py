"""The export-friendly model equals the official formulation; configs and presets load right."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from ddt_export.core.config import PRESETS, Config, ConfigError, ModelConfig, load_config  # noqa: E402
from ddt_export.export.model import DDT, patchify, unpatchify  # noqa: E402
from references.official import official_forward  # noqa: E402

from conftest import TINY, tiny_model  # noqa: E402


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("cfg", [
    TINY.model,
    ModelConfig(in_channels=1, hidden_size=48, num_groups=2, num_blocks=3, num_encoder_blocks=2, patch_size=4,
                num_classes=5, latent_size=16, latent_scale=None),  # patch 4, 4x4 grid, head_dim 24
])
def test_matches_official_forward(cfg):
    torch.manual_seed(3)
    m = DDT(cfg).eval()
    x = torch.randn(3, cfg.in_channels, cfg.latent_size, cfg.latent_size)
    t = torch.rand(3)
    y = torch.tensor([0, cfg.num_classes - 1, cfg.null_class])
    sd = m.state_dict()
    with torch.no_grad():
        v, s = m(x, t, y)
        v_ref, s_ref = official_forward(sd, cfg, x, t, y)
        assert rel(s, s_ref) < 1e-5 and rel(v, v_ref) < 1e-5
        # the decoder reuses a given s and skips the encoder, as the official forward does
        s_old = m.encode(x, torch.rand(3), y)
        assert rel(m(x, t, y, s_old)[0], official_forward(sd, cfg, x, t, y, s_old)[0]) < 1e-5


def test_patchify_is_unfold_and_fold():
    x = torch.randn(2, 4, 8, 8)
    p = patchify(x, 2)
    assert torch.equal(p, torch.nn.functional.unfold(x, 2, stride=2).transpose(1, 2))
    assert torch.equal(unpatchify(p, 2, 4, 8, 8), x)


def test_decoder_ignores_t_and_y():
    m = tiny_model()
    x, s = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 64)
    with torch.no_grad():
        a = m(x, torch.zeros(2), torch.tensor([0, 1]), s)[0]
        b = m(x, torch.ones(2), torch.tensor([5, 10]), s)[0]
    assert torch.equal(a, b)


def test_fp16_model_close_to_fp32():
    m = tiny_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    with torch.no_grad():
        ref = m.encode(x, t, y)
        half = DDT(TINY.model).half().eval()
        half.load_state_dict(m.state_dict())
        assert rel(half.encode(x, t, y).float(), ref) < 2e-2


def test_state_dict_keys_are_official():
    keys = set(tiny_model().state_dict())
    for k in ("x_embedder.proj.weight", "s_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
              "y_embedder.embedding_table.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.0.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight",
              "blocks.0.attn.proj.bias", "blocks.3.mlp.w3.weight", "blocks.3.adaLN_modulation.0.bias",
              "blocks.0.norm1.weight", "blocks.0.norm2.weight"):
        assert k in keys
    assert not any("rope" in k or "freqs" in k for k in keys)  # buffers are not part of the checkpoint format
    assert "blocks.0.attn.qkv.bias" not in keys


def test_xl_preset_shapes():
    cfg = PRESETS["ddt-xl-256"].model
    assert (cfg.head_dim, cfg.num_tokens, cfg.mlp_hidden, cfg.null_class) == (72, 256, 3072, 1000)
    assert PRESETS["ddt-xl-512"].model.num_tokens == 1024
    with torch.device("meta"):
        n = sum(p.numel() for p in DDT(cfg).parameters())
    assert 670e6 < n < 680e6  # DDT-XL/2 22en6de: 675M


def test_official_yaml_and_json_roundtrip(official_ckpt, tmp_path):
    _, yaml_path, _ = official_ckpt
    cfg = load_config(yaml_path)
    assert cfg.model == TINY.model.__class__(**{**TINY.model.__dict__, "latent_scale": None})
    assert cfg.sampler.num_steps == 20 and cfg.sampler.guidance == 3.0 and cfg.sampler.guidance_interval == (0.3, 1.0)
    js = tmp_path / "c.json"
    js.write_text(cfg.to_json())
    assert load_config(js) == cfg


def test_real_official_yaml_parses(tmp_path):
    y = tmp_path / "repa_improved_ddt_xlen22de6_256.yaml"
    y.write_text("""model:
  vae: {class_path: src.models.vae.LatentVAE, init_args: {precompute: true, weight_path: stabilityai/sd-vae-ft-ema}}
  denoiser:
    init_args: {in_channels: 4, patch_size: 2, num_groups: 16, hidden_size: 1152, num_blocks: 28,
                num_encoder_blocks: 22, num_classes: 1000}
  diffusion_sampler:
    init_args: {num_steps: 250, guidance: 2.0, timeshift: 1.0, state_refresh_rate: 1, guidance_interval_min: 0.3,
                guidance_interval_max: 1.0, last_step: 0.04, step_fn: src.diffusion.stateful_flow_matching.sampling.ode_step_fn}
data: {latent_shape: [4, 32, 32]}
""")
    cfg = load_config(y)
    assert cfg.model == PRESETS["ddt-xl-256"].model
    assert cfg.sampler == PRESETS["ddt-xl-256"].sampler


@pytest.mark.parametrize("spec,needle", [
    ("no-such-preset", "--config"),
    ("bad.txt", "--config"),
])
def test_bad_config_names_the_problem(spec, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle):
        load_config(spec if spec != "bad.txt" else (tmp_path / "bad.txt").write_text("x") and tmp_path / "bad.txt")


def test_bad_model_config():
    with pytest.raises(ConfigError, match="num_encoder_blocks"):
        ModelConfig(num_blocks=4, num_encoder_blocks=4)
    with pytest.raises(ConfigError, match="head_dim"):
        ModelConfig(hidden_size=60, num_groups=6)
    with pytest.raises(ConfigError, match="config JSON"):
        Config.from_dict(json.loads('{"model": {}}'))
