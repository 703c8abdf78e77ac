"""A straightforward restatement of the official DDT forward, for tests only.

Written from the official formulation (F.unfold/F.fold patches, complex RoPE via torch.polar and
view_as_complex, F.scaled_dot_product_attention, nn.LayerNorm final norm) as plain functions over a state dict,
so it shares no code with ddt_export.model.
"""
from __future__ import annotations

import math

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
