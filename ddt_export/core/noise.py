"""The one noise function: every random draw of a sampling run, per sample. Torch-free.

Image `i` of a run with seed `S` gets everything random from `(S, i)` alone:
- its initial latent: `numpy.random.default_rng([S, i]).standard_normal((C, H, W), float32)`;
- its SDE step noise (the `sde`/`sde_preserve` step functions): the draws of
  `numpy.random.default_rng([S, i, STEP_STREAM])`, one `(C, H, W)` draw per noisy step, in step order.
So a sample does not depend on the batch it ran in, the chunking, the shard or the order: generate, validate,
calibrate, the server and the Ray workers all call `sample_noise` / `StepNoise` and get the same pixels.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .errors import InputError

STEP_STREAM = 1  # the third word of a sample's step-noise seed: a stream apart from its initial latent


def _indices(indices: Iterable[int]) -> list[int]:
    out = [int(i) for i in indices]
    if any(i < 0 for i in out):
        raise InputError("sample index", ">= 0", min(out))
    return out


def _seed(seed: int) -> int:
    """A request's seed is checked where the request is resolved (named as its caller names it); this is the
    library's own guard, named as the library names it."""
    if int(seed) < 0:
        raise InputError("seed", ">= 0", seed)
    return int(seed)


def sample_noise(seed: int, indices: Iterable[int], latent_shape: Sequence[int]) -> np.ndarray:
    """(n, C, H, W) float32: row k is the initial latent of sample indices[k] of seed `seed`."""
    seed = _seed(seed)
    rows = [np.random.default_rng([seed, i]).standard_normal(tuple(latent_shape), dtype=np.float32)
            for i in _indices(indices)]
    return np.stack(rows) if rows else np.zeros((0, *latent_shape), np.float32)


class StepNoise:
    """SDE step noise per sample, with numpy Generator's `standard_normal(shape, dtype)` signature, so the host
    loop and the PyTorch reference take it where they take a generator: a (B, ...) draw is row k from sample
    indices[k]'s own stream."""

    def __init__(self, seed: int, indices: Iterable[int]):
        seed = _seed(seed)
        self.indices = _indices(indices)
        self.generators = [np.random.default_rng([seed, i, STEP_STREAM]) for i in self.indices]

    def standard_normal(self, shape, dtype=np.float64) -> np.ndarray:
        shape = tuple(shape)
        if not shape or shape[0] != len(self.generators):
            raise AssertionError(f"step noise for {len(self.generators)} samples, asked {shape}")
        return np.stack([g.standard_normal(shape[1:], dtype=dtype) for g in self.generators])

    def subset(self, rows: Sequence[int]) -> "StepNoise":
        """The same streams for some of the rows (a scheduler's batch mixes requests): shares the generators."""
        out = StepNoise.__new__(StepNoise)
        out.indices = [self.indices[r] for r in rows]
        out.generators = [self.generators[r] for r in rows]
        return out
