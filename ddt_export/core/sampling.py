"""Sampling numerics, torch-free: timesteps, classifier-free guidance, single Euler steps.

Restates the official `stateful_flow_matching/sampling.py` (EulerSampler, LinearScheduler for both the
scheduler and the w_scheduler, `simple_guidance_fn`). Linear flow path: x_t = t * data + (1 - t) * noise, so
t = 0 is noise and t = 1 is data; the network predicts the velocity v = dx/dt.

Timesteps are computed once in float64 and cast to float32 at the edge, where the official feeds them to the
network (its timesteps are float32 tensors). Step functions are pure, take and return float32 arrays of one
shape, and take their Gaussian noise as an argument (the caller owns the random generator).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .config import STEP_FN_NAMES, SamplerConfig

F32 = np.float32


def timesteps(num_steps: int, last_step: float, shift: float = 1.0) -> np.ndarray:
    """(num_steps + 1,) float64: linspace(0, 1 - last_step, N), then 1.0, then the timeshift map."""
    t = np.concatenate([np.linspace(0.0, 1.0 - last_step, num_steps, dtype=np.float64), [1.0]])  # (N+1,)
    t = t / (t + (1.0 - t) * shift)  # official shift_respace_fn; shift 1 is the identity
    assert t[0] == 0.0 and t[-1] == 1.0 and np.all(np.diff(t) > 0), t
    return t


def step_times(sampler: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(t, dt), each (N,) float32: the time fed to the network at step i and the Euler increment to step i+1."""
    t = timesteps(sampler.num_steps, sampler.last_step, sampler.timeshift)
    return t[:-1].astype(F32), np.diff(t).astype(F32)


def lagrange_integrals(nodes: np.ndarray, a: float, b: float) -> np.ndarray:
    """(n,) float64: the integral from a to b of each Lagrange basis polynomial through `nodes` (official
    `pre_integral.lagrange_preint`, exact for polynomials of degree < n)."""
    nodes = np.asarray(nodes, np.float64)
    out = np.empty(len(nodes))
    for j, tj in enumerate(nodes):
        others = np.delete(nodes, j)
        basis = np.poly1d(np.poly(others) / np.prod(tj - others))  # prod_m (t - t_m) / (t_j - t_m)
        prim = basis.integ()
        out[j] = prim(b) - prim(a)
    return out


def multistep_coefficients(sampler: SamplerConfig) -> list[np.ndarray]:
    """Per step i, the float32 weights c_j of the official AdamLMSampler (oldest velocity first): the integrals
    over [t_i, t_{i+1}] of the Lagrange polynomial through the last min(order, i + 1) (t, v) points, normalized
    to sum 1. Order 1 (Euler) gives [1.0] at every step. Computed once, in float64."""
    t = timesteps(sampler.num_steps, sampler.last_step, sampler.timeshift)
    out = []
    for i in range(sampler.num_steps):
        k = min(sampler.order, i + 1)
        w = lagrange_integrals(t[i - k + 1:i + 1], t[i], t[i + 1])
        w = w / w.sum()
        assert np.all(np.isfinite(w)), (i, w)
        out.append(w.astype(F32))
    return out


def extrapolation_weights(nodes: Sequence[float], t: float) -> np.ndarray:
    """(n,) float32 weights w_j with sum_j w_j f(t_j) = the polynomial through (t_j, f(t_j)) at t: Newton's
    divided differences in t written as weights (n = 1: reuse, [1.0]; n = 2: linear; n = 3: quadratic).
    Computed in float64."""
    nodes = np.asarray(nodes, np.float64)
    w = np.array([np.prod([(t - tm) / (tj - tm) for m, tm in enumerate(nodes) if m != j]) for j, tj in
                  enumerate(nodes)])
    return w.astype(F32)


def combine(weights: Sequence[np.float32], values: Sequence[np.ndarray]) -> np.ndarray:
    """sum_j weights[j] * values[j] in float32, accumulated oldest first from zeros (the official AdamLMSampler's
    `out += c_j * v_j`); one weight 1.0 returns the value itself (reuse, Euler: bit for bit)."""
    assert len(weights) == len(values) and len(values) >= 1, (len(weights), len(values))
    if len(values) == 1 and weights[0] == 1.0:
        return values[0]
    out = np.zeros_like(values[0])
    for w, v in zip(weights, values):
        out += F32(w) * v
    return out


def in_guidance_interval(t: float, interval: tuple[float, float]) -> bool:
    """Official test `lo < t < hi`, done in float32 as the official compares its float32 t."""
    lo, hi = interval
    return bool(F32(lo) < F32(t) < F32(hi))


def guidance_scale(t: float, sampler: SamplerConfig) -> float:
    """The CFG scale at time t: sampler.guidance inside the interval, 1.0 (the conditional velocity) outside."""
    return sampler.guidance if in_guidance_interval(t, sampler.guidance_interval) else 1.0


def cfg_combine(v_uncond: np.ndarray, v_cond: np.ndarray, scale: float) -> np.ndarray:
    """v_u + scale * (v_c - v_u), in float32 (official simple_guidance_fn). Both (B, C, H, W) float32."""
    _check("v_uncond", v_uncond, v_cond.shape)
    _check("v_cond", v_cond, v_uncond.shape)
    return v_uncond + F32(scale) * (v_cond - v_uncond)


# ------------------------------------------------------------------------------------------ step functions
# LinearScheduler: alpha = t, sigma = 1 - t, dalpha = 1, dsigma = -1; w = w_scheduler.w(t) = sigma(t).
# The official score estimate s = ((1/dalpha_over_alpha) v - x) / (sigma^2 - (1/dalpha_over_alpha) dsigma*sigma)
# becomes (t v - x) / (sigma^2 + t sigma): 1/dalpha_over_alpha = alpha/dalpha = t, written so t = 0 is exact.


def _check(name: str, a: np.ndarray, shape: tuple[int, ...]) -> None:
    assert a.dtype == F32, f"{name}: dtype {a.dtype}, expected float32"
    assert a.shape == tuple(shape), f"{name}: shape {a.shape}, expected {tuple(shape)}"


def score(x: np.ndarray, v: np.ndarray, t: float) -> np.ndarray:
    """The official `s` for the linear path: (t v - x) / (sigma^2 + t sigma), sigma = 1 - t. float32."""
    _check("v", v, x.shape)
    t = F32(t)
    sigma = F32(1.0) - t
    return (t * v - x) / (sigma * sigma + t * sigma)


def ode(x: np.ndarray, v: np.ndarray, dt: float, t: float = 0.0, noise: np.ndarray | None = None) -> np.ndarray:
    """x + v dt (official ode_step_fn)."""
    _check("v", v, x.shape)
    return x + v * F32(dt)


def sde_mean(x, v, dt, t, noise=None):
    """x + v dt + s w dt (official sde_mean_step_fn)."""
    w, dt = F32(1.0) - F32(t), F32(dt)
    return x + v * dt + score(x, v, t) * w * dt


def sde(x, v, dt, t, noise):
    """x + v dt + s w dt + sqrt(2 w dt) noise (official sde_step_fn)."""
    _check("noise", noise, x.shape)
    w, dt = F32(1.0) - F32(t), F32(dt)
    return x + v * dt + score(x, v, t) * w * dt + np.sqrt(F32(2.0) * w * dt) * noise


def sde_preserve(x, v, dt, t, noise):
    """x + v dt + s w dt / 2 + sqrt(w dt) noise (official sde_preserve_step_fn)."""
    _check("noise", noise, x.shape)
    w, dt = F32(1.0) - F32(t), F32(dt)
    return x + v * dt + F32(0.5) * score(x, v, t) * w * dt + np.sqrt(w * dt) * noise


STEP_FNS = {"ode": ode, "sde_mean": sde_mean, "sde": sde, "sde_preserve": sde_preserve}
assert tuple(STEP_FNS) == STEP_FN_NAMES, "config.STEP_FN_NAMES names the step functions defined here"
NOISY = ("sde", "sde_preserve")  # step functions that draw Gaussian noise


def euler_step(sampler: SamplerConfig, i: int, x: np.ndarray, v: np.ndarray, t: float, dt: float,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """Step i of the sampler: its step_fn, except the last step, which is the official last_step_fn (ode)."""
    name = sampler.step_fn if i < sampler.num_steps - 1 else "ode"
    noise = None
    if name in NOISY:
        assert rng is not None, f"step_fn {name} needs a random generator"
        noise = rng.standard_normal(x.shape, dtype=F32)
    return STEP_FNS[name](x, v, dt, t, noise)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Sampler output in [-1, 1], any shape -> uint8 of the same shape, as the official fp2uint8:
    clip((x + 1) * 127.5 + 0.5, 0, 255)."""
    return np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
