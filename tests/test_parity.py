"""fp16 / bf16 graphs against the fp32 graphs of the same model; what onnxruntime CPU can and cannot run."""
from __future__ import annotations

import pytest

from runs import run_build as build
from ddt_export.core.manifest import read_manifest
from ddt_export.builder.parity import graph_errors, sample_error
from engines_cache import fp8_build

pytest.importorskip("modelopt.onnx.quantization", reason="the shared FP8 build needs nvidia-modelopt")


@pytest.fixture(scope="module")
def stages(tmp_path_factory, official_ckpt):
    return fp8_build(tmp_path_factory, official_ckpt)[0] / "stages"


def test_fp16_graphs_vs_fp32(stages):
    errs = graph_errors(stages / "fp16", stages / "fp32")  # raises if over the spec's fp16 tolerance (2e-2)
    print("\nfp16 vs fp32 graphs:", {k: f"{v['max_rel_err']:.2e}" for k, v in errs.items()})
    for name in ("encoder", "decoder"):
        assert 0 < errs[name]["max_rel_err"] < 5e-3 and errs[name]["inputs"] == "random"
    # the export's own record: fp16 graph in onnxruntime vs the fp32 PyTorch model
    man = read_manifest(stages / "fp16")
    assert all(man.graphs[g].parity["vs_pytorch"]["max_rel_err"] < 2e-2 for g in ("encoder", "decoder"))


def test_fp16_samples_vs_fp32(stages):
    rec = sample_error(stages / "fp16", stages / "fp32", num=2)
    print(f"\nfp16 vs fp32 final latents: rel L2 {rec['final_latent_rel_l2']:.2e}")
    assert rec["final_latent_rel_l2"] < 5e-3


def test_bf16_build_records_what_onnxruntime_cannot_run(tmp_path, official_ckpt):
    """bf16: onnxruntime 1.32 CPU has no bf16 MatMul/Gemm kernel; the manifest says so, with PyTorch's bf16 error.
    Either outcome is accepted: where onnxruntime CPU does run the bf16 graphs, their numbers are checked."""
    ckpt, yaml, _ = official_ckpt
    said = []
    res = build("bf16", out=tmp_path / "bf16", ckpt=ckpt, config=str(yaml), backend="onnxruntime", say=said.append)
    man = res.manifest
    assert man.precision == "bf16" and man.backend == "onnxruntime"
    for g in ("encoder", "decoder"):
        parity = man.graphs[g].parity
        assert 1e-4 < parity["torch_bf16"]["max_rel_err"] < 6e-2  # bf16 is not fp32, and within the table's bound
        status = parity["onnxruntime"]
        if "not_run" in status:  # onnxruntime 1.32: no bf16 MatMul/Gemm kernel on CPU
            assert "NOT_IMPLEMENTED" in status["not_run"]
            assert "MatMul" in status["not_run"] or "Gemm" in status["not_run"]
        else:  # a later onnxruntime runs them: the graphs must then be as close to fp32 as bf16 allows
            assert status == {"runs": True}
            errs = graph_errors(tmp_path / "bf16", fp8_stages_fp32(tmp_path, official_ckpt))
            assert 1e-4 < errs[g]["max_rel_err"] < 6e-2, errs
    print("\nbf16 (PyTorch CPU) vs fp32:", {g: f"{man.graphs[g].parity['torch_bf16']['max_rel_err']:.2e}"
                                            for g in ("encoder", "decoder")})
    assert any("no bfloat16 MatMul" in s for s in said)


def fp8_stages_fp32(tmp_path, official_ckpt):
    """An fp32 export of the same checkpoint, to compare a bf16 folder against (only built when bf16 runs)."""
    ckpt, yaml, _ = official_ckpt
    return build("fp32", out=tmp_path / "fp32", ckpt=ckpt, config=str(yaml), backend="onnxruntime",
                 say=lambda m: None).folder
