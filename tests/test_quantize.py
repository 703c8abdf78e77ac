"""FP8 Q/DQ placement and numerics: ModelOpt PTQ on the official-format tiny checkpoint, run in onnxruntime."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto

from ddt_export.core.errors import ArtifactError
from ddt_export.core.manifest import read_manifest
from ddt_export.builder.parity import graph_errors
from ddt_export.builder.quantize import fp8_gemm_report, gemm_roles, island_nodes, quantize_folder
from ddt_export.builder.recipes import Recipe, parse_recipe
from ddt_export.core.artifacts import sha256_file
from engines_cache import fp8_build

pytest.importorskip("modelopt.onnx.quantization", reason="FP8 needs nvidia-modelopt (the [fp8] extra + --no-deps)")


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory, official_ckpt):
    return fp8_build(tmp_path_factory, official_ckpt)[0]


@pytest.mark.parametrize("graph", ["encoder", "decoder"])
def test_qdq_placement(fp8_dir, graph):
    model = onnx.load(str(fp8_dir / f"{graph}.onnx"))
    cfg = read_manifest(fp8_dir).config.model
    rep = fp8_gemm_report(model, cfg)
    roles = rep["roles"]
    # every block GEMM the default recipe selects is fed by FP8 DequantizeLinear on activation and weight, and
    # only those
    blocks = range(cfg.num_encoder_blocks) if graph == "encoder" else range(cfg.num_encoder_blocks, cfg.num_blocks)
    want = sorted([b, r] for b, r in parse_recipe(None).sites(cfg) if b in blocks)
    assert rep["fp8_sites"] == want and rep["block_fp8"] == len(want), rep
    assert rep["block_gemms"] == 6 * len(blocks)
    assert {"block.qkv", "block.proj", "block.w1", "block.w2", "block.w3", "block.adaLN_modulation"} <= set(roles)
    # embedders, final layer and the attention matmuls (q k^T, attn v) stay in high precision
    for role in ("embedder", "attention", "final_layer"):
        if role in roles:
            assert roles[role][0] == 0, (role, roles[role])
    assert rep["fp8_outside_blocks"] == []
    assert roles["attention"][1] == 2 * (3 if graph == "encoder" else 1)  # two matmuls per block


def test_fp32_graph_has_no_fp8(fp8_dir):
    rep = fp8_gemm_report(onnx.load(str(fp8_dir / "stages" / "fp32" / "decoder.onnx")))
    assert rep["block_fp8"] == 0 and rep["block_gemms"] == 6


def test_high_precision_with_fp32_islands(fp8_dir):
    """Outside the Q/DQ the FP8 graph is the fp16 export: fp16 compute, RMSNorm statistics in fp32, fp32 I/O."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(fp8_dir / "decoder.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in (*m.graph.value_info, *m.graph.output, *m.graph.input)}
    stats = [n for n in m.graph.node if n.op_type == "ReduceMean"]
    assert stats and all(types[n.output[0]] == TensorProto.FLOAT for n in stats)
    gemm_outs = [types[n.output[0]] for n in m.graph.node if n.op_type == "MatMul"]
    assert set(gemm_outs) == {TensorProto.FLOAT16}
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in m.graph.input if i.name != "y")
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in m.graph.output)


def test_fp8_numerics_in_onnxruntime(fp8_dir):
    """The FP8 graphs run in onnxruntime CPU; error vs the fp32 graphs on real trajectory rows, recorded."""
    errs = graph_errors(fp8_dir, fp8_dir / "stages" / "fp32", calibration=fp8_dir / "calibration")
    for name in ("encoder", "decoder"):
        assert 1e-4 < errs[name]["max_rel_err"] < 0.1, errs  # quantized (not zero), and close
        assert errs[name]["rel_l2"] < 0.05, errs
    man = read_manifest(fp8_dir)
    rec = man.graphs["decoder"].parity["vs_fp32_onnx"]
    assert rec["inputs"] == "calibration rows" and rec["max_rel_err"] < 0.1
    q = man.graphs["encoder"].info["quantization"]
    assert q["mode"] == "fp8 e4m3" and q["high_precision"] == "fp16" and q["calibration_method"] == "max"


def test_roles_from_module_paths(fp8_dir):
    roles = gemm_roles(onnx.load(str(fp8_dir / "stages" / "fp32" / "encoder.onnx")))
    counts = {r: list(roles.values()).count(r) for r in set(roles.values())}
    assert counts["block.qkv"] == counts["block.w2"] == counts["block.adaLN_modulation"] == 3  # 3 encoder blocks
    assert counts["embedder"] == 3  # s_embedder, t_embedder mlp.0 and mlp.2 (y_embedder is a Gather)
    assert "final_layer" not in counts and counts["attention"] == 6


def test_islands_need_matching_exports(fp8_dir):
    fp32 = onnx.load(str(fp8_dir / "stages" / "fp32" / "encoder.onnx"))
    isl = island_nodes(fp32, onnx.load(str(fp8_dir / "stages" / "fp16" / "encoder.onnx")))
    ops = {n.name: n.op_type for n in fp32.graph.node}
    assert {"ReduceMean", "Sqrt", "Sin", "Cos"} <= {ops[n] for n in isl}
    assert not {"MatMul", "Gemm"} & {ops[n] for n in isl}
    with pytest.raises(ArtifactError, match="op sequence"):
        island_nodes(fp32, onnx.load(str(fp8_dir / "stages" / "fp16" / "decoder.onnx")))



def test_graph_without_recipe_gemms_is_the_high_precision_export(fp8_dir, tmp_path):
    """A recipe with nothing in the encoder: the encoder is the fp16 export itself, the decoder all FP8."""
    man = read_manifest(fp8_dir)
    out = quantize_folder(fp8_dir / "stages" / "fp32", fp8_dir / "stages" / "fp16", fp8_dir / "calibration",
                          tmp_path / "dec", provenance=man.provenance, recipe=Recipe("dec", quantize=("*@decoder",)),
                          say=lambda m: None)
    assert sha256_file(tmp_path / "dec" / "encoder.onnx") == sha256_file(fp8_dir / "stages" / "fp16" / "encoder.onnx")
    enc, dec = (out.graphs[g].info["quantization"] for g in ("encoder", "decoder"))
    assert enc["fp8_gemms"]["block_fp8"] == 0 and enc["calibration_rows"] == 0
    assert dec["fp8_gemms"]["fraction"] == 1.0 and dec["fp8_gemms"]["flop_fraction"] == 1.0
    # decoder block 3 over all block GEMMs, FLOPs per sample (tests/test_bench.py derives them)
    assert dec["recipe_share"]["of_block_gemm_flops"] == pytest.approx(2355200 / 7208960)
    assert out.graphs["encoder"].parity["vs_fp32_onnx"]["max_rel_err"] < 5e-3  # fp16 only
