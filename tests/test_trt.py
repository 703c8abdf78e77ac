"""TensorRT build and runtime. GPU tests skip, with the reason, where `import tensorrt` fails or no GPU is visible;
the status check needs only cuda-python and libnvrtc.

Everything around TensorRT (profiles, manifests, staleness, the host loop, FP8 graphs) is tested on CPU in
test_build / test_quantize, the backend's decisions (alignment, the spec check, CUDA-graph plan and fallback,
batch padding, step-time table, the device loop's calls, the kernel's build, unusable/driver reasons) in
test_trt_plan, the adapter's logic over a stand-in (threads, close order, cleanup) in test_trt_adapter, the
kernel in test_trt_kernel and the names against the real bindings in test_api_names; these tests check the thin
TensorRT layer itself against onnxruntime and the host loop.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from runs import run_build as build
from ddt_export.builder.tensorrt import profile_shapes, tensorrt_status
from ddt_export.core.errors import InputError
from ddt_export.core.specs import BatchProfile
from kernel_restatements import nvrtc_reason

usable, why = tensorrt_status()


def needs_gpu(fn):
    """Marked tensorrt + gpu; skipped with the reason where TensorRT or the GPU is missing."""
    for mark in (pytest.mark.tensorrt, pytest.mark.gpu,
                 pytest.mark.skipif(not usable, reason=f"TensorRT engines need tensorrt + cuda-python + a GPU: {why}")):
        fn = mark(fn)
    return fn


@pytest.mark.skipif(bool(nvrtc_reason()), reason=nvrtc_reason() or "ok")
def test_check_raises_on_real_cuda_status():
    from cuda.bindings import nvrtc

    from ddt_export.core.errors import BackendError
    from ddt_export.runtime.graphs.gpu import check

    prog = check(nvrtc.nvrtcCreateProgram(b"this is not CUDA", b"bad.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        with pytest.raises(BackendError, match="NVRTC_ERROR_COMPILATION"):
            check(nvrtc.nvrtcCompileProgram(prog, 0, []), "nvrtcCompileProgram")
    finally:
        check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")  # issue 22, defect 12
    with pytest.raises(BackendError, match="TensorRT reported a failure"):
        check(None, "deserialize")  # TensorRT's failure value


# ---------------------------------------------------------------- TensorRT and a GPU


@pytest.fixture(scope="module")
def trt_fp16(tmp_path_factory, official_ckpt):
    ckpt, yaml, _ = official_ckpt
    out = tmp_path_factory.mktemp("trt") / "fp16"
    res = build("fp16", out=out, ckpt=ckpt, config=str(yaml), timing_cache=out.parent / "timing.cache",
                say=lambda m: None)
    return out, res


@needs_gpu
def test_build_writes_plans_and_manifest(trt_fp16, tiny_cfg):
    out, res = trt_fp16
    man = res.manifest
    assert res.backend == "tensorrt" and man.backend == "tensorrt" and man.precision == "fp16"
    platform = dict(man.provenance.platform)
    assert man.tensorrt["strongly_typed"] and platform["tensorrt"] and platform["gpu"]
    assert "." in platform["compute_capability"]
    assert man.tensorrt["profiles"]["decoder"] == profile_shapes("decoder", man.dims, man.batch)
    for g in ("encoder", "decoder"):
        assert (out / f"{g}.plan").is_file() and man.graphs[g].info["onnx"]["sha256"]
    assert (out.parent / "timing.cache").is_file()


@needs_gpu
def test_plans_match_onnxruntime(trt_fp16, tiny_cfg):
    from ddt_export.core.specs import ENCODER
    from ddt_export.runtime import load_engines

    out, _ = trt_fp16
    with load_engines(out) as trt_eng, load_engines(out / "onnx") as ort_eng:  # closed (issue 22, defect 12)
        feeds = ENCODER.dummy_inputs(trt_eng.dims, 3, np.random.default_rng(0), tiny_cfg.model.num_classes)
        s_trt, s_ort = trt_eng.encoder(**feeds), ort_eng.encoder(**feeds)
        # the same fp16 graph (fp32 islands) on two runtimes: only kernel rounding differs
        assert np.abs(s_trt - s_ort).max() / np.abs(s_ort).max() < 5e-3
        v_trt, v_ort = trt_eng.decoder(feeds["x"], s_ort), ort_eng.decoder(feeds["x"], s_ort)
        assert np.abs(v_trt - v_ort).max() / np.abs(v_ort).max() < 5e-3


@needs_gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_device_loop_equals_host_loop(trt_fp16, tiny_cfg, cuda_graphs):
    from ddt_export.runtime import load_engines

    out, _ = trt_fp16
    with load_engines(out) as eng, load_engines(out, device_loop=False) as host_eng:
        _device_vs_host(eng, host_eng, tiny_cfg, cuda_graphs)


def _device_vs_host(eng, host_eng, tiny_cfg, cuda_graphs):
    from ddt_export.core.specs import ENCODER
    from ddt_export.runtime import sample
    from ddt_export.runtime.sampling.trt_loop import sample_on_device

    assert eng.loop == "device" and host_eng.loop == "host"  # chosen once, at load
    sampler = eng.config.sampler
    noise = np.random.default_rng(1).standard_normal((2, 4, 8, 8), dtype=np.float32)
    labels = np.array([1, 2])
    schedule = list(range(0, sampler.num_steps, 3))  # cond-only steps with a 2B state: s bound by offset
    host = sample(host_eng, noise, labels, sampler, schedule)
    dev = sample_on_device(eng, noise, labels, sampler, schedule, cuda_graphs=cuda_graphs)
    if not cuda_graphs:
        assert np.array_equal(sample(eng, noise, labels, sampler, schedule), dev)  # sample() runs the device loop
    assert np.abs(dev - host).max() / np.abs(host).max() < 1e-5  # same engines, same float32 update
    enc = eng.runner("encoder")
    keys = set(enc.plan.captured)
    again = sample_on_device(eng, noise, labels, sampler, schedule, cuda_graphs=cuda_graphs)
    assert np.abs(again - dev).max() <= 1e-6 * np.abs(dev).max()
    assert enc.plan.captured == keys  # one sampler per engine set: no new graph keys (issue 22, defect 5)
    assert len(enc._keyed) == len(keys) + len(enc.plan.failed)  # no context per call either
    assert not enc.plan.failed, enc.plan.failed
    feeds = ENCODER.dummy_inputs(eng.dims, 3, np.random.default_rng(0), tiny_cfg.model.num_classes)
    a, b = eng.encoder(**feeds), host_eng.encoder(**feeds)  # the runners' own path: graphs stayed off
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    eng.close()
    eng.close()  # idempotent (and the with block closes a third time)


@needs_gpu
def test_device_loop_runs_every_solver_and_forecast(trt_fp16):
    """The fast-sampling plans on the GPU: adams:K and forecast 1 / 2 (the cfg_adams and forecast kernels, the
    history rings) against the host loop on the same engines, guided and cond-only steps, an irregular schedule;
    then a second pass over every plan allocates nothing and adds no CUDA-graph key."""
    import dataclasses

    from ddt_export.runtime import load_engines, sample
    from ddt_export.runtime.sampling.trt_loop import device_sampler

    out, _ = trt_fp16
    noise = np.random.default_rng(2).standard_normal((3, 4, 8, 8), dtype=np.float32)
    labels = np.array([1, 2, 7])
    with load_engines(out) as eng, load_engines(out, device_loop=False) as host_eng:
        plans = [dataclasses.replace(eng.config.sampler, num_steps=12, solver=solver, forecast=forecast)
                 for solver in ("euler", "adams:2", "adams:4") for forecast in (0, 1, 2)]
        schedule = [0, 1, 2, 4, 7, 11]
        for sampler in plans:
            host = sample(host_eng, noise, labels, sampler, schedule)
            dev = sample(eng, noise, labels, sampler, schedule)
            rel = np.abs(dev - host).max() / np.abs(host).max()
            assert rel < 1e-5, (sampler.solver, sampler.forecast, rel)
        loop, keys = device_sampler(eng), set(eng.runner("decoder").plan.captured)
        history = loop.history
        for sampler in plans:
            sample(eng, noise, labels, sampler, schedule)
        assert loop.history is history and loop.history_size == (4, 2)
        assert eng.runner("decoder").plan.captured == keys


@needs_gpu
def test_device_loop_on_a_fresh_thread_and_min_batch(tmp_path, official_ckpt):
    """A thread with no current CUDA context, and engines whose batch.min exceeds the samples (4); the device loop
    and the host loop on two threads at once over the same runners (issue 22, defects 2 and 6)."""
    import threading

    from ddt_export.runtime import load_engines, sample
    from ddt_export.runtime.sampling.host import sample_host

    ckpt, yaml, _ = official_ckpt
    res = build("fp16", out=tmp_path / "min4", ckpt=ckpt, config=str(yaml), batch=BatchProfile(4, 8, 16),
                say=lambda m: None)
    with load_engines(res.folder) as eng, load_engines(res.folder, device_loop=False) as host_eng:
        sampler = eng.config.sampler
        noise = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
        got: dict = {}

        def on_thread(name, fn):
            try:
                got[name] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below with its own message
                got[name] = e

        host = sample(host_eng, noise, np.array([5]), sampler, [0, 5, 10])  # the host loop pads as well
        threads = [threading.Thread(target=on_thread, args=("dev", lambda: sample(eng, noise, np.array([5]),
                                                                                  sampler, [0, 5, 10]))),
                   threading.Thread(target=on_thread, args=("host", lambda: sample_host(eng, noise, np.array([5]),
                                                                                        sampler, [0, 5, 10])))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for name in ("dev", "host"):
            assert name in got, f"the {name} thread did not finish in 120 s"
            if isinstance(got[name], BaseException):
                raise got[name]
        assert got["dev"].shape == (1, 4, 8, 8) and np.abs(got["dev"] - host).max() / np.abs(host).max() < 1e-5
        assert np.array_equal(got["host"], host)
        with pytest.raises(InputError, match="2 x 9"):
            sample(eng, np.repeat(noise, 9, axis=0), np.full(9, 5), sampler, [0])  # 18 CFG rows > 16: refused


@needs_gpu
def test_engine_spec_mismatch_is_refused(trt_fp16, tmp_path):
    """A plan whose I/O is not its spec's (the encoder's plan named decoder.plan) is refused at load."""
    import shutil

    from ddt_export.core.artifacts import sha256_file
    from ddt_export.core.errors import ArtifactError
    from ddt_export.runtime import load_engines

    out, _ = trt_fp16
    copy = tmp_path / "swapped"
    shutil.copytree(out, copy)
    shutil.copy(copy / "encoder.plan", copy / "decoder.plan")
    man = json.loads((copy / "manifest.json").read_text())
    man["graphs"]["decoder"]["sha256"] = sha256_file(copy / "decoder.plan")
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="missing tensor v"):
        load_engines(copy)


@needs_gpu
def test_reuse_and_platform_check(trt_fp16, official_ckpt, tmp_path):
    import shutil

    from ddt_export.core.errors import BackendError
    from ddt_export.runtime import load_engines

    out, _ = trt_fp16
    ckpt, yaml, _ = official_ckpt
    assert build("fp16", out=out, ckpt=ckpt, config=str(yaml), say=lambda m: None).reused
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["provenance"]["platform"]["tensorrt"] = "0.0.1"
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BackendError, match="rebuild"):
        load_engines(copy)


@needs_gpu
def test_fp8_engine(tmp_path, official_ckpt):
    from ddt_export.builder.tensorrt import running_platform
    from ddt_export.core.precision import PRECISIONS
    from ddt_export.runtime import load_engines, sample

    cc = tuple(int(v) for v in running_platform()["compute_capability"].split("."))
    if cc < PRECISIONS["fp8"].min_cc:
        pytest.skip(f"FP8 engines need compute capability >= 8.9; this GPU has {cc}")
    ckpt, yaml, _ = official_ckpt
    res = build("fp8", out=tmp_path / "fp8", ckpt=ckpt, config=str(yaml), say=lambda m: None)
    with load_engines(res.folder) as eng, load_engines(res.folder / "onnx" / "stages" / "fp32") as ref:
        sampler = ref.config.sampler
        noise = np.random.default_rng(2).standard_normal((2, 4, 8, 8), dtype=np.float32)
        a = sample(eng, noise, np.array([3, 4]), sampler, list(range(sampler.num_steps)))
        b = sample(ref, noise, np.array([3, 4]), sampler, list(range(sampler.num_steps)))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.05  # the CPU test's bar (test_build: FP8 acceptance)
