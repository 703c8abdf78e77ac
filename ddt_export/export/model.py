"""DDT in PyTorch: numerically the official model, formulated so it exports to plain ONNX.

Parameter names copy the official `src/models/denoiser/decoupled_improved_dit.py`, so official state dicts
load one to one. Differences are in formulation only, each with identical element order:
- patchify/unpatchify are reshape/permute, not F.unfold/F.fold (fold exports as Col2Im; TensorRT lacks it);
- 2-D RoPE uses real cos/sin buffers with the official pair interleaving, not torch.polar/view_as_complex;
- attention is written out (q k^T * scale, softmax, @ v) so every exporter and TensorRT see plain MatMuls;
- the forward is split into `encode(x, t, y) -> s` and `decode(x, s) -> v`.
RMSNorm statistics, the final LayerNorm, RoPE and the timestep frequencies run in fp32 whatever the
parameter dtype: those are the fp32 islands of the fp16/bf16 graphs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import TIME_FREQ_DIM, ModelConfig
TIME_MAX_PERIOD = 10.0  # official DDT uses 10, not the usual 10000
ROPE_THETA = 10000.0
ROPE_SPAN = 16.0  # positions are linspace(0, 16, n) per axis, whatever the grid
NORM_EPS = 1e-6


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


# --------------------------------------------------------------------------------------------- patches


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C*p*p), tokens row-major, features channel-major: as F.unfold(...).transpose(1, 2)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # B C h p w p
    x = x.permute(0, 2, 4, 1, 3, 5)  # B h w C p p
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    """(B, L, C*p*p) -> (B, C, H, W): the inverse of `patchify`, as F.fold(x.transpose(1, 2))."""
    B = x.shape[0]
    x = x.reshape(B, H // p, W // p, C, p, p)  # B h w C p p
    x = x.permute(0, 3, 1, 4, 2, 5)  # B C h p w p
    return x.reshape(B, C, H, W)


def rope_tables(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the official 2-D RoPE angles, (L, head_dim/2) float32.

    Pair k of a head rotates by angle[k]; pairs alternate x-axis and y-axis frequencies (x at even k),
    as the official `precompute_freqs_cis_2d` interleaves them. Computed in float32 as the official code does.
    """
    pos = torch.linspace(0, ROPE_SPAN, grid)
    y_pos, x_pos = torch.meshgrid(pos, pos, indexing="ij")
    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))  # (hd/4,)
    x_ang = torch.outer(x_pos.reshape(-1), freqs)  # (L, hd/4)
    y_ang = torch.outer(y_pos.reshape(-1), freqs)
    ang = torch.stack([x_ang, y_ang], dim=-1).reshape(grid * grid, head_dim // 2)  # (L, hd/2)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, hd); cos/sin (L, hd/2). Rotation in fp32 (the official casts to float for complex math)."""
    dtype = x.dtype
    x = x.float().reshape(*x.shape[:-1], -1, 2)  # B L H hd/2 2
    a, b = x[..., 0], x[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(dtype)


# --------------------------------------------------------------------------------------------- layers


class Embed(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim, bias=True)

    def forward(self, x):
        return self.proj(x)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        half = TIME_FREQ_DIM // 2
        freqs = torch.exp(-math.log(TIME_MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) float32 -> (B, D). Frequencies in fp32, cos then sin."""
        args = t[:, None].float() * self.freqs.float()[None]  # B 128
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # B 256
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # + the null class

    def forward(self, y):
        return self.embedding_table(y)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class FeedForward(nn.Module):
    """SwiGLU; hidden = int(2 * 4C / 3) as the official FeedForward."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, self.head_dim)  # B L 3 H hd
        q, k, v = qkv.unbind(2)  # each B L H hd
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))  # B H L hd
        attn = torch.softmax((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5, dim=-1)  # B H L L
        x = (attn @ v).transpose(1, 2).reshape(B, L, D)
        return self.proj(x)


class DDTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = FeedForward(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cos, sin):
        """x (B, L, D); c (B, 1, D) in the encoder, (B, L, D) in the decoder (a per-token adaLN GEMM)."""
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g_a * self.attn(modulate(self.norm1(x), sh_a, sc_a), cos, sin)
        x = x + g_m * self.mlp(modulate(self.norm2(x), sh_m, sc_m))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        xn = F.layer_norm(x.float(), x.shape[-1:], eps=NORM_EPS).to(x.dtype)  # no affine, fp32 statistics
        return self.linear(modulate(xn, shift, scale))


# --------------------------------------------------------------------------------------------- model


class DDT(nn.Module):
    """Decoupled Diffusion Transformer: condition encoder (blocks [0, E)) and velocity decoder ([E, N))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = Embed(cfg.patch_dim, D)
        self.s_embedder = Embed(cfg.patch_dim, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        self.final_layer = FinalLayer(D, cfg.patch_dim)
        self.blocks = nn.ModuleList(DDTBlock(D, cfg.num_groups, cfg.mlp_hidden) for _ in range(cfg.num_blocks))
        cos, sin = rope_tables(cfg.head_dim, cfg.grid)  # belong to the exported resolution
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self, generator: torch.Generator | None = None):
        """Random init of every parameter, output layers non-zero and RMSNorm weights at 1 + 0.1 N(0, 1), so an
        untrained model exercises every path and a swapped or missing weight changes its output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.02, generator=generator)
            elif isinstance(m, RMSNorm):
                nn.init.normal_(m.weight, mean=1.0, std=0.1, generator=generator)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02, generator=generator)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def encode(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) float, y (B,) int64 -> s (B, L, D): the condition for the decoder."""
        cos, sin = self.rope_cos.float(), self.rope_sin.float()
        t_emb = self.t_embedder(t)[:, None]  # B 1 D
        c = F.silu(t_emb + self.y_embedder(y)[:, None])  # B 1 D
        s = self.s_embedder(patchify(x.to(self.dtype), self.cfg.patch_size))  # B L D
        for block in self.blocks[: self.cfg.num_encoder_blocks]:
            s = block(s, c, cos, sin)
        return F.silu(t_emb + s)  # B L D

    def decode(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), s (B, L, D) -> velocity v (B, C, H, W). No t: time reaches it only through s."""
        cfg = self.cfg
        cos, sin = self.rope_cos.float(), self.rope_sin.float()
        B, C, H, W = x.shape
        s = s.to(self.dtype)
        h = self.x_embedder(patchify(x.to(self.dtype), cfg.patch_size))  # B L D
        for block in self.blocks[cfg.num_encoder_blocks:]:
            h = block(h, s, cos, sin)
        h = self.final_layer(h, s)  # B L C*p*p
        return unpatchify(h, cfg.patch_size, C, H, W)

    def forward(self, x, t, y, s=None):
        """The official signature: returns (velocity, s); the encoder is skipped when s is given."""
        if s is None:
            s = self.encode(x, t, y)
        return self.decode(x, s), s


class EncoderGraph(nn.Module):
    """What encoder.onnx computes: float32 in, float32 out, inner math in the model's dtype."""

    def __init__(self, model: DDT):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        return self.model.encode(x, t, y).float()


class DecoderGraph(nn.Module):
    """What decoder.onnx computes: float32 in, float32 out."""

    def __init__(self, model: DDT):
        super().__init__()
        self.model = model

    def forward(self, x, s):
        return self.model.decode(x, s).float()
