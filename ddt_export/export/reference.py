"""The PyTorch reference: the model a manifest was exported from, and the official sampling loop in PyTorch.

Used by `validate` (the quality gate's reference side) and `bench` (the PyTorch baselines). The loop is the
official one: the full `[uncond; cond]` batch through encoder and decoder at every step (no cond-only rows),
the encoder on the schedule's steps, CFG scale from `core.sampling.guidance_scale`, the step functions restated
in PyTorch (noise drawn from the caller's numpy generator in the host loop's order), x kept in float32.
Everything a user can get wrong (no checkpoint, a changed file, no GPU for a GPU variant) is a typed error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.artifacts import sha256_file
from ..core.config import SamplerConfig
from ..core.errors import ArtifactError, BackendError, ConfigError
from ..core.manifest import Manifest
from ..core.sampling import NOISY, guidance_scale, step_times
from .exporter import load_checkpoint_model
from .model import DDT

VARIANTS = ("torch-eager-fp32", "torch-eager-bf16", "torch-compile-bf16")


def reference_model(man: Manifest) -> DDT:
    """The fp32 PyTorch model (CPU, eval) a manifest was exported from. ArtifactError when it cannot be rebuilt
    here: a random export of unknown seed, a checkpoint missing or no longer hashing to the manifest's."""
    prov, src, what = man.provenance, man.source, "PyTorch reference (--reference torch)"
    hint = "pass --reference DIR (a second engine folder of the same model)"
    if prov.weights_kind == "random":
        if src.seed is None:
            raise ArtifactError(what, "random weights of a known seed", "no seed in the manifest", hint)
        model, _ = load_checkpoint_model(None, man.config, random_weights=True, seed=int(src.seed))
        return model.float().eval()
    if not src.path or not Path(src.path).is_file():
        raise ArtifactError(what, "the manifest's checkpoint on this machine", f"no file {src.path}", hint)
    digest = sha256_file(Path(src.path))
    if digest != prov.weights:
        raise ArtifactError(f"{what}: checkpoint {src.path}", f"sha256 {prov.weights[:12]} (the manifest's)",
                            f"sha256 {digest[:12]}", "the file changed since the export; export again")
    model, _ = load_checkpoint_model(Path(src.path), man.config, weights=prov.weights_kind)
    return model.float().eval()


def _step(name: str, x, v, dt: float, t: float, noise):
    """The official step functions on the linear path, in PyTorch float32 (see `core.sampling`)."""
    if name == "ode":
        return x + v * dt
    sigma, w = 1.0 - t, 1.0 - t
    score = (t * v - x) / (sigma * sigma + t * sigma)
    if name == "sde_mean":
        return x + v * dt + score * w * dt
    if name == "sde":
        return x + v * dt + score * w * dt + (2.0 * w * dt) ** 0.5 * noise
    return x + v * dt + 0.5 * score * w * dt + (w * dt) ** 0.5 * noise  # sde_preserve


class TorchReference:
    """The reference model of one manifest as a sampler (`sample`), per-graph calls (`call`) and timed stages
    (`stage`), in one variant: eager fp32 (CPU or GPU), eager bf16 or torch.compile bf16 (GPU only)."""

    def __init__(self, man: Manifest, variant: str = "torch-eager-fp32", model: DDT | None = None):
        if variant not in VARIANTS:
            raise ConfigError("PyTorch reference variant", " | ".join(VARIANTS), variant)
        cuda = torch.cuda.is_available()
        if variant != "torch-eager-fp32" and not cuda:
            raise BackendError(variant, "a CUDA GPU", "none visible")
        self.man, self.variant = man, variant
        self.device = "cuda" if cuda else "cpu"
        self.dtype = torch.float32 if variant == "torch-eager-fp32" else torch.bfloat16
        model = reference_model(man) if model is None else model
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self._enc, self._dec = self.model.encode, self.model.decode
        if variant == "torch-compile-bf16":
            self._enc, self._dec = torch.compile(self._enc), torch.compile(self._dec)

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def sample(self, noise: np.ndarray, labels: np.ndarray, sampler: SamplerConfig, schedule: Sequence[int],
               rng: np.random.Generator | None = None) -> np.ndarray:
        """Final latents (B, C, H, W) float32: the official sharing sampler, full [uncond; cond] batch."""
        t, dt = step_times(sampler)
        b, null = len(labels), self.man.config.model.null_class
        x = torch.from_numpy(np.asarray(noise, np.float32)).to(self.device)
        y = torch.cat([torch.full((b,), null), torch.from_numpy(np.asarray(labels, np.int64))]).to(self.device)
        recompute, s = set(schedule), None
        rng = rng or np.random.default_rng(0)
        for i in range(sampler.num_steps):
            x2 = torch.cat([x, x]).to(self.dtype)
            if i in recompute:
                s = self._enc(x2, torch.full((2 * b,), float(t[i]), device=self.device), y)  # t stays fp32
            v2 = self._dec(x2, s).float()
            scale = guidance_scale(t[i], sampler)
            v = v2[:b] + scale * (v2[b:] - v2[:b])
            name = sampler.step_fn if i < sampler.num_steps - 1 else "ode"  # the official last_step_fn
            noise_i = (torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32)).to(self.device)
                       if name in NOISY else None)
            x = _step(name, x, v, float(dt[i]), float(t[i]), noise_i)
        self._sync()
        return x.cpu().numpy()

    @torch.no_grad()
    def call(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One encoder (x, t, y -> s) or decoder (x, s -> v) call, float32 out."""
        t = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
        if graph == "encoder":
            out = self._enc(t["x"].to(self.dtype), t["t"], t["y"])
        else:
            out = self._dec(t["x"].to(self.dtype), t["s"].to(self.dtype))
        return out.float().cpu().numpy()

    def stage(self, graph: str, rows: int) -> Callable[[], None]:
        """A closure making one `graph` call on `rows` random rows (for timing)."""
        m = self.man.config.model
        x = torch.randn(rows, *m.latent_shape, device=self.device, dtype=self.dtype)
        tt = torch.rand(rows, device=self.device)
        yy = torch.zeros(rows, dtype=torch.long, device=self.device)
        s = torch.randn(rows, m.num_tokens, m.hidden_size, device=self.device, dtype=self.dtype)

        @torch.no_grad()
        def call():
            self._enc(x, tt, yy) if graph == "encoder" else self._dec(x, s)
            self._sync()

        return call
