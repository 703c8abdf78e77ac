"""Engine I/O, described once. The exporter, the builder and the runtime all read these.

Dims are symbolic: "B" is the dynamic batch; the others resolve against `Dims` (C channels, H = W latent side,
L tokens, D hidden size, IC/IH the channels and side of the images the folder produces: the VAE decoder's
output, or the latents themselves where there is no VAE graph). `Dims` is derived once, at export, and
recorded in the manifest; every later stage reads it from there. Tolerances live in the precision table
(`core.precision`). Every engine's I/O is float32 (int64 labels) whatever its inner precision, so the host
loop keeps x in fp32. Torch-free.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .config import ModelConfig
from .errors import ConfigError

BATCH = "B"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[str, ...]

    def shape(self, dims: "Dims", batch: int) -> tuple[int, ...]:
        values = dims.as_dict()
        return tuple(batch if d == BATCH else values[d] for d in self.dims)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: "batch" for i, d in enumerate(t.dims) if d == BATCH} for t in self.inputs + self.outputs}

    def dummy_inputs(self, dims: "Dims", batch: int, rng: np.random.Generator,
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


ENCODER = GraphSpec(
    "encoder",
    inputs=(TensorSpec("x", "float32", (BATCH, "C", "H", "W")), TensorSpec("t", "float32", (BATCH,)),
            TensorSpec("y", "int64", (BATCH,))),
    outputs=(TensorSpec("s", "float32", (BATCH, "L", "D")),),
)
DECODER = GraphSpec(
    "decoder",
    inputs=(TensorSpec("x", "float32", (BATCH, "C", "H", "W")), TensorSpec("s", "float32", (BATCH, "L", "D"))),
    outputs=(TensorSpec("v", "float32", (BATCH, "C", "H", "W")),),
)
VAE_DECODER = GraphSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent", "float32", (BATCH, "C", "H", "W")),),
    outputs=(TensorSpec("image", "float32", (BATCH, "IC", "IH", "IH")),),
)
SPECS = {s.name: s for s in (ENCODER, DECODER, VAE_DECODER)}


@dataclass(frozen=True)
class Dims:
    """Values of the symbolic dims of one folder's graphs."""

    C: int
    H: int
    W: int
    L: int
    D: int
    IC: int
    IH: int

    @staticmethod
    def of(cfg: ModelConfig, image_channels: int | None = None, vae_factor: int | None = None) -> "Dims":
        """A model's dims; with a VAE (its output channels and upsampling factor) the images are the VAE's,
        without one the latents are the images."""
        return Dims(C=cfg.in_channels, H=cfg.latent_size, W=cfg.latent_size, L=cfg.num_tokens, D=cfg.hidden_size,
                    IC=cfg.in_channels if image_channels is None else image_channels,
                    IH=cfg.latent_size * (1 if vae_factor is None else vae_factor))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def image(self) -> tuple[int, int]:
        """(side, channels) of the images the folder produces."""
        return self.IH, self.IC


@dataclass(frozen=True)
class BatchProfile:
    """Engine batch range (the CFG batch counts: 2 x images while guidance is on)."""

    min: int = 1
    opt: int = 16
    max: int = 64

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError("--batch", "MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX", f"{self.min}:{self.opt}:{self.max}")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    @staticmethod
    def parse(text: str) -> "BatchProfile":
        try:
            lo, opt, hi = (int(v) for v in text.split(":"))
        except ValueError:
            raise ConfigError("--batch", "MIN:OPT:MAX, three integers", text)
        return BatchProfile(lo, opt, hi)
