"""ADM's metrics beside FID: Inception Score, sFID, precision and recall, as guided-diffusion's
`evaluations/evaluator.py` defines them. Torch-free numpy; float64 throughout.

- **Activations** (`Activations`): what the feature network gives per image: `pool` (N, d), the FID features
  (Inception pool_3, 2048-d; digits: 64-d); `spatial` (N, s), the sFID features (Inception `mixed_6/conv`, the
  first 7 channels of its 17x17 map flattened in (h, w, c) order, 2023-d; digits: 448-d); `logits` (N, C), what the
  Inception Score takes the softmax of.
- **Inception Score** (`inception_score`): p = softmax(logits) per image; the images in order are cut into splits
  of `IS_SPLIT` = 5000 (the last one shorter); each split scores exp(mean_i KL(p_i || mean_j p_j)); IS is the
  mean of the split scores. One difference from ADM: a probability that underflows to 0 contributes 0 (the limit
  of p log p), where ADM's `p * (log p - log m)` gives NaN; in float64 that needs logit gaps over ~700.
- **Split order** (`IS_ORDERS`, `ordered_inception_score`): ADM cuts the splits in the order the batch is stored.
  A batch stored class by class (DDT's official sampler writes its 50k samples sorted by label) gives each split
  of 5000 about a tenth of ImageNet's classes: each split's marginal p(y) is narrow and IS falls (DDT users
  report 68 against the paper's 310.6 at matching FID). `shuffled` (the default) cuts the splits from the order
  `default_rng(IS_SEED).permutation(N)`: its expectation is the batch's IS whatever the stored order. `as-given`
  is ADM's number, exactly `inception_score` above. With one split (N <= 5000) the order changes only rounding.
- **Class order** (`class_order`): whether a batch is sorted (grouped) by class, from its labels or else from
  the argmax of its logits. r = the share of neighbouring pairs (i, i+1) of one class; e = the same share
  expected in a uniformly random order of the same classes, sum_k n_k (n_k - 1) / (N (N - 1)); grouping
  g = (r - e) / (1 - e): 0 in expectation for a random order, 1 - (K - 1) / (N - n) for K classes of n images
  each sorted, and about a^2 for a sorted batch read by a classifier that keeps the label with probability a.
  Sorted: g >= `GROUPED_MIN` = 0.2. A random order of N > 5000 images gives g = 0 with a standard deviation of
  at most 0.015 (two equal classes, the worst case); a sorted batch is flagged down to a ~ 0.45. It counts runs,
  not sortedness: chunks of 8 images of one class in a random class order also read as grouped (g ~ 0.87),
  although each split of 5000 still sees every class; the warning's two IS values then agree.
- **sFID**: the Frechet distance (`fid.frechet_distance`) of Gaussian fits of `spatial`.
- **Precision and recall** (`precision_recall`): ADM's `ManifoldEstimator` with one neighbourhood size k = 3.
  Distances are squared Euclidean, max(|u|^2 - 2 u.v + |v|^2, 0). Each point's radius is the (k+1)-th smallest
  distance from it to its own set, self (distance 0) included, i.e. the k-th nearest neighbour excluding self
  (ADM's np.partition at index k). A point lies on a manifold when its distance to some point of that set is
  <= that point's radius. Precision: the share of samples on the reference manifold (reference radii); recall:
  the share of reference points on the sample manifold (sample radii). Computed in row x column blocks
  (`ROW_BLOCK` x `COL_BLOCK` float64 at a time), keeping each row's k+1 smallest distances, so 50k x 50k never
  sits in memory; the cross distances are computed once for both numbers.
  ADM computes the distances in float16 first (float32 when that overflows) and keeps radii in float32; here
  all of it is float64, so a point within a rounding error of a ball's edge may land on the other side.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import ConfigError, InputError, NumericsError

IS_SPLIT = 5000  # ADM's compute_inception_score(split_size=5000)
IS_ORDERS = ("shuffled", "as-given")  # --is-order; the first is the default
IS_ORDER = IS_ORDERS[0]
IS_SEED = 0  # the shuffled order: default_rng(IS_SEED).permutation(N); fixed, so a batch always scores the same
GROUPED_MIN = 0.2  # class grouping at or above which a batch counts as sorted by class (module doc)
NHOOD_K = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
ROW_BLOCK = 1024  # rows of one distance block
COL_BLOCK = 8192  # columns of one distance block: 1024 x 8192 float64 = 64 MiB


@dataclass(frozen=True)
class Activations:
    """One image set's activations, in image order, as the feature graph emits them (float32 or float64).

    pool (N, d); spatial (N, s) or None; logits (N, C) or None (None: the graph has no such output)."""

    pool: np.ndarray
    spatial: np.ndarray | None = None
    logits: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.pool)
        for name in ("pool", "spatial", "logits"):
            a = getattr(self, name)
            if a is not None and (a.ndim != 2 or len(a) != n):
                raise InputError(f"activations `{name}`", f"(N, d) with N = {n} images", a.shape)

    def __len__(self) -> int:
        return len(self.pool)

    @staticmethod
    def concat(parts: list["Activations"]) -> "Activations":
        """Activations of consecutive batches -> one; an output is kept only if every batch has it."""
        def cat(name):
            arrays = [getattr(p, name) for p in parts]
            return None if not arrays or any(a is None for a in arrays) else np.concatenate(arrays)
        if not parts:
            raise InputError("activations", "at least one batch of images", "none")
        return Activations(cat("pool"), cat("spatial"), cat("logits"))


# --------------------------------------------------------------------------------------- Inception Score


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, C) float64 probabilities, max-shifted (the same values as softmax of the raw logits)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> tuple[float, int]:
    """ADM's Inception Score of (N, C) logits -> (score, number of splits). See the module doc."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or len(logits) < 1:
        raise InputError("Inception Score logits", "(N, C) with N >= 1", logits.shape)
    if split_size < 1:
        raise InputError("Inception Score split size", ">= 1", split_size)
    if not np.isfinite(logits).all():
        raise NumericsError("Inception Score logits", "finite values", "inf/nan")
    scores = []
    for lo in range(0, len(logits), split_size):
        p = softmax(logits[lo:lo + split_size])  # (n, C)
        m = p.mean(axis=0, keepdims=True)  # (1, C): the split's marginal; m > 0 wherever p > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p > 0, p * (np.log(p) - np.log(m)), 0.0).sum(axis=1)  # (n,) KL(p_i || m)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), len(scores)


def check_is_order(order: str, flag: str = "--is-order") -> str:
    """`order` when it is one of IS_ORDERS, else a ConfigError naming `flag`."""
    if order not in IS_ORDERS:
        raise ConfigError(flag, " | ".join(IS_ORDERS), order)
    return order


def split_order(n: int, order: str = IS_ORDER, seed: int = IS_SEED) -> np.ndarray:
    """(n,) int64: the image indices in the order IS cuts its splits from (as-given: 0..n-1)."""
    check_is_order(order)
    return np.arange(n) if order == "as-given" else np.random.default_rng(seed).permutation(n)


def ordered_inception_score(logits: np.ndarray, order: str = IS_ORDER, seed: int = IS_SEED,
                            split_size: int = IS_SPLIT) -> tuple[float, int]:
    """Inception Score of (N, C) logits with the splits cut in `order` -> (score, number of splits)."""
    logits = np.asarray(logits)
    idx = split_order(len(logits), order, seed)
    return inception_score(logits if order == "as-given" else logits[idx], split_size)


@dataclass(frozen=True)
class ClassOrder:
    """Is a batch sorted by class? See the module doc. grouping None: fewer than two images or classes."""

    source: str  # where the classes came from: "labels (arr_1)" or "predicted classes (argmax of the logits)"
    same_neighbours: float | None  # r
    random_expected: float | None  # e
    grouping: float | None  # g = (r - e) / (1 - e)

    @property
    def sorted(self) -> bool:
        return self.grouping is not None and self.grouping >= GROUPED_MIN

    def record(self) -> dict:
        return {"source": self.source, "same_class_neighbours": self.same_neighbours,
                "if_random_order": self.random_expected, "grouping": self.grouping, "sorted": self.sorted,
                "grouping_min": GROUPED_MIN}


def class_order(classes: np.ndarray, source: str) -> ClassOrder:
    """(N,) integer classes in the batch's order -> ClassOrder."""
    c = np.asarray(classes)
    if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
        raise InputError(f"classes from {source}", "(N,) integers", f"{c.shape} {c.dtype}")
    n = len(c)
    if n < 2:
        return ClassOrder(source, None, None, None)
    r = float((c[1:] == c[:-1]).mean())
    counts = np.unique(c, return_counts=True)[1].astype(np.float64)
    e = float((counts * (counts - 1)).sum() / (n * (n - 1)))
    return ClassOrder(source, r, e, None if e >= 1.0 else (r - e) / (1.0 - e))


# --------------------------------------------------------------------------------------- precision, recall


def squared_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(a, d), (b, d) -> (a, b) float64: max(|u|^2 - 2 u.v + |v|^2, 0), as ADM's `_batch_pairwise_distances`."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    d = (u * u).sum(1)[:, None] - 2.0 * (u @ v.T) + (v * v).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _check_features(f: np.ndarray, what: str, k: int) -> np.ndarray:
    f = np.asarray(f)
    if f.ndim != 2 or len(f) < k + 1:
        raise InputError(f"{what} features for precision/recall", f"(N, d) with N >= {k + 1} (k = {k} neighbours "
                         "besides each point itself)", f.shape)
    if not np.isfinite(f).all():
        raise NumericsError(f"{what} features for precision/recall", "finite values", "inf/nan")
    return f


def manifold_radii(features: np.ndarray, k: int = NHOOD_K, row_block: int = ROW_BLOCK,
                   col_block: int = COL_BLOCK) -> np.ndarray:
    """(N, d) -> (N,) float64: each point's squared distance to its k-th nearest neighbour in the set, self
    excluded (the (k+1)-th smallest distance with self). Blockwise: a (row_block, col_block) block at a time."""
    f = _check_features(features, "manifold", k)
    n = len(f)
    radii = np.empty(n)
    for r0 in range(0, n, row_block):
        rows = f[r0:r0 + row_block]
        best = np.full((len(rows), k + 1), np.inf)  # each row's k+1 smallest distances so far
        for c0 in range(0, n, col_block):
            cand = np.concatenate([best, squared_distances(rows, f[c0:c0 + col_block])], axis=1)
            best = np.partition(cand, k, axis=1)[:, :k + 1]
        radii[r0:r0 + len(rows)] = best.max(axis=1)  # = the (k+1)-th smallest
    return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = NHOOD_K, row_block: int = ROW_BLOCK,
                     col_block: int = COL_BLOCK) -> tuple[float, float]:
    """ADM's (precision, recall) of sample features against reference features, both (N, d). See the module doc."""
    ref, smp = _check_features(reference, "reference", k), _check_features(samples, "sample", k)
    if ref.shape[1] != smp.shape[1]:
        raise InputError("precision/recall features", f"the same dimension on both sides ({ref.shape[1]})",
                         smp.shape[1], "both sides must come from the same feature extractor")
    r_ref = manifold_radii(ref, k, row_block, col_block)  # (N1,)
    r_smp = manifold_radii(smp, k, row_block, col_block)  # (N2,)
    ref_in = np.zeros(len(ref), bool)  # on the sample manifold -> recall
    smp_in = np.zeros(len(smp), bool)  # on the reference manifold -> precision
    for r0 in range(0, len(ref), row_block):
        for c0 in range(0, len(smp), col_block):
            d = squared_distances(ref[r0:r0 + row_block], smp[c0:c0 + col_block])  # (rows, cols)
            ref_in[r0:r0 + len(d)] |= (d <= r_smp[None, c0:c0 + d.shape[1]]).any(axis=1)
            smp_in[c0:c0 + d.shape[1]] |= (d <= r_ref[r0:r0 + len(d), None]).any(axis=0)
    return float(smp_in.mean()), float(ref_in.mean())
