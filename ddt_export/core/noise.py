"""The one noise function: initial latents for generate, validate, calibrate and the server. Torch-free."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def make_noise(seed: int, num: int, latent_shape: Sequence[int]) -> np.ndarray:
    """(num, C, H, W) float32 standard normal from numpy's default_rng(seed)."""
    return np.random.default_rng(seed).standard_normal((num, *latent_shape), dtype=np.float32)
