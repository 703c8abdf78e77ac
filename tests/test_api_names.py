"""Every TensorRT and cuda-python name the project uses exists in the real bindings, and none is deprecated there.

The used names are read from ddt_export/ and scripts/ by AST (tests/api_names.py), not listed by hand. The
TensorRT names are checked against the tensorrt.so of the installed `tensorrt-cu13-bindings` wheel (the
[cuda-check] extra, in [dev]), read as data: it does not import without libnvinfer. The cuda-python names are
checked with getattr on the installed cuda.bindings. Where a wheel is missing the check skips with the reason,
except under CI (CI=true), where it fails: the names are checked in CI or CI fails.
"""
from __future__ import annotations

import os
import textwrap

import pytest

from api_names import (TrtBinding, _File, binding_path, binding_version, cuda_problems, trt_problems, used_names)

CI = bool(os.environ.get("CI"))
BINDING = binding_path()
needs_binding = pytest.mark.skipif(BINDING is None and not CI,
                                   reason="tensorrt-cu13-bindings is not installed (pip install -e '.[cuda-check]')")


def _cuda_reason() -> str:
    try:
        import cuda.bindings.runtime  # noqa: F401
    except ImportError as e:
        return f"cuda-bindings is not installed (pip install -e '.[cuda-check]'): {e}"
    return ""


needs_cuda = pytest.mark.skipif(bool(_cuda_reason()) and not CI, reason=_cuda_reason() or "ok")


@pytest.fixture(scope="module")
def used():
    return used_names()


@pytest.fixture(scope="module")
def binding():
    assert BINDING is not None, "tensorrt-cu13-bindings is not installed: CI installs it with the [cuda-check] extra"
    return TrtBinding(BINDING)


def test_the_collector_finds_every_kind_of_use(used):
    """Module chains, aliases, objects followed through variables, self attributes, returns and parameters, and
    overrides: each kind of use the adapter makes is found (a collector that found nothing would pass)."""
    trt = used["tensorrt"]
    assert {("Runtime",), ("Logger", "WARNING"), ("TensorIOMode", "INPUT"), ("nptype",)} <= set(trt)
    assert ("ILogger", "Severity", "WARNING") in trt  # through `sev = trt.ILogger.Severity`
    assert ("*", "deserialize_cuda_engine") in trt  # TrtBackend.runtime -> TrtGraph(runtime) parameter
    assert ("*", "execute_async_v3") in trt  # a context from _new_context(), handed to _execute(ctx)
    assert {("*", "get_tensor_profile_shape"), ("*", "device_memory_size_v2"), ("*", "node_name")} <= set(trt)
    assert ("*", "log") in trt  # the build logger's override, called by TensorRT by name
    assert ("cudaMemcpyKind", "cudaMemcpyHostToDevice") in used["cuda.bindings.runtime"]
    assert ("nvrtcGetCUBIN",) in used["cuda.bindings.nvrtc"] and ("cuLaunchKernel",) in used["cuda.bindings.driver"]
    assert ("get_cuda_native_handle",) in used["cuda.bindings.utils"]
    assert not any(c[-1] in ("errors", "sink", "spec", "buffers") for c in trt)  # the project's own attributes


def test_the_collector_on_a_written_example(tmp_path):
    src = tmp_path / "example.py"
    src.write_text(textwrap.dedent("""
        import numpy as np
        from .tensorrt import helper            # the project's own module, not TensorRT

        def make(path):
            import tensorrt as trt
            rt = check(trt.Runtime(trt.Logger(trt.Logger.ERROR)), "rt")
            eng = rt.deserialize_cuda_engine(open(path, "rb").read())
            use(eng)
            return np.zeros(3).sum()

        def use(engine):
            engine.create_execution_context().set_optimization_profile_async(0, 1)
            helper.not_tensorrt()
    """))
    f = _File(src)
    f.chains()
    f.trt_objects()
    got = {c[1:] for c in f.uses if c[0] == "tensorrt"}
    assert got == {("Runtime",), ("Logger",), ("Logger", "ERROR"), ("*", "deserialize_cuda_engine"),
                   ("*", "create_execution_context"), ("*", "set_optimization_profile_async")}


@needs_binding
def test_every_tensorrt_name_exists_and_none_is_deprecated(used, binding):
    assert binding_version(binding.path).startswith("11.")
    assert trt_problems(used["tensorrt"], binding) == []


@needs_binding
def test_the_binding_reader_catches_what_it_must(binding):
    """So the test above can fail: a missing name, issue 22's STRONGLY_TYPED (deprecated in 11.0, tied to its
    enum value by the registration code), a deprecated property (`:ivar`) and a method whose note sits in a table
    (its replacement named `<name>_v2`); a merged string tail ("Logger" inside "ILogger") still counts."""
    assert {"Logger", "ILogger", "execute_async_v3", "USER_MANAGED", "nptype"} <= binding.names
    old = trt_problems({("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"): ["builder/tensorrt.py (before)"]},
                       binding)
    assert len(old) == 1 and "Deprecated in TensorRT 11.0" in old[0]
    assert "is not in" in trt_problems({("*", "execute_async_v4"): ["x"]}, binding)[0]
    assert trt_problems({("*", "has_implicit_batch_dimension"): ["x"]}, binding)
    assert trt_problems({("*", "add_attention"): ["x"]}, binding)  # "Deprecated, use add_attention_v2 instead"
    assert trt_problems({("*", "add_attention_v2"): ["x"]}, binding) == []


@needs_cuda
def test_every_cuda_python_name_exists(used):
    import cuda.bindings

    assert cuda_problems(used) == [], cuda.bindings.__version__
    assert cuda_problems({"cuda.bindings.runtime": {("cudaMemcpyKind", "cudaMemcpyHostToHostt"): ["x"]}})
