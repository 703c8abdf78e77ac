"""The precision table: one row per engine precision, and everything the stages need to know about it.

A precision is one value (`fp32 | fp16 | bf16 | fp8`); its behaviour is read from its row, never from string
comparisons spread over the stages. Adding a precision is adding a row here. Torch-free.

- `dtype`: the graphs' compute dtype (numpy/torch name); the engine I/O stays float32 whatever it is.
- `ort_cpu`: onnxruntime's CPU provider runs the graphs (1.32 has no bfloat16 MatMul/Gemm kernel), so parity is
  measured on this machine; otherwise the reason is recorded instead of a number.
- `min_cc`: the least CUDA compute capability whose tensor cores TensorRT needs for it (None: any GPU); the GPUs
  the project targets are `GPU_ARCHS`.
- `tolerance`: per graph, max |out - ref| / max |ref| allowed against the fp32 PyTorch reference.
- `quantized`: the graphs are Q/DQ graphs made from an fp32 export plus a `hosts_quantized` precision (the one
  everything outside the quantized GEMMs runs in).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: str
    ort_cpu: bool
    min_cc: tuple[int, int] | None
    tolerance: Mapping[str, float]  # graph name -> tolerance
    quantized: bool = False
    hosts_quantized: bool = False
    note: str = ""  # why min_cc or ort_cpu are what they are, for error messages

    def tol(self, graph: str) -> float:
        return self.tolerance[graph]


def _tol(ddt: float, vae: float) -> Mapping[str, float]:
    return MappingProxyType({"encoder": ddt, "decoder": ddt, "vae_decoder": vae})


_ROWS = (
    Precision("fp32", "float32", ort_cpu=True, min_cc=None, tolerance=_tol(1e-4, 1e-4)),
    Precision("fp16", "float16", ort_cpu=True, min_cc=None, tolerance=_tol(2e-2, 2e-2), hosts_quantized=True),
    Precision("bf16", "bfloat16", ort_cpu=False, min_cc=(8, 0), tolerance=_tol(6e-2, 6e-2), hosts_quantized=True,
              note="bf16 tensor cores need Ampere (8.0) or later; onnxruntime CPU has no bf16 MatMul"),
    # the VAE is not quantized: it runs in the high precision, hence the bf16 bound
    Precision("fp8", "float8_e4m3fn", ort_cpu=True, min_cc=(8, 9), tolerance=_tol(0.2, 6e-2), quantized=True,
              note="FP8 tensor cores need Ada (8.9) or Hopper (9.0) or later"),
)
PRECISIONS: Mapping[str, Precision] = MappingProxyType({p.name: p for p in _ROWS})
# The GPU architectures (compute capability XY as sm_XY) the project targets: Ampere A100 (80) and A10 / RTX 30 (86),
# Ada (89), Hopper (90), Blackwell B200 / GB200 (100) and RTX 50 (120). A precision runs on those >= its min_cc.
# The device loop's kernel is compiled to a cubin for each of them in CI (tests/test_trt_kernel.py).
GPU_ARCHS = (80, 86, 89, 90, 100, 120)
NAMES = tuple(PRECISIONS)
HIGH_PRECISIONS = tuple(p.name for p in _ROWS if p.hosts_quantized)


def precision(name: str, what: str = "--precision") -> Precision:
    """The row of `name`, else a ConfigError naming the choices."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ConfigError(what, " | ".join(NAMES), name) from None


def high_precision(name: str, what: str = "--high-precision") -> Precision:
    """A precision that can host a quantized build's non-quantized layers (fp16 | bf16)."""
    p = precision(name, what)
    if not p.hosts_quantized:
        raise ConfigError(what, " | ".join(HIGH_PRECISIONS), name)
    return p
