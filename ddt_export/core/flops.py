"""FLOP model of one DDT step: what encoder sharing and FP8 can save. Torch-free.

Counts multiply-adds x 2 of the GEMMs and attention matmuls per sample (elementwise work ignored). The
encoder's adaLN runs on one condition vector per sample; the decoder's on every token (its condition s is
per token), which is why the decoder's 6 blocks weigh more than 6/28 of a step.

`block_gemm_flops` breaks the block GEMMs down by (block, role), the unit an FP8 recipe selects; `fp8_speedup`
turns an FP8 share of a step's FLOPs into the speed-up it predicts when FP8 runs at `FP8_RATE` times fp16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .config import TIME_FREQ_DIM, ModelConfig

# Block GEMM roles, as the exporter's module paths name them (model.blocks.<i>.<role>)
GEMM_ROLES = ("attn.qkv", "attn.proj", "mlp.w1", "mlp.w2", "mlp.w3", "adaLN_modulation")
# FP8 over fp16 dense tensor-core throughput on H100/H200 SXM (1979 vs 989 TFLOPS): the predicted FP8 rate
FP8_RATE = 2.0


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


def _gemm_rows_shapes(cfg: ModelConfig, adaln_rows: int) -> dict[str, tuple[int, int, int]]:
    """(rows, K, N) of each block GEMM, per sample."""
    L, D, Hm = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    return {"attn.qkv": (L, D, 3 * D), "attn.proj": (L, D, D), "mlp.w1": (L, D, Hm), "mlp.w3": (L, D, Hm),
            "mlp.w2": (L, Hm, D), "adaLN_modulation": (adaln_rows, D, 6 * D)}


def _block(cfg: ModelConfig, adaln_rows: int) -> float:
    gemm = sum(m * k * n for m, k, n in _gemm_rows_shapes(cfg, adaln_rows).values())
    return 2.0 * gemm + attention_flops(cfg)


def attention_flops(cfg: ModelConfig) -> float:
    """q k^T and attn @ v of one block over all heads, per sample."""
    return 2.0 * 2 * cfg.num_tokens ** 2 * cfg.hidden_size


def block_gemm_flops(cfg: ModelConfig) -> dict[tuple[int, str], float]:
    """FLOPs per sample of every block GEMM, keyed (block index, role): blocks 0..E-1 are the encoder's (adaLN on
    one condition row), E..N-1 the decoder's (adaLN on every token)."""
    out = {}
    for b in range(cfg.num_blocks):
        rows = 1 if b < cfg.num_encoder_blocks else cfg.num_tokens
        for role, (m, k, n) in _gemm_rows_shapes(cfg, rows).items():
            out[b, role] = 2.0 * m * k * n
    return out


def step_flops(cfg: ModelConfig) -> StepFlops:
    """FLOPs of one encoder call and one decoder call, per sample."""
    L, D, P = cfg.num_tokens, cfg.hidden_size, cfg.patch_dim
    E, Dn = cfg.num_encoder_blocks, cfg.num_blocks - cfg.num_encoder_blocks
    enc = 2.0 * (L * P * D + TIME_FREQ_DIM * D + D * D) + E * _block(cfg, 1)
    dec = 2.0 * (L * P * D + L * D * 2 * D + L * D * P) + Dn * _block(cfg, L)
    return StepFlops(enc, dec)


@dataclass(frozen=True)
class Fp8Share:
    """What an FP8 selection of block GEMMs covers, per sample, for a step that runs both graphs."""

    fp8: float  # FLOPs of the selected GEMMs
    block_gemms: float  # FLOPs of all block GEMMs
    step: float  # FLOPs of an encoder call plus a decoder call

    @property
    def of_block_gemms(self) -> float:
        return self.fp8 / self.block_gemms

    @property
    def of_step(self) -> float:
        return self.fp8 / self.step

    @property
    def predicted_speedup(self) -> float:
        return fp8_speedup(self.of_step)


def fp8_share(cfg: ModelConfig, selected: Iterable[tuple[int, str]]) -> Fp8Share:
    """The FLOP share of the (block, role) GEMMs `selected` (keys of `block_gemm_flops`)."""
    per = block_gemm_flops(cfg)
    chosen = set(selected)
    unknown = chosen - set(per)
    assert not unknown, f"no such block GEMMs: {sorted(unknown)}"
    f = step_flops(cfg)
    return Fp8Share(sum(per[k] for k in chosen), sum(per.values()), f.encoder + f.decoder)


def fp8_speedup(step_share: float, rate: float = FP8_RATE) -> float:
    """Predicted step speed-up when `step_share` of the FLOPs run `rate` times faster and the rest as before
    (compute-bound GEMMs; the elementwise work, Q/DQ and memory traffic are not modelled: an upper bound)."""
    return 1.0 / (1.0 - step_share + step_share / rate)
