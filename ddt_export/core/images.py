"""Images: sampler output to uint8, grids, PNG files. Torch-free (numpy, pillow).

Sampler output is float NCHW in about [-1, 1]; images are uint8 NHWC in [0, 255] (the format of ADM sample
batches and of image files). `images_from_samples` converts the one to the other exactly as the official
`fp2uint8` rounds (`core.sampling.to_uint8`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .artifacts import atomic_path
from .sampling import to_uint8


def images_from_samples(x: np.ndarray) -> np.ndarray:
    """Sampler output (N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8, as the official fp2uint8 rounds."""
    return np.ascontiguousarray(to_uint8(x).transpose(0, 2, 3, 1))


def tile(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """(n, H, W, C) uint8 -> one (rows * (H + pad) + pad, cols * (W + pad) + pad, C) image: rows of `cols`,
    `pad` black pixels around each image; cells past n stay black."""
    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
    return grid


def png_image(img: np.ndarray, min_side: int = 0):
    """(H, W, C) uint8 -> a PIL image: 1 or 2 channels as grayscale (the first), else the first 3 as RGB;
    upscaled (nearest, by an integer factor) to at least `min_side` pixels wide."""
    from PIL import Image

    im = (Image.fromarray(img[..., 0], mode="L") if img.shape[-1] < 3
          else Image.fromarray(np.ascontiguousarray(img[..., :3]), mode="RGB"))
    zoom = max(1, -(-min_side // im.width))  # ceil
    if zoom > 1:
        im = im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)
    return im


def save_png(img: np.ndarray, path: Path, min_side: int = 0) -> Path:
    """(H, W, C) uint8 -> PNG file, written atomically (see `png_image`)."""
    im = png_image(img, min_side)
    with atomic_path(Path(path)) as tmp:
        im.save(tmp, format="PNG")
    return Path(path)


def png_bytes(img: np.ndarray, min_side: int = 0) -> bytes:
    """(H, W, C) uint8 -> PNG bytes (see `png_image`)."""
    import io

    buf = io.BytesIO()
    png_image(img, min_side).save(buf, format="PNG")
    return buf.getvalue()
