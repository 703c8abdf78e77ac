"""VAE decoder export: a local diffusers AutoencoderKL folder -> vae_decoder.onnx (latent -> image in [-1, 1]).

The official pipeline decodes `vae.decode(latent / scaling_factor)`; the division is folded into the graph so
the host loop hands over the sampler's latents as they are. No downloads here: the folder must hold config.json
and the weights (a local copy of stabilityai/sd-vae-ft-ema, or `--vae hf://...` resolved by `export.hub`).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..core.artifacts import Staging
from ..core.config import Config
from ..core.errors import CheckpointError, ConfigError
from ..core.manifest import GraphRecord
from ..core.precision import Precision
from ..core.provenance import FolderRef
from ..core.specs import VAE_DECODER, Dims
from .graphs import check_graph, export_graph, not_run, parity, torch_dtype


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


def export_vae(folder: Path | FolderRef, cfg: Config, staging: Staging, precision: Precision, check: bool = True,
               progress=None) -> tuple[GraphRecord, Dims]:
    """Export the decoder of the VAE in `folder` into the export's staging folder and install it; returns its
    graph record and the folder's dims (the images are the VAE's: its channels and upsampling factor)."""
    hub = folder.hub if isinstance(folder, FolderRef) else None
    folder = Path(folder)
    vae = load_vae(folder)
    vc = vae.config
    if vc.latent_channels != cfg.model.in_channels:
        raise ConfigError(f"VAE {folder}: latent_channels", cfg.model.in_channels, vc.latent_channels)
    factor = 2 ** (len(vc.block_out_channels) - 1)
    scale = float(vc.scaling_factor)
    if cfg.model.latent_scale is not None and abs(scale - cfg.model.latent_scale) > 1e-6:
        raise ConfigError(f"VAE {folder}: scaling_factor", cfg.model.latent_scale, scale)
    dims = Dims.of(cfg.model, image_channels=vc.out_channels, vae_factor=factor)
    reference = VaeDecoderGraph(vae, scale).eval()
    exported = VaeDecoderGraph(copy.deepcopy(vae).to(dtype=torch_dtype(precision)), scale).eval()
    spec = VAE_DECODER
    if progress:
        progress(f"exporting {spec.file}")
    path = staging.path(spec.file)
    export_graph(exported, spec, dims, path)
    check_graph(path)
    checks = {}
    if check and precision.ort_cpu:
        checks["vs_pytorch"] = parity(path, spec, reference, dims, precision, cfg.model.num_classes, batches=(1, 2))
    elif not precision.ort_cpu:
        checks["onnxruntime"] = not_run(path)
    info = {"scaling_factor": scale, "source": str(folder.resolve()), **({"hub": hub} if hub else {})}
    return GraphRecord(spec.file, staging.install(spec.file), checks, info), dims
