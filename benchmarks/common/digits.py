"""The bundled digits model's quality measures, shared by fid_digits, dp_vs_uniform, adm_digits and fp8_recipes.

`fid_run`: `generate` on an engine folder (the production host loop, onnxruntime), the digits features of the
samples against the bundled statistics of all 1797 real digits, and how many samples independent classifiers
read as their class. `bootstrap_draws`: the paired bootstrap of a FID difference over the sample indices.
`limit_threads`: one intra-op thread per onnxruntime session and for torch (faster on a shared 2-core machine).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ddt_export.core.images import images_from_samples
from ddt_export.core.numerics import relative_errors
from ddt_export.evaluate.fid import fid, stats_from_features
from ddt_export.runtime.generate.generate import RunOptions, generate
from ddt_export.runtime.sampling.request import RequestInput

ROOT = Path(__file__).resolve().parents[2]


def real_digits_16() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 1, 16, 16) float32 in [-1, 1] as the model was trained on them, and the labels."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    from train_digits import load_digits_16  # scripts/: the training script's own preprocessing

    x, y = load_digits_16()
    return x.numpy(), y.numpy()


def classifiers():
    """RBF SVC and logistic regression on 80% of the real pixels; (name, fitted, held-out accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    x, y = real_digits_16()
    x = x.reshape(len(x), -1)
    xa, xb, ya, yb = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    out = []
    for name, clf in (("svc", SVC(gamma="scale")), ("logreg", LogisticRegression(max_iter=3000))):
        clf.fit(xa, ya)
        out.append((name, clf, float((clf.predict(xb) == yb).mean())))
    return out


def fid_run(folder: Path, num: int, seed: int, spec: str, data, ext, clfs) -> dict:
    """`num` samples of seed `seed` (classes cycled), schedule `spec`: FID against `data`, recognition by `clfs`,
    the recompute steps, the latents and the features."""
    t0 = time.time()
    res = generate(folder, RequestInput(num=num, seed=seed, schedule=spec), RunOptions(), say=lambda m: None)
    features = ext.extract(images_from_samples(res.latents))  # (num, 64) float64
    value = fid(stats_from_features(features), data)
    flat = np.clip(res.latents, -1, 1).reshape(num, -1)
    recognized = {name: float((clf.predict(flat) == res.labels).mean()) for name, clf, _ in clfs}
    return {"fid": value, "recognized": recognized, "encoder_steps": len(res.schedule),
            "recompute_steps": res.schedule, "seconds": time.time() - t0, "latents": res.latents,
            "features": features}


def deviation(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-sample ||a - b|| / ||b|| of two runs from the same noise: mean and max."""
    err = relative_errors(a, b)
    return {"mean": float(err.mean()), "max": float(err.max())}


def bootstrap_draws(a: np.ndarray, b: np.ndarray, data, draws: int, seed: int) -> np.ndarray:
    """FID(a) - FID(b) for features (N, d) of the same N samples, over `draws` resamplings of the sample indices
    with replacement (the same indices on both sides, so the pairing is kept): (draws,) float64."""
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for k in range(draws):
        idx = rng.integers(0, len(a), len(a))
        out[k] = fid(stats_from_features(a[idx]), data) - fid(stats_from_features(b[idx]), data)
    return out


def limit_threads(n: int) -> None:
    """Intra-op threads of every onnxruntime session and of torch. On a 2-core machine shared with other jobs,
    one thread per session measured twice as fast as onnxruntime's default (2 spinning threads) and 20x faster
    than torch's 2 threads. Throughput only: the numbers computed do not depend on it."""
    import onnxruntime as ort
    import torch

    class Options(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.intra_op_num_threads = n

    ort.SessionOptions = Options
    torch.set_num_threads(n)
