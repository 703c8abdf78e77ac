"""FP8 recipes: parsing (preset names, JSON files, typed errors), block GEMM selection by role and block
against hand counts on the tiny config, guidance-phase rows, the recipe's key. Torch-free, no graphs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ddt_export.builder.recipes import DEFAULT_RECIPE, PRESETS, Recipe, parse_recipe, phase_steps
from ddt_export.core.config import PRESETS as MODELS, ModelConfig, SamplerConfig
from ddt_export.core.errors import ConfigError

# 4 blocks (3 encoder + 1 decoder), as tests/conftest.py's TINY (repeated: conftest needs torch)
TINY = ModelConfig(in_channels=4, hidden_size=64, num_groups=4, num_blocks=4, num_encoder_blocks=3, patch_size=2,
                   num_classes=10, latent_size=8, latent_scale=None)
ROLES6 = {"attn.qkv", "attn.proj", "mlp.w1", "mlp.w2", "mlp.w3", "adaLN_modulation"}


def test_presets_and_default():
    assert DEFAULT_RECIPE in PRESETS and parse_recipe(None) == PRESETS[DEFAULT_RECIPE]
    assert parse_recipe("all").sites(TINY) == {(b, r) for b in range(4) for r in ROLES6}  # 24 block GEMMs
    for r in PRESETS.values():  # every preset selects something on every preset model
        for m in MODELS.values():
            assert r.sites(m.model)


def test_default_recipe_hand_counted():
    """The default (issue 15's pick): the FFN (w1/w2/w3) and qkv of every block; at least half the block GEMM
    FLOPs on the bundled digits model and on DDT-XL/256."""
    want = {(b, r) for b in range(4) for r in ("attn.qkv", "mlp.w1", "mlp.w2", "mlp.w3")}
    assert parse_recipe(None).sites(TINY) == want
    for name in ("ddt-tiny-digits", "ddt-xl-256"):
        share = parse_recipe(None).share(MODELS[name].model)
        assert 0.5 <= share.of_block_gemms < 1.0 and share.predicted_speedup > 1.0
    # digits (64 tokens, hidden 96, FFN 256, 6 encoder + 2 decoder blocks), multiply-adds per sample by hand:
    # qkv 64*96*288, proj 64*96*96, w1/w2/w3 3*64*96*256, adaLN 96*576 (encoder: one condition row) or
    # 64*96*576 (decoder: per token)
    qkv, proj, ffn = 64 * 96 * 288, 64 * 96 * 96, 3 * 64 * 96 * 256
    total = 6 * (qkv + proj + ffn + 96 * 576) + 2 * (qkv + proj + ffn + 64 * 96 * 576)
    share = parse_recipe(None).share(MODELS["ddt-tiny-digits"].model)
    assert share.of_block_gemms == pytest.approx(8 * (qkv + ffn) / total, rel=1e-12)  # 0.8106


@pytest.mark.parametrize("rules, exclude, want", [
    (["ffn@decoder"], [], {(3, "mlp.w1"), (3, "mlp.w2"), (3, "mlp.w3")}),
    (["qkv,proj@first"], [], {(0, "attn.qkv"), (0, "attn.proj")}),
    (["adaLN@middle,last"], [], {(1, "adaLN_modulation"), (3, "adaLN_modulation")}),  # middle of 4 = (4-1)//2
    (["w2@-1", "w2@0"], [], {(3, "mlp.w2"), (0, "mlp.w2")}),
    (["*@encoder"], ["adaLN", "ffn@2"], {(b, r) for b in range(3) for r in ("attn.qkv", "attn.proj")}
     | {(b, r) for b in (0, 1) for r in ("mlp.w1", "mlp.w2", "mlp.w3")}),
    (["*"], ["*@encoder"], {(3, r) for r in ROLES6}),
])
def test_sites_hand_counted(rules, exclude, want):
    assert Recipe("t", quantize=tuple(rules), exclude=tuple(exclude)).sites(TINY) == want


def test_sites_on_xl_shape():
    xl = MODELS["ddt-xl-256"].model  # 28 blocks, 22 encoder
    r = Recipe("t", quantize=("*@middle", "adaLN@decoder"))
    assert r.sites(xl) == {(13, x) for x in ROLES6} | {(b, "adaLN_modulation") for b in range(22, 28)}


def test_recipe_file_round_trip(tmp_path):
    r = Recipe("mine", quantize=("ffn", "qkv@decoder"), exclude=("ffn@last",), calibration="entropy",
               calibration_rows="guided", description="a test")
    f = tmp_path / "mine.json"
    f.write_text(json.dumps(r.to_dict()))
    back = parse_recipe(str(f))
    assert back == r and back.key() == r.key() and back.description == "a test"
    assert "entropy" in r.key() and "guided" in r.key() and "ffn@last" in r.key()
    assert Recipe("mine", quantize=("ffn",)).key() != r.key()


@pytest.mark.parametrize("doc, match", [
    ({"name": "x", "quantize": ["mlp"]}, "roles from"),
    ({"name": "x", "quantize": ["ffn@middl"]}, "blocks from"),
    ({"name": "x", "quantize": "ffn"}, "a list of rules"),
    ({"name": "x", "quantize": []}, "at least one rule"),
    ({"name": "x", "calibration": "percentile"}, "max | entropy.*ModelOpt"),
    ({"name": "x", "calibration_rows": "per-step"}, "all | guided | unguided"),
    ({"name": "x", "scales": "per-channel"}, "keys from"),
    ({"quantize": ["ffn"]}, "a name"),
    (["ffn"], "a JSON object"),
])
def test_bad_recipe_files(tmp_path, doc, match):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=match) as e:
        parse_recipe(f)
    assert "expected" in str(e.value) and "got" in str(e.value)


def test_bad_specs(tmp_path):
    with pytest.raises(ConfigError, match="--fp8-recipe: expected a recipe name .*all.* or a recipe .json file"):
        parse_recipe("no-such-recipe")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="valid JSON"):
        parse_recipe(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match=r"block index in \[-4, 4\)"):
        Recipe("t", quantize=("qkv@7",)).sites(TINY)
    with pytest.raises(ConfigError, match="at least one block GEMM"):
        Recipe("t", quantize=("adaLN",), exclude=("*",)).sites(TINY)


def test_phase_steps_against_the_interval():
    sampler = SamplerConfig(num_steps=20, guidance=3.0, guidance_interval=(0.3, 1.0), last_step=0.04)
    t = np.linspace(0.0, 0.96, 20)  # official timesteps, shift 1
    want = {i for i in range(20) if 0.3 < t[i] < 1.0}
    assert phase_steps(sampler, "guided") == want and want == set(range(6, 20))  # t_6 = 0.303: first inside
    assert phase_steps(sampler, "unguided") == set(range(20)) - want
    assert phase_steps(sampler, "all") is None
