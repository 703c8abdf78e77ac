"""Multistep solvers and encoder forecasting, against independent restatements:
- the official AdamLMSampler (adam_sampling.py + pre_integral.py) restated with the solver in float64
  (tests/official_reference.py): the host loop reproduces it to 1e-4 relative on final latents, for orders 1-4,
  with the official state refresh (uniform:R);
- order 1 of the official is its Euler sampler, exactly; `adams:1` is `euler`, bit for bit;
- forecasting: a float64 loop that keeps each CFG half's recomputed (t, s) points and extrapolates by Newton's
  divided differences; forecast 0 is today's reuse, bit for bit."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from references.forecast import forecast_reference  # noqa: E402
from references.official import _preint, official_adams_sampler, official_sampler  # noqa: E402

from ddt_export.core.config import SamplerConfig  # noqa: E402
from ddt_export.core.errors import ConfigError  # noqa: E402
from ddt_export.core.sampling import multistep_coefficients, timesteps  # noqa: E402
from ddt_export.runtime import load_engines, sample  # noqa: E402

STEPS = 20


@pytest.fixture(scope="module")
def engines(tiny_engines):
    with load_engines(tiny_engines[0]) as e:
        yield e


def _inputs(cfg, b=3, seed=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, *cfg.model.latent_shape), dtype=np.float32), np.array([1, 7, 3][:b], np.int64)


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(b).max())


def test_coefficients_are_the_official_closed_forms():
    for order in (1, 2, 3, 4):
        for shift in (1.0, 3.0):
            s = SamplerConfig(num_steps=12, last_step=0.04, timeshift=shift, solver=f"adams:{order}")
            t = timesteps(12, 0.04, shift)
            for i, c in enumerate(multistep_coefficients(s)):
                want = _preint(list(t[max(0, i - order + 1):i + 1]), t[i], t[i + 1])
                np.testing.assert_allclose(c, want, rtol=2e-6, atol=1e-7)
    # uniform steps: the Adams-Bashforth weights by hand
    u = SamplerConfig(num_steps=10, last_step=0.1, solver="adams:3")  # linspace(0, 0.9, 10): dt = 0.1
    np.testing.assert_allclose(multistep_coefficients(u)[5], [5 / 12, -16 / 12, 23 / 12], rtol=1e-6)
    assert multistep_coefficients(dataclasses.replace(u, solver="adams:1"))[5].tolist() == [1.0]


def fp32_net(model):
    """The fp32 model under a float64 solver: x cast down on the way in, v and s up on the way out."""
    def net(x, t, y, state):
        v, s = model(x.float(), t, y, None if state is None else state.float())
        return v.double(), s
    return net


@pytest.mark.parametrize("order, refresh", [(1, 1), (2, 1), (3, 3), (4, 2)])
def test_adams_matches_the_official_sampler(engines, tiny_engines, tiny_cfg, order, refresh):
    x, y = _inputs(tiny_cfg)
    m = tiny_cfg.model
    sampler = dataclasses.replace(tiny_cfg.sampler, num_steps=STEPS, solver=f"adams:{order}")
    with torch.no_grad():
        want = official_adams_sampler(fp32_net(tiny_engines[1]), torch.from_numpy(x).double(), torch.from_numpy(y),
                                      num_steps=STEPS,
                                      guidance=sampler.guidance, interval=sampler.guidance_interval,
                                      last_step=sampler.last_step, order=order, refresh=refresh,
                                      null=m.null_class).numpy()
    for cond_only in (False, True):  # the official runs the full batch every step; cond-only rows change nothing
        got = sample(engines, x, y, sampler, list(range(0, STEPS, refresh)), cond_only_outside=cond_only)
        rel = _rel(got, want)
        print(f"adams:{order} uniform:{refresh} cond_only={cond_only}: max rel err {rel:.2e}")
        assert rel < 1e-4


def test_order_one_is_euler(engines, tiny_engines, tiny_cfg):
    x, y = _inputs(tiny_cfg)
    m, s = tiny_cfg.model, tiny_cfg.sampler
    with torch.no_grad():
        args = dict(num_steps=STEPS, guidance=s.guidance, interval=s.guidance_interval, last_step=s.last_step,
                    null=m.null_class)
        noise, labels, net = torch.from_numpy(x).double(), torch.from_numpy(y), fp32_net(tiny_engines[1])
        adams = official_adams_sampler(net, noise, labels, order=1, refresh=2, **args)
        euler = official_sampler(net, noise, labels, recompute=range(0, STEPS, 2), **args)
    # t_cur accumulated in float32 lands on the Euler sampler's timesteps exactly (each dt is exact: Sterbenz),
    # and the order-1 weight is 1.0: the same trajectory, to the bit
    assert torch.equal(adams, euler)
    a = sample(engines, x, y, dataclasses.replace(s, solver="adams:1"), range(0, STEPS, 2))
    e = sample(engines, x, y, s, range(0, STEPS, 2))
    assert np.array_equal(a, e)


@pytest.mark.parametrize("forecast", [1, 2])
def test_forecast_matches_a_float64_restatement(engines, tiny_engines, tiny_cfg, forecast):
    x, y = _inputs(tiny_cfg)
    # 20 steps, interval (0.3, 1): t_i = 0.96 i / 19, guided from step 6. uniform:4 recomputes 0, 4, 8, 12, 16;
    # the state of step 0 serves 0-3 (no guided step: the conditional half only), the others serve guided steps
    sampler = dataclasses.replace(tiny_cfg.sampler, num_steps=STEPS, forecast=forecast)
    sched = list(range(0, STEPS, 4))
    with torch.no_grad():
        want = forecast_reference(tiny_engines[1], x, y, sampler, sched, {4, 8, 12, 16}, forecast)
        full = forecast_reference(tiny_engines[1], x, y, sampler, sched, set(sched), forecast)
    got = sample(engines, x, y, sampler, sched)
    assert _rel(got, want) < 1e-4, _rel(got, want)
    got_full = sample(engines, x, y, sampler, sched, cond_only_outside=False)  # every recompute: both halves
    assert _rel(got_full, full) < 1e-4, _rel(got_full, full)
    reuse = sample(engines, x, y, tiny_cfg.sampler, sched)
    assert _rel(got, reuse) > 1e-3  # the forecast changes the trajectory
    print(f"forecast {forecast}: vs restatement {_rel(got, want):.2e}, vs reuse {_rel(got, reuse):.2e}")


def test_forecast_zero_is_reuse_bit_for_bit(engines, tiny_cfg):
    x, y = _inputs(tiny_cfg)
    for solver in ("euler", "adams:3"):
        s = dataclasses.replace(tiny_cfg.sampler, solver=solver)
        with_zero = sample(engines, x, y, dataclasses.replace(s, forecast=0), range(0, STEPS, 3))
        assert np.array_equal(with_zero, sample(engines, x, y, s, range(0, STEPS, 3)))


def test_bad_solver_and_forecast_are_refused():
    for bad in ("adams:0", "adams:5", "adams", "rk4", "adams:٣"):
        with pytest.raises(ConfigError, match=r"sampler.solver: expected euler \| adams:K with K in 1..4"):
            SamplerConfig(solver=bad)
    with pytest.raises(ConfigError, match="sampler.forecast: expected 0 | 1 | 2, got 3"):
        SamplerConfig(forecast=3)
    with pytest.raises(ConfigError, match="sampler.step_fn: expected ode with solver adams:2"):
        SamplerConfig(solver="adams:2", step_fn="sde")
