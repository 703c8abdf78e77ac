"""`ddt-export build`: profiles from the spec, the no-TensorRT fallback end to end, reuse and refusal."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest

from ddt_export.builder.engine import point_default, reuse_differences
from runs import run_build as build
from ddt_export.builder.tensorrt import profile_shapes, tensorrt_status
from ddt_export.core.errors import ArtifactError, BackendError
from ddt_export.core.manifest import read_manifest
from ddt_export.builder.quantize import fp8_gemm_report
from ddt_export.core.specs import BatchProfile, Dims
from engines_cache import fp8_build, run_cli

pytest.importorskip("modelopt.onnx.quantization", reason="FP8 needs nvidia-modelopt (the [fp8] extra + --no-deps)")
NO_TRT = not tensorrt_status()[0]


@pytest.fixture(scope="module")
def fp8(tmp_path_factory, official_ckpt):
    return fp8_build(tmp_path_factory, official_ckpt)


def test_profiles_from_spec(tiny_cfg):
    dims = Dims.of(tiny_cfg.model)
    p = profile_shapes("encoder", dims, BatchProfile(2, 8, 32))
    assert p == {"x": [[2, 4, 8, 8], [8, 4, 8, 8], [32, 4, 8, 8]], "t": [[2], [8], [32]], "y": [[2], [8], [32]]}
    d = profile_shapes("decoder", dims, BatchProfile(1, 16, 64))
    assert d["s"] == [[1, 16, 64], [16, 16, 64], [64, 16, 64]] and list(d) == ["x", "s"]


@pytest.mark.skipif(not NO_TRT, reason="this machine has TensorRT: the fallback line is not printed")
def test_fallback_says_one_line(fp8):
    _, text = fp8
    lines = [ln for ln in text.splitlines() if "TensorRT" in ln]
    assert len(lines) == 1 and "not available" in lines[0] and "ONNX Runtime engine folder for fp8" in lines[0]


def test_fp8_acceptance(fp8, official_ckpt, tmp_path):
    """build --precision fp8: the default recipe's block GEMMs fed by FP8 DQ, at least half the block GEMM FLOPs
    (counted from the graphs); generate runs; samples close to fp32, same noise."""
    from ddt_export.builder.recipes import parse_recipe

    out, _ = fp8
    man = read_manifest(out)
    assert man.precision == "fp8" and man.backend == ("onnxruntime" if NO_TRT else "tensorrt")
    onnx_dir = out if NO_TRT else out / "onnx"
    cfg = man.config.model
    fp8_flops = block_flops = 0.0
    for g in ("encoder", "decoder"):
        rep = fp8_gemm_report(onnx.load(str(onnx_dir / f"{g}.onnx")), cfg)
        fp8_flops, block_flops = fp8_flops + rep["fp8_flops"], block_flops + rep["block_flops"]
        assert rep["fp8_outside_blocks"] == [], rep
    assert fp8_flops / block_flops >= 0.5
    assert fp8_flops == parse_recipe(None).share(cfg).fp8
    assert man.graphs["decoder"].info["quantization"]["recipe_share"]["of_block_gemm_flops"] >= 0.5
    noise = np.random.default_rng(7).standard_normal((4, 4, 8, 8), dtype=np.float32)
    np.save(tmp_path / "noise.npy", noise)
    lat = {}
    for name, folder in (("fp8", out), ("fp32", onnx_dir / "stages" / "fp32")):
        code, text = run_cli(["generate", "--engines", folder, "--noise", tmp_path / "noise.npy", "--class", 3,
                              "--latents-out", tmp_path / f"{name}.npy", "--out", tmp_path / name])
        assert code == 0, text
        lat[name] = np.load(tmp_path / f"{name}.npy")
    rel = float(np.linalg.norm(lat["fp8"] - lat["fp32"]) / np.linalg.norm(lat["fp32"]))
    print(f"\nFP8 vs fp32 final latents, 4 samples, 20 steps, CFG 3: relative L2 error {rel:.4f}")
    assert rel < 0.05  # the bar is "well under 0.2"


def test_reuse_only_when_manifest_matches(fp8, official_ckpt, tmp_path):
    out, _ = fp8
    ckpt, yaml, _ = official_ckpt
    said = []
    res = build("fp8", out=out, ckpt=ckpt, config=str(yaml), say=said.append)
    assert res.reused and any("up to date" in s for s in said)
    with pytest.raises(ArtifactError, match="batch: built 1:16:64, asked 1:8:32.*--force"):
        build("fp8", out=out, ckpt=ckpt, config=str(yaml), batch=BatchProfile(1, 8, 32), say=said.append)
    with pytest.raises(ArtifactError, match="high_precision"):
        build("fp8", out=out, ckpt=ckpt, config=str(yaml), high_precision="bf16", say=said.append)
    # a changed graph file makes the folder stale (checked by sha256), on a copy
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=True)
    with open(copy / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    diffs = reuse_differences(copy, read_manifest(copy).provenance)  # the same request: only the file differs
    assert len(diffs) == 1 and "sha256" in diffs[0]
    with pytest.raises(ArtifactError, match="sha256"):
        build("fp8", out=copy, ckpt=ckpt, config=str(yaml), say=said.append)


def test_other_weights_are_refused(fp8, tmp_path, official_ckpt):
    out, _ = fp8
    _, yaml, _ = official_ckpt
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"not the same weights")
    with pytest.raises(ArtifactError, match="weights"):
        build("fp8", out=out, ckpt=other, config=str(yaml), say=lambda m: None)


@pytest.mark.skipif(not NO_TRT, reason="TensorRT is available here")
def test_tensorrt_backend_without_tensorrt_is_an_error(tmp_path, official_ckpt):
    ckpt, yaml, _ = official_ckpt
    with pytest.raises(BackendError, match="TensorRT"):
        build("fp16", out=tmp_path / "x", ckpt=ckpt, config=str(yaml), backend="tensorrt", say=lambda m: None)
    code, text = run_cli(["build", "--precision", "fp16", "--ckpt", ckpt, "--config", yaml, "--out", tmp_path / "y",
                          "--backend", "tensorrt"])
    assert code == 2 and "BackendError" in text and "Traceback" not in text


def test_point_default(tmp_path):
    (tmp_path / "engines" / "fp16").mkdir(parents=True)
    (tmp_path / "engines" / "fp8").mkdir()
    link = tmp_path / "engines" / "default"
    assert point_default(tmp_path / "engines" / "fp16", link)
    assert os.readlink(link) == "fp16"
    assert point_default(tmp_path / "engines" / "fp8", link) and os.readlink(link) == "fp8"
    real = tmp_path / "other" / "default"
    real.mkdir(parents=True)
    said = []
    assert not point_default(tmp_path / "engines" / "fp8", real, say=said.append) and real.is_dir()
    assert "left as is" in said[0]


@pytest.mark.slow
def test_fp16_build_default_out_and_generate(tmp_path, official_ckpt, monkeypatch):
    """The README's first command on a CPU machine: build --precision fp16 (default --out), then generate."""
    ckpt, yaml, _ = official_ckpt
    monkeypatch.chdir(tmp_path)
    code, text = run_cli(["build", "--precision", "fp16", "--ckpt", ckpt, "--config", yaml])
    assert code == 0, text
    assert "backend onnxruntime" in text and os.readlink("engines/default") == "fp16"
    man = json.loads((tmp_path / "engines" / "fp16" / "manifest.json").read_text())
    assert man["backend"] == "onnxruntime" and man["provenance"]["precision"] == "fp16"
    assert man["graphs"]["decoder"]["parity"]["vs_pytorch"]["max_rel_err"] < 2e-2
    code, text = run_cli(["generate", "--num", 2, "--out", tmp_path / "samples"])
    assert code == 0, text
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2 and (tmp_path / "samples/preview/grid.png").is_file()


def test_given_calibration_brings_its_schedule(fp8, official_ckpt, tmp_path):
    """--calibration: captured under another encoder schedule (what will run), used as is; another sampler: refused."""
    from ddt_export.builder.calibrate import capture
    from ddt_export.runtime.sampling.request import RequestInput

    out, _ = fp8
    ckpt, yaml, _ = official_ckpt
    copy = tmp_path / "fp8"
    shutil.copytree(out, copy, symlinks=True)
    capture(copy / "stages" / "fp32", tmp_path / "cal", RequestInput(num=2, schedule="uniform:4"), say=lambda m: None)
    said = []
    with pytest.raises(ArtifactError, match="calibration"):  # a different request: refused without --force
        build("fp8", out=copy, ckpt=ckpt, config=str(yaml), calibration=tmp_path / "cal", say=said.append)
    res = build("fp8", out=copy, ckpt=ckpt, config=str(yaml), calibration=tmp_path / "cal", force=True,
                say=said.append)
    assert any("fp32 graphs in" in s and "up to date" in s for s in said)  # the stages were reused
    assert res.manifest.graphs["encoder"].info["quantization"]["calibration"]["schedule"]["spec"] == "uniform:4"
    assert res.manifest.graphs["decoder"].parity["vs_fp32_onnx"]["max_rel_err"] < 0.1
    capture(copy / "stages" / "fp32", tmp_path / "short", RequestInput(num=1, steps=5), say=lambda m: None)
    with pytest.raises(ArtifactError, match="sampler.num_steps: built 5, asked 20"):
        build("fp8", out=copy, ckpt=ckpt, config=str(yaml), calibration=tmp_path / "short", force=True,
              say=said.append)


def test_recipe_decides_reuse_and_selects_by_role_and_block(fp8, official_ckpt, tmp_path):
    """--fp8-recipe FILE: a folder built with another recipe is refused, rebuilt with --force (stages and
    calibration reused), and then holds exactly the recipe's GEMMs in FP8 (hand count on the tiny model:
    3 encoder blocks 0-2 + decoder block 3)."""
    from ddt_export.builder.recipes import Recipe, parse_recipe

    out, _ = fp8
    ckpt, yaml, _ = official_ckpt
    copy = tmp_path / "fp8"
    shutil.copytree(out, copy, symlinks=True)
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps(Recipe("mine", quantize=("ffn@decoder", "qkv@first")).to_dict()))
    said = []
    with pytest.raises(ArtifactError, match=r"fp8_recipe: built \S+: quantize .*asked mine: quantize ffn@decoder"):
        build("fp8", out=copy, ckpt=ckpt, config=str(yaml), fp8_recipe=recipe, say=said.append)
    res = build("fp8", out=copy, ckpt=ckpt, config=str(yaml), fp8_recipe=recipe, force=True, say=said.append)
    assert not res.reused and any("fp32 graphs in" in s and "up to date" in s for s in said)
    assert any("calibration" in s and "reusing" in s for s in said)
    assert dict(res.manifest.provenance.options)["fp8_recipe"] == parse_recipe(recipe).key()
    reports = {g: fp8_gemm_report(onnx.load(str(copy / f"{g}.onnx"))) for g in ("encoder", "decoder")}
    assert reports["encoder"]["fp8_sites"] == [[0, "attn.qkv"]] and reports["encoder"]["block_fp8"] == 1
    assert reports["decoder"]["fp8_sites"] == [[3, "mlp.w1"], [3, "mlp.w2"], [3, "mlp.w3"]]
    assert reports["decoder"]["block_fp8"] == 3 and reports["decoder"]["block_gemms"] == 6
    q = res.manifest.graphs["decoder"].info["quantization"]
    assert q["recipe"]["name"] == "mine" and q["recipe"]["quantize"] == ["ffn@decoder", "qkv@first"]
    # FLOPs per sample, D 64, L 16, SwiGLU hidden 170: qkv 2*16*64*192, w1/w2/w3 2*16*64*170; all block GEMMs
    # 7208960 (tests/test_bench.py derives it)
    assert q["recipe_share"]["of_block_gemm_flops"] == pytest.approx((393216 + 3 * 348160) / 7208960)
    assert q["fp8_gemms"]["flop_fraction"] == pytest.approx(3 * 348160 / (393216 + 131072 + 3 * 348160 + 786432))
    assert build("fp8", out=copy, ckpt=ckpt, config=str(yaml), fp8_recipe=recipe, say=said.append).reused
    with pytest.raises(ArtifactError, match="fp8_recipe: built mine"):  # and back to the default: refused
        build("fp8", out=copy, ckpt=ckpt, config=str(yaml), say=said.append)


def test_recipe_flag_errors(tmp_path, official_ckpt):
    ckpt, yaml, _ = official_ckpt
    for argv, match in ((["--precision", "fp16", "--fp8-recipe", "all"], "--fp8-recipe: expected only with"),
                        (["--precision", "fp8", "--fp8-recipe", "nosuch"], "--fp8-recipe: expected a recipe name"),
                        (["--precision", "fp8", "--fp8-recipe", "qkv@9"], "--fp8-recipe: expected a recipe name")):
        code, text = run_cli(["build", *argv, "--ckpt", ckpt, "--config", yaml, "--out", tmp_path / "x"])
        lines = text.strip().splitlines()
        assert code == 2 and len(lines) == 1 and match in lines[0], text
    assert not (tmp_path / "x").exists()
