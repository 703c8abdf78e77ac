"""VAE decoder export: a local diffusers AutoencoderKL folder -> vae_decoder.onnx (latent -> image in [-1, 1]).

The official pipeline decodes `vae.decode(latent / scaling_factor)`; the division is folded into the graph so
the host loop hands over the sampler's latents as they are. No downloads: the folder must hold config.json and
the weights (e.g. a local copy of stabilityai/sd-vae-ft-ema).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .config import Config
from .errors import CheckpointError, ConfigError
from .manifest import atomic_dir, sha256_file
from .specs import VAE_DECODER, model_dims


class VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def forward(self, latent):
        z = (latent / self.scaling_factor).to(self.vae.dtype)
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z).float()


def load_vae(folder: Path):
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError("--vae", "a local diffusers AutoencoderKL folder with config.json", str(folder))
    try:
        return AutoencoderKL.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise CheckpointError(f"--vae {folder}", "a loadable AutoencoderKL", str(e).splitlines()[0])


def export_vae(folder: Path, cfg: Config, out: Path, precision: str = "fp32", progress=None) -> dict:
    """Export the decoder of the VAE in `folder` into `out/vae_decoder.onnx`; returns its manifest record."""
    from .export import TORCH_DTYPES, _install, check_graph, export_graph, parity

    vae = load_vae(folder)
    vc = vae.config
    if vc.latent_channels != cfg.model.in_channels:
        raise ConfigError(f"VAE {folder}: latent_channels", cfg.model.in_channels, vc.latent_channels)
    factor = 2 ** (len(vc.block_out_channels) - 1)
    scale = float(vc.scaling_factor)
    if cfg.model.latent_scale is not None and abs(scale - cfg.model.latent_scale) > 1e-6:
        raise ConfigError(f"VAE {folder}: scaling_factor", cfg.model.latent_scale, scale)
    dims = model_dims(cfg.model, image_channels=vc.out_channels, vae_factor=factor)
    reference = VaeDecoderGraph(vae, scale).eval()
    exported = VaeDecoderGraph(copy.deepcopy(vae).to(dtype=TORCH_DTYPES.get(precision, torch.float32)), scale).eval()
    spec = VAE_DECODER
    with atomic_dir(out, "vae") as scratch:
        if progress:
            progress(f"exporting {spec.file}")
        path = scratch / spec.file
        export_graph(exported, spec, dims, path)
        check_graph(path)
        record = {"file": spec.file, "scaling_factor": scale, "image_channels": vc.out_channels, "factor": factor,
                  "source": str(Path(folder).resolve())}
        if precision in ("fp32", "fp16"):
            record["parity"] = parity(path, spec, reference, dims, precision, cfg.model.num_classes, batches=(1, 2))
        _install(scratch, Path(out), spec.file)
    record["sha256"] = sha256_file(Path(out) / spec.file)
    return record
