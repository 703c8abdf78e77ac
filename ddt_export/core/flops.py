"""FLOP model of one DDT step: what encoder sharing can save. Torch-free.

Counts multiply-adds x 2 of the GEMMs and attention matmuls per sample (elementwise work ignored). The
encoder's adaLN runs on one condition vector per sample; the decoder's on every token (its condition s is
per token), which is why the decoder's 6 blocks weigh more than 6/28 of a step.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import TIME_FREQ_DIM, ModelConfig


@dataclass(frozen=True)
class StepFlops:
    encoder: float
    decoder: float

    @property
    def encoder_fraction(self) -> float:
        return self.encoder / (self.encoder + self.decoder)

    def predicted_speedup(self, recompute_fraction: float) -> float:
        """Every-step cost over the cost when the encoder runs on `recompute_fraction` of the steps."""
        return 1.0 / (1.0 - self.encoder_fraction * (1.0 - recompute_fraction))


def _block(cfg: ModelConfig, adaln_rows: int) -> float:
    L, D, Hm = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    gemm = L * (3 * D * D + D * D + 3 * D * Hm)  # qkv, proj, SwiGLU w1/w3/w2
    attn = 2 * L * L * D  # q k^T and attn @ v over all heads
    adaln = adaln_rows * D * 6 * D
    return 2.0 * (gemm + attn + adaln)


def step_flops(cfg: ModelConfig) -> StepFlops:
    """FLOPs of one encoder call and one decoder call, per sample."""
    L, D, P = cfg.num_tokens, cfg.hidden_size, cfg.patch_dim
    E, Dn = cfg.num_encoder_blocks, cfg.num_blocks - cfg.num_encoder_blocks
    enc = 2.0 * (L * P * D + TIME_FREQ_DIM * D + D * D) + E * _block(cfg, 1)
    dec = 2.0 * (L * P * D + L * D * 2 * D + L * D * P) + Dn * _block(cfg, L)
    return StepFlops(enc, dec)
