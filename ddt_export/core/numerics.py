"""How far one tensor is from another: the one measure every parity number uses. Torch-free."""
from __future__ import annotations

import numpy as np


def tensor_errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, ||out - ref|| / ||ref||) in float64: the precision table's tolerance measure
    and the relative L2 error of one tensor; (inf, inf) when out is not finite."""
    if not np.isfinite(out).all():
        return float("inf"), float("inf")
    ref64, diff = np.asarray(ref, np.float64), np.asarray(out, np.float64) - np.asarray(ref, np.float64)
    return (float(np.abs(diff).max() / max(np.abs(ref64).max(), 1e-12)),
            float(np.linalg.norm(diff) / max(np.linalg.norm(ref64), 1e-12)))


def relative_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) float64 ||a_i - b_i|| / ||b_i|| over each sample's elements; a, b (B, ...) float."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)
