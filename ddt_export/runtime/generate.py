"""`generate`: the library side of the production command. Torch-free.

engines folder -> noise (`core.noise`, or a .npy) and labels -> the engines' loop (host or device) on the
chosen encoder schedule (`runtime.schedules`) -> final latents -> VAE decoder graph when the folder has one
(else the latents are the image) -> one PNG per sample and a preview grid.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.artifacts import load_npy, save_npy
from ..core.config import SamplerConfig
from ..core.errors import InputError
from ..core.images import images_from_samples, save_png, tile
from ..core.log import Say
from ..core.noise import StepNoise, sample_noise
from .engines import Engines, load_engines
from .host import call_graph, plan_steps, sample, saved_fraction, work_rows
from .schedules import resolve_schedule

GRID_MIN_SIDE = 256  # grids of tiny images are upscaled (nearest) to at least this many pixels wide
SAMPLE_FILE = "{index:05d}-class{label}.png"  # what write_images names a sample: 00003-class7.png ...
SAMPLE_NAME = re.compile(r"\d{5,}-class\d+\.png")  # ... and the pattern that finds them again


def sampler_for(engines: Engines, steps: int | None = None, cfg: float | None = None) -> SamplerConfig:
    """The manifest's sampler settings with the command's overrides (checked here, named by their flag)."""
    if cfg is not None and not math.isfinite(cfg):
        raise InputError("--cfg", "a finite number", cfg)
    if steps is not None and steps < 1:
        raise InputError("--steps", ">= 1", steps)
    s = engines.config.sampler
    changes = {k: v for k, v in (("num_steps", steps), ("guidance", cfg)) if v is not None}
    return dataclasses.replace(s, **changes)


# ------------------------------------------------------------------------------------------------- images


def write_images(images: np.ndarray, labels: np.ndarray, out_dir: Path, say: Say = print) -> tuple[list[Path], Path]:
    """One PNG per sample (native resolution, for FID) in out_dir and preview/grid.png (upscaled when tiny).

    The grid goes one folder down so that out_dir holds the samples and nothing else: `ddt-export fid out_dir`
    reads every image there. Samples an earlier run left there (files named as this function names them) are
    removed, so that the folder holds this run's samples only; other files are left alone."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("--out", "a folder for the sample PNGs", f"{out_dir} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    u8 = images_from_samples(images)  # (B, H, W, C) uint8
    paths = [out_dir / SAMPLE_FILE.format(index=i, label=int(y)) for i, y in enumerate(labels)]
    keep = set(paths)
    stale = [f for f in out_dir.iterdir() if SAMPLE_NAME.fullmatch(f.name) and f not in keep]
    for f in stale:
        f.unlink()
    if stale:
        say(f"removed {len(stale)} samples of an earlier run from {out_dir}")
    for img, p in zip(u8, paths):
        save_png(img, p)
    preview = out_dir / "preview" / "grid.png"
    preview.parent.mkdir(exist_ok=True)
    return paths, save_png(tile(u8, math.ceil(math.sqrt(len(u8)))), preview, GRID_MIN_SIDE)


# ------------------------------------------------------------------------------------------------- generate


@dataclass
class GenerateResult:
    latents: np.ndarray  # (B, C, H, W) float32
    labels: np.ndarray  # (B,) int64
    schedule: list[int]
    schedule_spec: str
    sampler: SamplerConfig
    rows: dict[str, int]  # graph-call rows of the run and of the official full-batch loop
    saved: float  # block-weighted fraction of the full-batch work saved by cond-only rows
    images: list[Path]
    grid: Path | None
    backend: str
    loop: str = "host"  # the loop that ran: "device" (TensorRT, x and s on the GPU) or "host"


def make_labels(num_classes: int, classes: Sequence[int] | None, labels_file: Path | None,
                num: int | None) -> np.ndarray:
    """(B,) int64: --labels file, else --class values cycled to --num, else 0, 1, 2, ... cycled to --num."""
    if labels_file is not None:
        if classes:
            raise InputError("--labels", "either --class or --labels", "both")
        labels = load_npy(labels_file, "--labels")
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.size == 0:
            raise InputError("--labels", "a non-empty 1-D integer .npy", f"{labels.dtype} {labels.shape}")
    else:
        base = np.asarray(list(classes) if classes else range(num_classes), np.int64)
        count = num if num is not None else (len(base) if classes else 8)
        labels = np.resize(base, count)
    if num is not None and labels.shape[0] != num:
        raise InputError("--num", f"{labels.shape[0]} (the number of labels in {labels_file})", num)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise InputError("class", f"in [0, {num_classes})", int(bad[0]))
    return labels.astype(np.int64)


def generate(engines_dir: Path, *, classes: Sequence[int] | None = None, labels_file: Path | None = None,
             num: int | None = None, seed: int = 0, steps: int | None = None, cfg: float | None = None,
             schedule: str | None = None, noise_file: Path | None = None, latents_out: Path | None = None,
             out_dir: Path | None = None, backend: str = "auto", cond_only_outside: bool = True,
             device_loop: bool = True, progress=None, say: Say = print) -> GenerateResult:
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError("--out", "a folder for the sample PNGs", f"{out_dir} is a file")
    if num is not None and num < 1:
        raise InputError("--num", ">= 1", num)
    with load_engines(engines_dir, backend, device_loop=device_loop) as engines:
        m = engines.config.model
        sampler = sampler_for(engines, steps, cfg)  # bad --cfg / --steps refused before anything runs
        if noise_file is not None:
            noise = load_npy(noise_file, "--noise")
            if num is not None and noise.ndim == 4 and noise.shape[0] != num:
                raise InputError("--noise", f"{num} samples (--num)", noise.shape[0])
            num = noise.shape[0] if noise.ndim == 4 else num
        labels = make_labels(m.num_classes, classes, labels_file, num)
        if noise_file is None:
            noise = sample_noise(seed, range(labels.shape[0]), m.latent_shape)
        recompute, spec = resolve_schedule(schedule, engines, sampler, say)
        plan = plan_steps(sampler, recompute, cond_only_outside)
        rows = work_rows(plan, labels.shape[0])
        latents = sample(engines, noise, labels, sampler, recompute, progress=progress,
                         cond_only_outside=cond_only_outside, rng=StepNoise(seed, range(labels.shape[0])))
        if latents_out is not None:
            save_npy(latents_out, latents)
        images, grid = [], None
        if out_dir is not None:
            if engines.vae_decoder is not None:
                pixels = call_graph(engines, "vae_decoder", sampler.num_steps, None, latent=latents)
            else:
                if m.latent_scale is not None:
                    say("note: this folder has no vae_decoder graph; the PNGs show the first latent channels")
                pixels = latents
            images, grid = write_images(pixels, labels, out_dir, say)
        saved = saved_fraction(rows, m.num_encoder_blocks, m.num_blocks - m.num_encoder_blocks)
        return GenerateResult(latents, labels, recompute, spec, sampler, rows, saved, images, grid,
                              engines.backend_name, engines.loop)
