"""Engine I/O, described once. The exporter, the builder and the runtime all read these.

Dims are symbolic: "B" is the dynamic batch; the others resolve against a model config
(C channels, H = W latent side, L tokens, D hidden size, IC/IH image channels and side for the VAE).
Every engine's I/O is float32 (int64 labels) whatever its inner precision, so the host loop keeps x in fp32.
Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig

BATCH = "B"
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
GRAPHS = ("encoder", "decoder", "vae_decoder")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[str, ...]

    def shape(self, dims: dict[str, int], batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else dims[d] for d in self.dims)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # max |out - ref| / max |ref| allowed against the fp32 PyTorch reference, per precision
    tolerance: dict[str, float]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: "batch" for i, d in enumerate(t.dims) if d == BATCH} for t in self.inputs + self.outputs}

    def dummy_inputs(self, dims: dict[str, int], batch: int, rng: np.random.Generator,
                     num_classes: int | None = None) -> dict[str, np.ndarray]:
        """Random inputs of the right shapes and dtypes; labels include the null class."""
        out = {}
        for t in self.inputs:
            shape = t.shape(dims, batch)
            if t.dtype == "int64":
                out[t.name] = rng.integers(0, (num_classes or 1) + 1, size=shape, dtype=np.int64)
            elif t.name == "t":
                out[t.name] = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
            else:
                out[t.name] = rng.standard_normal(shape, dtype=np.float32)
        return out


_TOL_DDT = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2, "fp8": 0.2}
_TOL_VAE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2, "fp8": 6e-2}

ENCODER = GraphSpec(
    "encoder",
    inputs=(TensorSpec("x", "float32", (BATCH, "C", "H", "W")), TensorSpec("t", "float32", (BATCH,)),
            TensorSpec("y", "int64", (BATCH,))),
    outputs=(TensorSpec("s", "float32", (BATCH, "L", "D")),),
    tolerance=_TOL_DDT,
)
DECODER = GraphSpec(
    "decoder",
    inputs=(TensorSpec("x", "float32", (BATCH, "C", "H", "W")), TensorSpec("s", "float32", (BATCH, "L", "D"))),
    outputs=(TensorSpec("v", "float32", (BATCH, "C", "H", "W")),),
    tolerance=_TOL_DDT,
)
VAE_DECODER = GraphSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent", "float32", (BATCH, "C", "H", "W")),),
    outputs=(TensorSpec("image", "float32", (BATCH, "IC", "IH", "IH")),),
    tolerance=_TOL_VAE,
)
SPECS = {s.name: s for s in (ENCODER, DECODER, VAE_DECODER)}


def model_dims(cfg: ModelConfig, image_channels: int = 3, vae_factor: int = 8) -> dict[str, int]:
    """Values of the symbolic dims for one model."""
    return {"C": cfg.in_channels, "H": cfg.latent_size, "W": cfg.latent_size, "L": cfg.num_tokens,
            "D": cfg.hidden_size, "IC": image_channels, "IH": cfg.latent_size * vae_factor}


@dataclass(frozen=True)
class BatchProfile:
    """Engine batch range (the CFG batch counts: 2 x images while guidance is on)."""

    min: int = 1
    opt: int = 16
    max: int = 64

    def __post_init__(self):
        from .errors import ConfigError

        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError("--batch", "MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX", f"{self.min}:{self.opt}:{self.max}")

    @staticmethod
    def parse(text: str) -> "BatchProfile":
        from .errors import ConfigError

        try:
            lo, opt, hi = (int(v) for v in text.split(":"))
        except ValueError:
            raise ConfigError("--batch", "MIN:OPT:MAX, three integers", text)
        return BatchProfile(lo, opt, hi)
