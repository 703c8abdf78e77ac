"""`generate` and `schedule`: the library side of the two production commands. Torch-free.

generate: engines folder -> noise (seeded numpy or a .npy) and labels -> host loop on the chosen encoder
schedule -> final latents -> VAE decoder graph when the folder has one (else the latents are the image) ->
one PNG per sample and a grid. schedule: the template trajectory (8 samples, fixed seed, every step
recomputed, full CFG batch) on the engines themselves -> similarity matrix -> statistical DP -> JSON + heatmap.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import SamplerConfig
from .errors import InputError
from .manifest import atomic_path
from .runtime import Engines, call_graph, load_engines, plan_steps, record_states, sample, saved_fraction, work_rows
from .sampling import to_uint8
from .schedule import (parse_spec, plot_heatmap, schedule_cost, schedule_record, similarity, solve_dp, steps_for,
                       uniform_steps, validate_steps, write_schedule)

TEMPLATE_SAMPLES = 8  # the official sharing_dp template batch
TEMPLATE_SEED = 0
GRID_MIN_SIDE = 256  # grids of tiny images are upscaled (nearest) to at least this many pixels wide
SAMPLE_FILE = "{index:05d}-class{label}.png"  # what write_images names a sample: 00003-class7.png ...
SAMPLE_NAME = re.compile(r"\d{5,}-class\d+\.png")  # ... and the pattern that finds them again
Say = Callable[[str], None]


def make_noise(seed: int, num: int, latent_shape: Sequence[int]) -> np.ndarray:
    """(num, C, H, W) float32 standard normal from numpy's default_rng(seed)."""
    return np.random.default_rng(seed).standard_normal((num, *latent_shape), dtype=np.float32)


def save_npy(path: Path, a: np.ndarray) -> Path:
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        np.save(f, a)
    return Path(path)


def load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(what, "a readable .npy file", f"{path}: {e}")


def sampler_for(engines: Engines, steps: int | None = None, cfg: float | None = None) -> SamplerConfig:
    """The manifest's sampler settings with the command's overrides."""
    s = engines.config.sampler
    changes = {k: v for k, v in (("num_steps", steps), ("guidance", cfg)) if v is not None}
    return dataclasses.replace(s, **changes)


# ------------------------------------------------------------------------------------------------- schedules


def template_settings(engines: Engines, sampler: SamplerConfig, seed: int) -> dict:
    """What a DP schedule depends on besides N and K; a stored schedule is reused only if these match."""
    return {"sampler": dataclasses.asdict(sampler), "template": {"samples": TEMPLATE_SAMPLES, "seed": seed},
            "model": {"name": engines.config.name, "sha256": engines.manifest.source.get("sha256")}}


def _same_settings(stored: dict, wanted: dict) -> bool:
    return json.loads(json.dumps({k: stored.get(k) for k in wanted})) == json.loads(json.dumps(wanted))


def compute_schedule(engines: Engines, sampler: SamplerConfig, recompute: int, *, seed: int = TEMPLATE_SEED,
                     progress=None) -> tuple[dict, np.ndarray]:
    """Template trajectory on the engines -> similarity (N, N) float64 -> DP. Returns (schedule record, sim)."""
    n, m = sampler.num_steps, engines.config.model
    if not 1 <= recompute <= n:
        raise InputError("--recompute K", f"1 <= K <= --steps = {n}", recompute)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((TEMPLATE_SAMPLES, *m.latent_shape), dtype=np.float32)
    labels = rng.integers(0, m.num_classes, TEMPLATE_SAMPLES, dtype=np.int64)
    sim = similarity(record_states(engines, noise, labels, sampler, progress=progress))  # (N, N) float64
    steps, cost = solve_dp(sim, recompute)
    rate = math.ceil(n / recompute)  # the sparsest uniform schedule with no more steps than the DP's
    base = uniform_steps(n, rate)
    uniform = {"rate": rate, "recompute": len(base), "cost": schedule_cost(sim, base)}
    record = schedule_record(steps, n, method="dp", cost=cost, uniform=uniform,
                             **template_settings(engines, sampler, seed))
    return record, sim


def model_label(engines: Engines) -> str:
    weights = engines.manifest.source.get("weights")
    return engines.config.name + (" (random weights)" if weights == "random" else "")


def store_schedule(out_dir: Path, record: dict, sim: np.ndarray, name: str = "") -> dict[str, Path]:
    """similarity-N.npy, schedule-N-K.json and schedule-N-K.png in `out_dir`."""
    n, k, out = record["num_steps"], record["recompute"], Path(out_dir)
    paths = {"similarity": save_npy(out / f"similarity-{n}.npy", sim),
             "json": write_schedule(out / f"schedule-{n}-{k}.json", record)}
    paths["png"] = plot_heatmap(sim, record["recompute_steps"], out / f"schedule-{n}-{k}.png",
                                f"{name}: 1 - cos sim of encoder states, N={n}, K={k}")
    return paths


def schedule_from_similarity(sim_path: Path, recompute: int, out: Path) -> tuple[dict, dict[str, Path]]:
    """Solve the DP from a saved similarity matrix; writes `out` (.json) and the heatmap beside it."""
    sim = load_npy(sim_path, "--from-similarity")
    steps, cost = solve_dp(sim, recompute)
    record = schedule_record(steps, int(sim.shape[0]), method="dp", cost=cost, similarity=str(sim_path))
    out = Path(out)
    return record, {"json": write_schedule(out, record), "png": plot_heatmap(sim, steps, out.with_suffix(".png"))}


def default_schedule(sampler: SamplerConfig) -> str:
    """The schedule with no --schedule: `all`, or uniform:R for a sampler with state_refresh_rate R (the official)."""
    return "all" if sampler.state_refresh_rate == 1 else f"uniform:{sampler.state_refresh_rate}"


def resolve_schedule(spec: str | None, engines: Engines, sampler: SamplerConfig, say: Say = print,
                     progress=None) -> tuple[list[int], str]:
    """Recompute steps for a --schedule spec (default: `default_schedule`); dp:K needs the engines."""
    if spec is None:
        spec = default_schedule(sampler)
    parsed = parse_spec(spec)
    if parsed.kind != "dp":
        return steps_for(parsed, sampler.num_steps), spec
    n, k = sampler.num_steps, parsed.value
    if k > n:
        raise InputError("--schedule dp:K", f"K <= {n} steps", k)
    stored = engines.folder / f"schedule-{n}-{k}.json"
    wanted = {key: v for key, v in template_settings(engines, sampler, TEMPLATE_SEED).items() if key != "template"}
    if stored.is_file():
        try:
            rec, why = json.loads(stored.read_text()), "was computed under other sampler settings or weights"
        except (OSError, json.JSONDecodeError) as e:
            rec, why = {}, f"is unreadable ({e})"
        if _same_settings(rec, wanted) and "recompute_steps" in rec:  # same settings: same num_steps
            say(f"schedule dp:{k}: using {stored}")
            return validate_steps(rec["recompute_steps"], n, str(stored)), spec
        say(f"schedule dp:{k}: {stored} {why}; recomputing")
    say(f"schedule dp:{k}: no stored schedule for these settings; running the {TEMPLATE_SAMPLES}-sample template "
        f"trajectory ({n} steps) and the DP")
    rec, sim = compute_schedule(engines, sampler, k, progress=progress)
    try:
        say(f"saved {store_schedule(engines.folder, rec, sim, model_label(engines))['json']}")
    except OSError as e:  # a read-only engine folder: use the schedule for this run only
        say(f"could not store the schedule in {engines.folder} ({e}); using it for this run only")
    return rec["recompute_steps"], spec


# ------------------------------------------------------------------------------------------------- images


def tile(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """(n, H, W, C) uint8 -> one (rows * (H + pad) + pad, cols * (W + pad) + pad, C) image: rows of `cols`,
    `pad` black pixels around each image; cells past n stay black."""
    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
    return grid


def save_png(img: np.ndarray, path: Path, min_side: int = 0) -> Path:
    """(H, W, C) uint8 -> PNG, written atomically: 1 or 2 channels as grayscale (the first), else the first 3 as
    RGB; upscaled (nearest, by an integer factor) to at least `min_side` pixels wide."""
    from PIL import Image

    im = (Image.fromarray(img[..., 0], mode="L") if img.shape[-1] < 3
          else Image.fromarray(np.ascontiguousarray(img[..., :3]), mode="RGB"))
    zoom = max(1, -(-min_side // im.width))  # ceil
    if zoom > 1:
        im = im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)
    with atomic_path(Path(path)) as tmp:
        im.save(tmp, format="PNG")
    return Path(path)


def write_images(images: np.ndarray, labels: np.ndarray, out_dir: Path, say: Say = print) -> tuple[list[Path], Path]:
    """One PNG per sample (native resolution, for FID) in out_dir and preview/grid.png (upscaled when tiny).

    The grid goes one folder down so that out_dir holds the samples and nothing else: `ddt-export fid out_dir`
    reads every image there. Samples an earlier run left there (files named as this function names them) are
    removed, so that the folder holds this run's samples only; other files are left alone."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    u8 = to_uint8(images).transpose(0, 2, 3, 1)  # (B, H, W, C)
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
             progress=None, say: Say = print) -> GenerateResult:
    engines = load_engines(engines_dir, backend)
    m = engines.config.model
    if num is not None and num < 1:
        raise InputError("--num", ">= 1", num)
    if noise_file is not None:
        noise = load_npy(noise_file, "--noise")
        if num is not None and noise.ndim == 4 and noise.shape[0] != num:
            raise InputError("--noise", f"{num} samples (--num)", noise.shape[0])
        num = noise.shape[0] if noise.ndim == 4 else num
    labels = make_labels(m.num_classes, classes, labels_file, num)
    if noise_file is None:
        noise = make_noise(seed, labels.shape[0], m.latent_shape)
    sampler = sampler_for(engines, steps, cfg)
    recompute, spec = resolve_schedule(schedule, engines, sampler, say)
    plan = plan_steps(sampler, recompute, cond_only_outside)
    rows = work_rows(plan, labels.shape[0])
    latents = sample(engines, noise, labels, sampler, recompute, progress=progress,
                     cond_only_outside=cond_only_outside, rng=np.random.default_rng(seed + 1))
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
    return GenerateResult(latents, labels, recompute, spec, sampler, rows, saved, images, grid, engines.backend_name)
