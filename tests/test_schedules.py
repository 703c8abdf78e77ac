"""The statistical DP against a plain-loop restatement of the official sharing_dp; schedule specs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ddt_export.runtime.sampling import dp, grammar as sch
from ddt_export.core.errors import InputError, NumericsError
from references.sharing_dp import official_dp




def _random_sim(rng, n, levels=None):
    a = rng.standard_normal((n, 6))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    sim = a @ a.T
    if levels:  # few distinct values: many exact ties in the DP
        sim = np.round(sim * levels) / levels
    return sim


@pytest.mark.parametrize("levels", [None, 2, 4])
def test_dp_matches_official_loops(levels):
    rng = np.random.default_rng(levels or 0)
    for n in (1, 2, 3, 5, 8, 13, 20, 31):
        sim = _random_sim(rng, n, levels)
        for k in sorted({1, min(2, n), max(1, n // 3), max(1, n // 2), max(1, n - 1), n}):
            steps, cost = dp.solve_dp(sim, k)
            assert steps == official_dp(sim, k), (n, k, levels)
            assert len(steps) == k and steps[0] == 0
            assert cost == pytest.approx(dp.schedule_cost(sim, steps), abs=1e-12)


def test_dp_ties_constant_matrix():
    sim = np.ones((12, 12))  # every schedule costs 0: the first minimum decides
    for k in (1, 3, 6, 12):
        assert dp.solve_dp(sim, k)[0] == official_dp(sim, k)


def test_dp_beats_uniform_at_equal_k():
    rng = np.random.default_rng(3)
    sim = _random_sim(rng, 24)
    steps, cost = dp.solve_dp(sim, 6)
    assert cost <= dp.schedule_cost(sim, sch.uniform_steps(24, 4)) + 1e-12


def test_cumulative_error_bitwise_equal_to_loops():
    sim = _random_sim(np.random.default_rng(7), 17)
    err = (1 - sim).tolist()
    for i in range(1, 17):
        for j in range(i):
            err[i][j] = err[i - 1][j] + err[i][j]
    np.testing.assert_array_equal(dp.cumulative_error(sim), np.array(err))


def test_similarity_is_mean_token_cosine():
    rng = np.random.default_rng(0)
    states = rng.standard_normal((5, 3, 4, 8)).astype(np.float32)  # N B L D
    tok = states.reshape(5, 12, 8).astype(np.float64)
    want = np.zeros((5, 5))
    for i in range(5):
        for j in range(5):
            a, b = tok[i], tok[j]
            want[i, j] = np.mean((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(dp.similarity(states), want, atol=1e-12)
    np.testing.assert_allclose(dp.similarity(states, chunk_tokens=5), want, atol=1e-12)


def test_specs_and_validation(tmp_path):
    assert sch.steps_for(sch.parse_schedule("all"), 5) == [0, 1, 2, 3, 4]
    assert sch.steps_for(sch.parse_schedule("uniform:2"), 5) == [0, 2, 4]
    assert sch.parse_schedule("dp:7") == sch.ScheduleSpec("dp", 7, text="dp:7")
    for bad in ("uniform:0", "dp:x", "dp:-1", "dp:+3", "dp:٣", "every", "missing.json", "uniform:1000001"):
        with pytest.raises(InputError):
            sch.parse_schedule(bad)
    for bad in ([], [1, 2], [0, 2, 2], [0, 3, 1], [0, 5], ["a"]):
        with pytest.raises(InputError):
            sch.validate_steps(bad, 5)
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"recompute_steps": [0, 2, 3], "num_steps": 5}))
    assert sch.steps_for(sch.parse_schedule(str(f)), 5) == [0, 2, 3]
    with pytest.raises(InputError, match="num_steps"):
        sch.steps_for(sch.parse_schedule(str(f)), 6)
    f.write_text(json.dumps({"steps": [0]}))
    with pytest.raises(InputError, match="recompute_steps"):
        sch.steps_for(sch.parse_schedule(str(f)), 5)
    with pytest.raises(InputError):
        dp.solve_dp(np.ones((4, 4)), 5)
    with pytest.raises(NumericsError):
        dp.solve_dp(np.full((4, 4), np.nan), 2)


def test_heatmap_png(tmp_path):
    sim = _random_sim(np.random.default_rng(1), 10)
    p = dp.plot_heatmap(sim, [0, 4, 7], tmp_path / "h.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the forecast-aware DP, against brute force


def _brute_force(states, times, k, order):
    """The least total error over every schedule of K steps starting at 0, each step's state computed directly:
    the last recompute state (reuse, or only one so far), else the line through the last two at t_i; error
    1 - mean over tokens of the cosine with the true state. Plain loops in float64."""
    import itertools

    n = len(states)
    tok = states.reshape(n, -1, states.shape[-1]).astype(np.float64)

    def cost(steps):
        total, rec = 0.0, []
        for i in range(n):
            if i in steps:
                rec.append(i)
            if order == 0 or len(rec) == 1:
                f = tok[rec[-1]]
            else:
                p, q = rec[-2], rec[-1]
                f = tok[q] + (times[i] - times[q]) / (times[q] - times[p]) * (tok[q] - tok[p])
            cos = (f * tok[i]).sum(-1) / np.linalg.norm(f, axis=-1) / np.linalg.norm(tok[i], axis=-1)
            total += 1.0 - cos.mean()
        return total

    costs = {(0, *rest): cost([0, *rest]) for rest in itertools.combinations(range(1, n), k - 1)}
    return min(costs.values()), cost


@pytest.mark.parametrize("order", [0, 1])
def test_forecast_dp_is_the_brute_force_optimum(order):
    rng = np.random.default_rng(11 + order)
    for n in (1, 2, 3, 5, 7, 8):
        states = np.cumsum(rng.standard_normal((n, 2, 3, 4)), axis=0).astype(np.float32)  # N B L D, drifting
        times = np.sort(rng.uniform(0, 1, n))
        errors = dp.forecast_errors(states, times, order, chunk_tokens=4)
        for k in range(1, n + 1):
            best, cost = _brute_force(states, times, k, order)
            steps, value = dp.solve_forecast_dp(errors, k)
            assert len(steps) == k and steps[0] == 0
            assert value == pytest.approx(best, abs=1e-9), (n, k)
            assert cost(steps) == pytest.approx(value, abs=1e-9)  # the steps it returns cost what it says
            assert dp.forecast_schedule_cost(errors, steps) == pytest.approx(value, abs=1e-9)
            if order == 0:  # the reuse error is the official DP's objective
                assert dp.solve_dp(dp.similarity(states), k)[1] == pytest.approx(value, abs=1e-9)


def test_forecast_dp_follows_a_line_reuse_does_not():
    """States moving along a straight line in t: the forecast is exact from two recompute steps on, so the
    forecast DP recomputes step 1 at once and serves every later step exactly (total error 0); reusing step 0
    would cost, and the reuse DP spreads its steps."""
    n, t = 12, np.linspace(0.0, 1.0, 12)
    a, b = np.ones((1, 2, 4)), np.arange(8.0).reshape(1, 2, 4) - 3.0
    states = (a[None] + t[:, None, None, None] * b[None]).astype(np.float64)  # (N, 1, 2, 4)
    e1 = dp.forecast_errors(states, t, 1)
    steps, value = dp.solve_forecast_dp(e1, 3)
    assert steps[:2] == [0, 1] and value == pytest.approx(0.0, abs=1e-9)
    assert e1[0, 0, 1] > 1e-3 and dp.solve_dp(dp.similarity(states), 3)[0][1] > 1


def test_forecast_dp_bad_input():
    with pytest.raises(InputError, match="forecast order"):
        dp.forecast_errors(np.zeros((3, 1, 2, 4)), [0, 0.5, 1], order=2)
    with pytest.raises(InputError, match="step times"):
        dp.forecast_errors(np.ones((3, 1, 2, 4)), [0, 0.5, 0.5])
    with pytest.raises(InputError, match="K"):
        dp.solve_forecast_dp(np.zeros((3, 3, 3)), 4)
