"""ADM's metrics (evaluate.adm) against independent float64 numpy restatements of guided-diffusion's
`evaluations/evaluator.py`: Inception Score with its splits, precision and recall of the k = 3 manifold estimator
(dense, direct differences instead of the |u|^2 - 2uv + |v|^2 expansion), closed forms, blockwise == dense."""
from __future__ import annotations

import numpy as np
import pytest

from ddt_export.core.errors import InputError, NumericsError
from ddt_export.evaluate import adm as A
from references.adm import ref_inception_score, ref_precision_recall


def test_is_matches_the_restatement_with_splits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((23, 7)) * 2.0
    for split in (5000, 10, 7, 1):  # one split; 10 + 10 + 3 (a short last one); ...; one image per split
        got, n = A.inception_score(logits, split)
        assert n == -(-23 // split)
        assert got == pytest.approx(ref_inception_score(logits, split), rel=1e-12)
    assert A.inception_score(logits, 1)[0] == pytest.approx(1.0)  # one image: KL(p || p) = 0


def test_is_closed_forms():
    assert A.inception_score(np.zeros((50, 1008)))[0] == pytest.approx(1.0, abs=1e-12)  # uniform predictions
    for c in (2, 10, 1008):
        onehot = np.full((3 * c, c), -1e4)  # each image certain of one class, the classes used equally often
        onehot[np.arange(3 * c), np.arange(3 * c) % c] = 0.0
        score, splits = A.inception_score(onehot)
        assert splits == 1 and score == pytest.approx(c, rel=1e-9)  # exp(log C)
    half = np.full((40, 10), -1e4)  # certain, but of 5 classes only: IS 5
    half[np.arange(40), np.arange(40) % 5] = 0.0
    assert A.inception_score(half)[0] == pytest.approx(5.0, rel=1e-9)


def test_is_underflow_counts_as_zero_and_bad_input():
    logits = np.array([[0.0, -800.0], [-800.0, 0.0]])  # exp(-800) underflows to 0 even in float64
    assert A.inception_score(logits)[0] == pytest.approx(2.0)  # ADM's p * (log p - log m) would give NaN
    with pytest.raises(NumericsError):
        A.inception_score(np.array([[0.0, np.nan]]))
    with pytest.raises(InputError):
        A.inception_score(np.zeros(5))


def test_softmax_is_shift_invariant():
    z = np.random.default_rng(1).standard_normal((4, 6))
    np.testing.assert_allclose(A.softmax(z + 500.0), np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-12)


# --------------------------------------------------------------------------------------- precision, recall


def test_precision_recall_match_the_dense_restatement():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((120, 8))
    smp = rng.standard_normal((90, 8)) * 1.3 + 0.4  # overlapping, wider and shifted: both below 1
    got = A.precision_recall(ref, smp)
    want = ref_precision_recall(ref, smp)
    assert got == want
    assert 0.2 < got[0] < 0.95 and 0.2 < got[1] < 0.95, got


def test_blockwise_equals_dense():
    rng = np.random.default_rng(3)
    ref, smp = rng.standard_normal((101, 5)), rng.standard_normal((67, 5)) + 0.3
    dense_r = A.manifold_radii(ref, row_block=10_000, col_block=10_000)
    for rb, cb in ((7, 5), (1, 3), (33, 100), (101, 1)):  # ragged blocks, blocks narrower than k + 1
        # the same neighbours; the distances differ only by BLAS rounding (GEMM kernels depend on the block shape)
        np.testing.assert_allclose(A.manifold_radii(ref, row_block=rb, col_block=cb), dense_r, rtol=1e-13)
        assert A.precision_recall(ref, smp, row_block=rb, col_block=cb) == A.precision_recall(
            ref, smp, row_block=10_000, col_block=10_000)
    full = A.squared_distances(ref, ref)
    np.testing.assert_allclose(dense_r, np.sort(full, axis=1)[:, 3], rtol=1e-13)


def test_radii_exclude_self():
    pts = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # squared distance to the 3rd nearest other point: 0 -> {1, 3, 6}: 36; 1 -> {0, 3, 6}: 25; 3 -> {1, 6, 0}: 9;
    # 6 -> {3, 10, 1}: 25; 10 -> {6, 3, 1}: 81
    np.testing.assert_array_equal(A.manifold_radii(pts), [36.0, 25.0, 9.0, 25.0, 81.0])


def test_precision_recall_closed_forms():
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((200, 6))
    assert A.precision_recall(ref, ref.copy()) == (1.0, 1.0)  # identical sets
    assert A.precision_recall(ref, ref + 100.0) == (0.0, 0.0)  # disjoint far clusters
    # samples cover half the reference: two far clusters in the reference, samples are one of them exactly
    a, b = rng.standard_normal((150, 6)), rng.standard_normal((150, 6)) + 50.0
    p, r = A.precision_recall(np.concatenate([a, b]), a.copy())
    assert p == 1.0 and r == pytest.approx(0.5, abs=0.02)
    # ... and fresh samples of that cluster: precision high, recall about a half
    fresh = rng.standard_normal((150, 6))
    p, r = A.precision_recall(np.concatenate([a, b]), fresh)
    assert p > 0.85 and 0.4 < r <= 0.5, (p, r)
    assert (p, r) == ref_precision_recall(np.concatenate([a, b]), fresh)


def test_precision_recall_bad_input():
    rng = np.random.default_rng(5)
    with pytest.raises(InputError, match="N >= 4"):
        A.precision_recall(rng.standard_normal((3, 2)), rng.standard_normal((10, 2)))
    with pytest.raises(InputError, match="same dimension"):
        A.precision_recall(rng.standard_normal((10, 2)), rng.standard_normal((10, 3)))
    bad = rng.standard_normal((10, 2))
    bad[0, 0] = np.inf
    with pytest.raises(NumericsError):
        A.precision_recall(bad, rng.standard_normal((10, 2)))


def test_activations_concat_and_shapes():
    a = A.Activations(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 5)))
    b = A.Activations(np.ones((3, 3)), None, np.ones((3, 5)))
    c = A.Activations.concat([a, b])
    assert len(c) == 5 and c.spatial is None and c.logits.shape == (5, 5)
    with pytest.raises(InputError, match="N = 2"):
        A.Activations(np.zeros((2, 3)), np.zeros((3, 4)))
