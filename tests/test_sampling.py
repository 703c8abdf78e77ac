"""ddt_export.sampling against the official formulas, restated here from sampling.py / scheduling.py."""
from __future__ import annotations

import numpy as np
import pytest

from ddt_export.core import sampling
from ddt_export.core.config import SamplerConfig


def test_timesteps_official_formula():
    t = sampling.timesteps(20, 0.04, 1.0)
    assert t.dtype == np.float64 and t.shape == (21,)
    np.testing.assert_array_equal(t[:-1], np.linspace(0.0, 0.96, 20))
    assert t[-1] == 1.0
    shifted = sampling.timesteps(10, 0.1, 3.0)
    raw = np.append(np.linspace(0.0, 0.9, 10), 1.0)
    np.testing.assert_allclose(shifted, raw / (raw + (1 - raw) * 3.0), rtol=0, atol=1e-15)
    t32, dt32 = sampling.step_times(SamplerConfig(num_steps=20, last_step=0.04))
    assert t32.dtype == dt32.dtype == np.float32 and t32.shape == dt32.shape == (20,)
    np.testing.assert_allclose(dt32.sum(dtype=np.float64), 1.0, atol=1e-6)


def test_guidance_interval_is_open_and_float32():
    iv = (0.3, 1.0)
    assert not sampling.in_guidance_interval(0.3, iv)  # official strict `>`
    assert sampling.in_guidance_interval(np.nextafter(np.float32(0.3), np.float32(1)), iv)
    assert not sampling.in_guidance_interval(1.0, iv)
    assert not sampling.in_guidance_interval(0.0, iv)
    s = SamplerConfig(guidance=3.0)
    assert sampling.guidance_scale(0.5, s) == 3.0 and sampling.guidance_scale(0.1, s) == 1.0


def test_cfg_combine():
    rng = np.random.default_rng(0)
    u, c = (rng.standard_normal((2, 3, 4, 4), dtype=np.float32) for _ in range(2))
    out = sampling.cfg_combine(u, c, 2.5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, u + 2.5 * (c - u), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sampling.cfg_combine(u, c, 1.0), c, atol=1e-6)
    with pytest.raises(AssertionError):
        sampling.cfg_combine(u, c[:1], 2.0)


def _official_terms(x, v, t):
    """Generic official s and w for the LinearScheduler, in float64, via alpha/sigma and their derivatives."""
    alpha, sigma, dalpha, dsigma = t, 1.0 - t, 1.0, -1.0
    inv_dalpha_over_alpha = 1.0 / (dalpha / alpha) if t > 0 else 0.0  # torch: 1/(1/0) = 1/inf = 0
    s = (inv_dalpha_over_alpha * v - x) / (sigma ** 2 - inv_dalpha_over_alpha * dsigma * sigma)
    return s, sigma  # w_scheduler = LinearScheduler: w = sigma


@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 0.96])
def test_step_functions_against_formulas(t):
    rng = np.random.default_rng(1)
    x, v, z = (rng.standard_normal((2, 4, 8, 8), dtype=np.float32) for _ in range(3))
    dt = 0.05
    s, w = _official_terms(x.astype(np.float64), v.astype(np.float64), t)
    x64, v64, z64 = (a.astype(np.float64) for a in (x, v, z))
    want = {
        "ode": x64 + v64 * dt,
        "sde_mean": x64 + v64 * dt + s * w * dt,
        "sde": x64 + v64 * dt + s * w * dt + np.sqrt(2 * w * dt) * z64,
        "sde_preserve": x64 + v64 * dt + 0.5 * s * w * dt + np.sqrt(w * dt) * z64,
    }
    for name, fn in sampling.STEP_FNS.items():
        got = fn(x, v, dt, t, z)
        assert got.dtype == np.float32 and got.shape == x.shape, name
        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_last_step_is_ode_and_noise_comes_from_rng():
    cfg = SamplerConfig(num_steps=4, step_fn="sde", last_step=0.1)
    x = np.ones((1, 1, 2, 2), np.float32)
    v = np.zeros_like(x)
    last = sampling.euler_step(cfg, 3, x, v, 0.9, 0.1, np.random.default_rng(0))
    np.testing.assert_array_equal(last, x)  # ode: v = 0 leaves x unchanged
    a = sampling.euler_step(cfg, 1, x, v, 0.3, 0.1, np.random.default_rng(5))
    b = sampling.euler_step(cfg, 1, x, v, 0.3, 0.1, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, x)
