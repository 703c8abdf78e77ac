"""The one noise function: image i of seed S depends on (S, i) alone, whatever the batch, chunk or shard."""
from __future__ import annotations

import numpy as np
import pytest

from ddt_export.core.errors import InputError
from ddt_export.core.noise import StepNoise, sample_noise

SHAPE = (4, 8, 8)


def test_initial_noise_is_default_rng_of_seed_and_index():
    got = sample_noise(7, [0, 3, 11], SHAPE)
    for row, i in zip(got, [0, 3, 11]):  # the documented convention, stated independently
        np.testing.assert_array_equal(row, np.random.default_rng([7, i]).standard_normal(SHAPE, dtype=np.float32))
    assert got.dtype == np.float32 and got.shape == (3, *SHAPE)


def test_chunks_and_order_do_not_matter():
    whole = sample_noise(2, range(10), SHAPE)
    parts = np.concatenate([sample_noise(2, range(0, 4), SHAPE), sample_noise(2, range(4, 10), SHAPE)])
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(sample_noise(2, [9, 1], SHAPE), whole[[9, 1]])
    assert not np.array_equal(sample_noise(3, range(10), SHAPE), whole)


def test_step_noise_streams_are_per_sample():
    a, b = StepNoise(5, range(4)), StepNoise(5, [2, 3])
    for _ in range(3):  # three noisy steps: row k of a batch draw comes from sample k's own stream
        da, db = a.standard_normal((4, *SHAPE), np.float32), b.standard_normal((2, *SHAPE), np.float32)
        np.testing.assert_array_equal(da[2:], db)
    own = np.random.default_rng([5, 3, 1])
    for _ in range(4):
        want = own.standard_normal(SHAPE, dtype=np.float32)
    c = StepNoise(5, [3])
    for _ in range(3):
        c.standard_normal((1, *SHAPE), np.float32)
    np.testing.assert_array_equal(c.standard_normal((1, *SHAPE), np.float32)[0], want)
    first = StepNoise(5, [0]).standard_normal((1, *SHAPE), np.float32)[0]
    assert not np.array_equal(first, sample_noise(5, [0], SHAPE)[0])  # a stream apart from the initial latent


def test_subset_shares_the_streams():
    s = StepNoise(1, range(3))
    sub = s.subset([2])
    drawn = sub.standard_normal((1, *SHAPE))[0]
    np.testing.assert_array_equal(drawn, np.random.default_rng([1, 2, 1]).standard_normal(SHAPE))
    # the parent's row 2 has moved on: its next draw is the stream's second
    g = np.random.default_rng([1, 2, 1])
    g.standard_normal(SHAPE)
    np.testing.assert_array_equal(s.standard_normal((3, *SHAPE))[2], g.standard_normal(SHAPE))


def test_bad_seed_or_index():
    with pytest.raises(InputError, match=r"^seed: expected >= 0, got -1"):
        sample_noise(-1, [0], SHAPE)
    with pytest.raises(InputError, match="sample index"):
        StepNoise(0, [-2])
