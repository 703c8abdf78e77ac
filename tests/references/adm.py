"""ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py), restated densely in float64 numpy, for tests
only: the Inception Score over splits in the given order, and k-NN precision and recall."""
from __future__ import annotations

import numpy as np


def ref_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's compute_inception_score restated: softmax, splits of split_size in order, exp(mean KL), mean."""
    logits = np.asarray(logits, np.float64)
    preds = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # no max shift: moderate logits only
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def ref_precision_recall(ref: np.ndarray, smp: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Dense restatement of ADM's ManifoldEstimator: radius = k-th neighbour (self excluded) by sorting whole rows
    of direct squared differences; precision over samples in any reference ball, recall the other way round."""
    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]  # column 0 is self
    r_smp = np.sort(d2(smp, smp), axis=1)[:, k]
    cross = d2(ref, smp)  # (N1, N2)
    precision = np.mean([(cross[:, j] <= r_ref).any() for j in range(len(smp))])
    recall = np.mean([(cross[i, :] <= r_smp).any() for i in range(len(ref))])
    return float(precision), float(recall)


# --------------------------------------------------------------------------------------- Inception Score
