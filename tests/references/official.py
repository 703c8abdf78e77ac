"""Straightforward restatements of the official DDT code in PyTorch, for tests only: the forward, the sharing
sampler (ODE and SDE step functions, timeshift), the multistep AdamLMSampler and the encoder-state similarity.
(The sharing DP, which needs no torch, is `sharing_dp.py`.)

Written from the official formulation (F.unfold/F.fold patches, complex RoPE via torch.polar and
view_as_complex, F.scaled_dot_product_attention, nn.LayerNorm final norm; `stateful_flow_matching/sampling.py`
and `sharing_sampling.py` as plain loops) so they share no code with ddt_export.
"""
from __future__ import annotations

import math

import numpy as np

import torch
import torch.nn.functional as F


def _linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _rms(sd, name, x, eps=1e-6):
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return sd[f"{name}.weight"] * h.to(dt)


def _freqs_cis(head_dim, h, w, theta=10000.0, scale=16.0):
    xs = torch.linspace(0, scale, w)
    ys = torch.linspace(0, scale, h)
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    xc = torch.polar(torch.ones(h * w, head_dim // 4), torch.outer(xs.reshape(-1), base))
    yc = torch.polar(torch.ones(h * w, head_dim // 4), torch.outer(ys.reshape(-1), base))
    return torch.cat([xc[..., None], yc[..., None]], dim=-1).reshape(h * w, -1)


def _rope(x, fc):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * fc[None, :, None, :]).flatten(3).type_as(x)


def _block(sd, p, x, c, fc, heads):
    mods = _linear(sd, f"{p}.adaLN_modulation.0", c).chunk(6, dim=-1)
    B, N, C = x.shape
    h = _rms(sd, f"{p}.norm1", x) * (1 + mods[1]) + mods[0]
    qkv = _linear(sd, f"{p}.attn.qkv", h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 1, 3, 4)
    q = _rope(_rms(sd, f"{p}.attn.q_norm", qkv[0]), fc)
    k = _rope(_rms(sd, f"{p}.attn.k_norm", qkv[1]), fc)
    v = qkv[2]
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    x = x + mods[2] * _linear(sd, f"{p}.attn.proj", a.transpose(1, 2).reshape(B, N, C))
    h = _rms(sd, f"{p}.norm2", x) * (1 + mods[4]) + mods[3]
    ff = _linear(sd, f"{p}.mlp.w2", F.silu(_linear(sd, f"{p}.mlp.w1", h)) * _linear(sd, f"{p}.mlp.w3", h))
    return x + mods[5] * ff


def official_forward(sd, cfg, x, t, y, s=None):
    """(velocity, s) exactly as the official DDT.forward computes them (fp32)."""
    B, _, H, W = x.shape
    p, D, heads = cfg.patch_size, cfg.hidden_size, cfg.num_groups
    fc = _freqs_cis(D // heads, H // p, W // p)
    xp = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)
    half = 128
    freqs = torch.exp(-math.log(10) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[..., None].float() * freqs[None]
    temb = _linear(sd, "t_embedder.mlp.2", F.silu(_linear(sd, "t_embedder.mlp.0",
                                                           torch.cat([torch.cos(args), torch.sin(args)], -1))))
    temb = temb.view(B, -1, D)
    c = F.silu(temb + sd["y_embedder.embedding_table.weight"][y].view(B, 1, D))
    if s is None:
        s = _linear(sd, "s_embedder.proj", xp)
        for i in range(cfg.num_encoder_blocks):
            s = _block(sd, f"blocks.{i}", s, c, fc, heads)
        s = F.silu(temb + s)
    h = _linear(sd, "x_embedder.proj", xp)
    for i in range(cfg.num_encoder_blocks, cfg.num_blocks):
        h = _block(sd, f"blocks.{i}", h, s, fc, heads)
    shift, scale = _linear(sd, "final_layer.adaLN_modulation.0", s).chunk(2, dim=-1)
    h = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale) + shift
    h = _linear(sd, "final_layer.linear", h)
    v = F.fold(h.transpose(1, 2).contiguous(), (H, W), kernel_size=p, stride=p)
    return v, s


def official_sampler(net, noise, labels, *, num_steps, guidance, interval, last_step, recompute, null, shift=1.0,
                     step_fn="ode", step_noise=None):
    """The official stateful_flow_matching EulerSampler._impl_sampling (simple_guidance_fn, LinearScheduler for
    scheduler and w_scheduler), restated in torch. `net(x, t, y, state) -> (v, state)`; `step_noise(i)` gives
    the Gaussian draw of step i for the SDE step functions (the official randn_like)."""
    ts = torch.linspace(0.0, 1 - last_step, num_steps)
    ts = torch.cat([ts, torch.tensor([1.0])])
    ts = ts / (ts + (1 - ts) * shift)  # shift_respace_fn
    b = noise.shape[0]
    cond = torch.cat([torch.full((b,), null), labels])
    x, state = noise, None
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t_cur
        t = t_cur.repeat(b)
        if i in recompute:
            state = None
        out, state = net(torch.cat([x, x]), t.repeat(2), cond, state)
        scale = guidance if interval[0] < t[0] < interval[1] else 1.0
        u, c = out.chunk(2)
        v = u + scale * (c - u)
        sigma, w = 1 - t_cur, 1 - t_cur  # LinearScheduler: alpha = t, sigma = 1 - t; w_scheduler.w = sigma
        s = (t_cur * v - x) / (sigma ** 2 + t_cur * sigma)  # ((1/dalpha_over_alpha) v - x) / (sigma^2 - ...)
        name = step_fn if i < num_steps - 1 else "ode"  # last_step_fn
        if name == "ode":
            x = x + v * dt
        elif name == "sde_mean":
            x = x + v * dt + s * w * dt
        elif name == "sde":
            x = x + v * dt + s * w * dt + torch.sqrt(2 * w * dt) * step_noise(i)
        else:  # sde_preserve
            x = x + v * dt + 0.5 * s * w * dt + torch.sqrt(w * dt) * step_noise(i)
    return x


def _preint(ts, a, b):
    """The official pre_integral.lagrange_preint_o1..o4 coefficients, restated from its closed forms (float64):
    the integrals over [a, b] of the Lagrange basis through ts (oldest first), normalized to sum 1."""
    if len(ts) == 1:
        return [1.0]
    if len(ts) == 2:
        t1, t2 = ts
        i1 = 0.5 / (t1 - t2) * ((b - t2) ** 2 - (a - t2) ** 2)
        i2 = 0.5 / (t2 - t1) * ((b - t1) ** 2 - (a - t1) ** 2)
        return [i1 / (i1 + i2), i2 / (i1 + i2)]

    def cubic(p, q, r):  # integral of (t - q)(t - r) / ((p - q)(p - r))
        f = lambda t: t ** 3 / 3 - (q + r) * t ** 2 / 2 + q * r * t  # noqa: E731
        return (f(b) - f(a)) / ((p - q) * (p - r))

    def quartic(p, q, r, u):  # integral of (t - q)(t - r)(t - u) / ((p - q)(p - r)(p - u))
        f = lambda t: t ** 4 / 4 - (q + r + u) * t ** 3 / 3 + (q * r + q * u + r * u) * t ** 2 / 2 - q * r * u * t  # noqa
        return (f(b) - f(a)) / ((p - q) * (p - r) * (p - u))

    if len(ts) == 3:
        t1, t2, t3 = ts
        w = [cubic(t1, t2, t3), cubic(t2, t1, t3), cubic(t3, t1, t2)]
    else:
        t1, t2, t3, t4 = ts
        w = [quartic(t1, t2, t3, t4), quartic(t2, t1, t3, t4), quartic(t3, t1, t2, t4), quartic(t4, t1, t2, t3)]
    return [x / sum(w) for x in w]


def official_adams_sampler(net, noise, labels, *, num_steps, guidance, interval, last_step, order, refresh, null,
                           shift=1.0):
    """The official stateful_flow_matching/adam_sampling.py AdamLMSampler._impl_sampling, restated: timesteps as the
    official (float32 linspace, then the shift), `last_step` taken from the sampler settings (the official __init__
    reads it without setting it), coefficients from pre_integral's closed forms in float64, the full
    [uncond; cond] batch every step, the state reset every `refresh` steps, t_cur accumulated from dt in float32
    and the guidance test on it, as the official. The solver runs in the dtype of `noise` (float64 for an exact
    restatement); `net(x, t, y, state) -> (v, state)` gets x in that dtype."""
    ts = torch.cat([torch.linspace(0.0, 1 - last_step, num_steps), torch.tensor([1.0])])
    ts = ts / (ts + (1 - ts) * shift)  # float32, as the official shift_respace_fn on its float32 timesteps
    t64 = ts.double().tolist()
    coeffs = [_preint(t64[max(0, i - order + 1):i + 1], t64[i], t64[i + 1]) for i in range(num_steps)]
    b = noise.shape[0]
    cond = torch.cat([torch.full((b,), null), labels])
    x, state, traj = noise, None, []
    t_cur = torch.zeros(b)  # float32
    for i in range(num_steps):
        if i % refresh == 0:
            state = None
        out, state = net(torch.cat([x, x]), t_cur.repeat(2), cond, state)
        u, c = out.to(x.dtype).chunk(2)
        scale = guidance if interval[0] < t_cur[0] < interval[1] else 1.0
        traj.append(u + scale * (c - u))
        k = len(coeffs[i])
        v = torch.zeros_like(x)
        for j in range(k):
            v += coeffs[i][j] * traj[-k:][j]
        dt = ts[i + 1] - ts[i]
        x = x + v * dt
        t_cur += dt
    return x


def official_similarity(states) -> "torch.Tensor":
    """sharing_sampling's similarity of encoder states (N, B, L, D): mean over tokens of the cosine of s_i, s_j."""
    states = torch.as_tensor(states, dtype=torch.float64)
    n = states.shape[0]
    unit = F.normalize(states, dim=-1)
    sim = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            sim[i, j] = (unit[i] * unit[j]).sum(-1).mean()
    return sim
