"""The TensorRT backend's decisions (runtime.graphs.trt_plan), on CPU: no TensorRT and no mock of it. Each test names
the defect of issue 13 its function fixes; what is left (the calls into TensorRT and CUDA) is in test_trt.py."""
from __future__ import annotations

import numpy as np
import pytest

from ddt_export.builder.tensorrt import BuildLog, tensorrt_status
from ddt_export.core.config import SamplerConfig
from ddt_export.core.errors import InputError
from ddt_export.core.specs import DECODER, ENCODER, Dims
from ddt_export.runtime.sampling.host import plan_steps
from ddt_export.core.errors import BackendError
from ddt_export.runtime.graphs.trt_plan import (ALIGNMENT, GraphPlan, TensorDesc, align_up, cuda_reason, device_batch,
                                                engine_problems, graph_key, kernel_target, output_problem, pack,
                                                polygraphy_reason, s_half, time_table, unusable_reason)

DIMS = Dims(C=4, H=8, W=8, L=16, D=64, IC=4, IH=8)


def test_label_regions_are_aligned():  # defect 1: y bound at y + b*8 (16 bytes for b = 2)
    for b in (1, 2, 3, 7, 32):
        offsets, total = pack({"x": b * 4 * 8 * 8 * 4, "y_cfg": 2 * b * 8, "y_cond": b * 8})
        assert all(o % ALIGNMENT == 0 for o in offsets.values())
        assert offsets["y_cfg"] >= b * 4 * 8 * 8 * 4 and offsets["y_cond"] >= offsets["y_cfg"] + 2 * b * 8
        assert total >= offsets["y_cond"] + b * 8 and total % ALIGNMENT == 0
    assert pack({"a": 16, "b": 1})[0] == {"a": 0, "b": 256}  # the old b*8 = 16 would not do
    assert align_up(0) == 0 and align_up(1) == 256 and align_up(512) == 512


def test_cond_half_of_s_by_offset_only_when_aligned():  # defect 1: assert the s offset, else copy
    h = s_half(2, 16, 64)  # the tests' engines: 2 * 16 * 64 * 4 = 8192 bytes
    assert (h.offset, h.by_pointer) == (8192, True)
    h = s_half(1, 3, 5)  # 60 bytes: not a bindable address
    assert (h.offset, h.by_pointer) == (60, False)
    assert s_half(3, 256, 1152).by_pointer  # DDT-XL 256: L = 256, D = 1152


def _io(dims=DIMS, lo=1, hi=64, **change):
    """The encoder's I/O as a matching engine describes it; `change` replaces one tensor's description."""
    out = [TensorDesc("x", "float32", "input", "device", (-1, 4, 8, 8), ((lo, 4, 8, 8), (16, 4, 8, 8), (hi, 4, 8, 8))),
           TensorDesc("t", "float32", "input", "device", (-1,), ((lo,), (16,), (hi,))),
           TensorDesc("y", "int64", "input", "device", (-1,), ((lo,), (16,), (hi,))),
           TensorDesc("s", "float32", "output", "device", (-1, 16, 64))]
    return [change.get(t.name, t) for t in out]


def test_engine_checked_beyond_names():  # defect 5
    assert engine_problems(ENCODER, DIMS, 1, 64, _io()) == []
    assert engine_problems(ENCODER, DIMS, 2, 32, _io(lo=1, hi=64)) == []  # a wider profile holds the manifest's
    bad = _io(y=TensorDesc("y", "int32", "input", "device", (-1,), ((1,), (16,), (64,))),
              s=TensorDesc("s", "float32", "output", "host", (-1, 16, 32)))
    probs = engine_problems(ENCODER, DIMS, 1, 64, bad)
    assert "y: dtype int32, spec int64" in probs and "s: location host, the runtime binds device memory" in probs
    assert any(p.startswith("s: shape (-1, 16, 32)") for p in probs)
    probs = engine_problems(ENCODER, DIMS, 1, 64, _io(hi=32))
    assert "x: profile max batch 32, manifest 64" in probs
    assert "t: profile min batch 4, manifest 1" in engine_problems(ENCODER, DIMS, 1, 64, _io(lo=4))
    swapped = _io(t=TensorDesc("t", "float32", "output", "device", (-1,)))
    assert "t: output, spec input" in engine_problems(ENCODER, DIMS, 1, 64, swapped)
    # a decoder plan where the encoder belongs: every tensor named
    probs = engine_problems(DECODER, DIMS, 1, 64, _io())
    assert {"unexpected tensor t", "unexpected tensor y", "missing tensor v"} <= set(probs)
    assert "s: input, spec input" not in probs and "s: output, spec input" in probs


def test_output_shape_checked_against_its_buffer():  # defect 5: before enqueueing
    assert output_problem("v", (2, 4, 8, 8), (2, 4, 8, 8), 2 * 256 * 4, 4) == ""
    assert "context shape (3, 4, 8, 8)" in output_problem("v", (3, 4, 8, 8), (2, 4, 8, 8), 10 ** 6, 4)
    assert "do not fit" in output_problem("v", (2, 4, 8, 8), (2, 4, 8, 8), 2 * 256 * 4 - 1, 4)


def test_graph_plan_one_context_per_key_and_fallback():  # defects 2 and 3
    plan = GraphPlan()
    k2b, kb = (4, (("s", 1), ("x", 2))), (2, (("s", 1), ("x", 3)))
    assert plan.action(k2b) == "capture" and plan.capture_result(k2b) == "replay"
    assert plan.action(k2b) == "replay"  # replayed on its own context: its shapes never changed
    assert plan.action(kb) == "capture"  # a new shape is a new key, not a replay of the old graph
    assert plan.capture_result(kb, end_error="cudaErrorStreamCaptureInvalidated") == "plain"
    assert plan.action(kb) == "plain" and plan.failed[kb] == "cudaErrorStreamCaptureInvalidated"
    assert plan.action(k2b) == "replay"  # the other key is unaffected
    assert GraphPlan(enabled=False).action(k2b) == "plain"
    p = GraphPlan()
    assert p.capture_result(k2b, enqueue_error="RuntimeError()") == "plain" and k2b not in p.captured


def test_device_batch_pads_to_min_or_refuses():  # defect 4
    assert device_batch(1, 4, 64) == 4 and device_batch(8, 4, 64) == 8 and device_batch(32, 1, 64) == 32
    with pytest.raises(InputError, match="2 x 33"):
        device_batch(33, 1, 64)
    with pytest.raises(InputError, match="padded from 1 to batch.min"):
        device_batch(1, 40, 64)
    with pytest.raises(InputError):
        device_batch(0, 1, 64)


def test_step_times_uploaded_once():  # defect 11
    sampler = SamplerConfig(num_steps=12, guidance=3.0, guidance_interval=(0.3, 1.0), last_step=0.04)
    steps = plan_steps(sampler, [0, 3, 6, 9])
    table, stride = time_table([s.t for s in steps if s.recompute], rows=6)
    assert table.shape == (4, 64) and stride == 256 and table.dtype == np.float32  # one aligned row per step
    for row, st in zip(table, [s for s in steps if s.recompute]):
        assert np.all(row[:6] == st.t)  # bit-equal to the t the host loop feeds
    assert time_table([0.5], rows=65)[1] == 512


def test_unusable_and_cuda_reasons():  # defect 8, and the driver line of build
    assert "libnvinfer" in unusable_reason(OSError("libnvinfer.so.11: cannot open shared object file"))
    assert unusable_reason(ImportError("No module named 'tensorrt'")).startswith("ImportError")
    assert unusable_reason(RuntimeError("Function cuInit not found")) and unusable_reason(ValueError("x")) == ""
    old = cuda_reason("cudaErrorInsufficientDriver", 0, 12040, 13000)
    assert "driver supports CUDA 12.4, older than the CUDA 13.0 of the installed cuda-python" in old
    assert "[tensorrt-cu12]" in old and "no CUDA GPU" not in old
    assert "[tensorrt-cu" not in cuda_reason("cudaErrorInsufficientDriver", 0, 11080, 12090)  # no cu11 extra
    assert cuda_reason("cudaErrorNoDevice", 0, 12040, 12090) == "no CUDA GPU visible"
    # what cuda-bindings 12.9 answers on a machine with no driver (this one): not a driver that is too old
    assert cuda_reason("cudaErrorInsufficientDriver", 0, 0, 12090) == "no CUDA GPU visible (no NVIDIA driver loaded)"
    assert "older than the CUDA 13.0" in cuda_reason("cudaErrorInitializationError", 1, 12090, 13000)
    assert cuda_reason("cudaSuccess", 1, 13000, 13000) == "" and cuda_reason("cudaSuccess", 1, 12040, 12090) == ""
    assert "precision_is_set" in polygraphy_reason("0.49.26") and polygraphy_reason("0.53.6") == ""


def test_status_here_names_the_real_reason():
    usable, why = tensorrt_status()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert not usable and why.startswith("`import tensorrt` failed (ModuleNotFoundError")


NVRTC_13_5 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 107, 110, 120, 121]  # nvrtcGetSupportedArchs of NVRTC 13.5


def test_kernel_built_as_a_cubin_for_the_gpu_ptx_only_without_one():  # issue 22, defect 1
    t = kernel_target("9.0", NVRTC_13_5)
    assert (t.kind, t.arch, t.note, t.option) == ("cubin", 90, "", "--gpu-architecture=sm_90")
    for cc in ("8.0", "8.6", "8.9", "10.0", "12.0", "12.1"):
        assert kernel_target(cc, NVRTC_13_5).kind == "cubin" and not kernel_target(cc, NVRTC_13_5).note
    t = kernel_target("8.9", [75, 80, 86])  # an NVRTC without sm_89: the sm_86 cubin runs on 8.9
    assert (t.kind, t.arch) == ("cubin", 86) and "no sm_89" in t.note
    t = kernel_target("12.1", [80, 90, 120])
    assert (t.kind, t.arch) == ("cubin", 120)
    t = kernel_target("13.0", NVRTC_13_5)  # a GPU newer than this NVRTC: PTX, JIT-compiled by its (newer) driver
    assert (t.kind, t.arch, t.option) == ("ptx", 121, "--gpu-architecture=compute_121") and "PTX" in t.note
    t = kernel_target("9.0", [75, 80, 86, 89, 100])  # no cubin of major 9 (sm_100 does not run on 9.0)
    assert (t.kind, t.arch) == ("ptx", 89)
    with pytest.raises(BackendError, match="NVRTC supports"):
        kernel_target("7.0", NVRTC_13_5)  # older than anything this NVRTC builds


def test_graph_key_is_rows_and_every_address():  # issue 22, defect 5
    a = graph_key(4, {"x": (0x100, 64), "s": (0x200, 64)})
    assert a == (4, (("s", 0x200), ("x", 0x100))) == graph_key(4, {"s": (0x200, 1), "x": (0x100, 1)})
    assert graph_key(4, {"x": (0x300, 64), "s": (0x200, 64)}) != a and graph_key(2, {"x": (0x100, 64),
                                                                                     "s": (0x200, 64)}) != a


def test_build_log_shows_each_warning_once_and_keeps_errors():  # issue 22, defect 9
    said = []
    log = BuildLog(said.append, shown=2)
    for level, msg in [("warning", "Weights of fc1 were converted to FP16"), ("error", "node 3: bad input"),
                       ("warning", "Weights of fc1 were converted to FP16"), ("warning", "timing cache mismatch"),
                       ("warning", "layer q not run in FP8"), ("info", "building"), ("verbose", "tactic 7")]:
        log.record(level, msg)
    assert said == ["TensorRT warning: Weights of fc1 were converted to FP16",
                    "TensorRT warning: timing cache mismatch"]
    assert log.errors == ["node 3: bad input"] and len(log.warnings) == 3
    assert log.summary() == "TensorRT: 1 more distinct warnings not shown" and BuildLog().summary() == ""
