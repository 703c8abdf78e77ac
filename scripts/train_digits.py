"""Train the bundled `ddt-tiny-digits` model on scikit-learn digits, deterministically, on CPU.

    python scripts/train_digits.py                       # train, save ddt_export/assets/ddt-tiny-digits.*, evaluate
    python scripts/train_digits.py --eval-only --guidance 1.5 --grid /tmp/digits_grid.png

Data: `sklearn.datasets.load_digits()` (1797 images, 8x8, values 0..16, 10 classes) divided by 16, upsampled
to 16x16 with bilinear `F.interpolate(align_corners=False)`, scaled to [-1, 1] (background -1, strokes bright).
Objective: the official FlowMatchingTrainer with lognorm_t and the linear scheduler
(stateful_flow_matching/training.py): t = sigmoid(randn), x_t = t*x + (1-t)*noise, target v = x - noise,
MSE on `model(x_t, t, y)[0]`; 10% of labels dropped to the null class for classifier-free guidance.
Init: the official `initialize_weights` (torch default Linear init, then xavier patch embedders with zero
bias, N(0, 0.02) label table and timestep MLP, zeroed final layer). Optimizer (ours, not the official
ImageNet recipe): AdamW lr 1e-3, 100 warm-up steps, cosine to 1e-4, grad-norm clip 1, batch 128, 800 steps;
EMA 0.999 with the usual (1+n)/(10+n) warm-up. The saved weights are the EMA ones, keys exactly as
`DDT.state_dict()` (the official names), fp32; the training record sits in the safetensors metadata.
Determinism: fixed seeds, one generator for all data randomness, `torch.use_deterministic_algorithms`, and
always 2 threads (CPU reductions may split differently with another thread count).
Quality check: an Euler ODE sampler as the official EulerSampler, and an independent classifier (an RBF SVC
on the real 16x16 pixels, held-out accuracy printed) that reads the class of every generated sample.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

# On a shared machine, spinning OpenMP workers stall each other (measured: > 7 s/step instead of 2.5 s/step
# with two other jobs running). Passive waiting does not change any result. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddt_export.core.config import PRESETS, Config, SamplerConfig  # noqa: E402
from ddt_export.core.artifacts import atomic_path  # noqa: E402
from ddt_export.export.model import DDT  # noqa: E402

NAME = "ddt-tiny-digits"
ASSETS = ROOT / "ddt_export" / "assets"
IMAGE_SIZE = 16  # the 8x8 digits upsampled 2x
DIGITS_MAX = 16.0  # load_digits pixel values are 0..16
NULL_P = 0.1  # label dropout to the null class (official BaseTrainer null_condition_p)
THREADS = 2


# --------------------------------------------------------------------------------------------- data


def load_digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 16, 16) float32 in [-1, 1] (background -1) and labels (N,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / DIGITS_MAX)[:, None]  # N 1 8 8 in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)  # N 1 16 16
    return (x * 2.0 - 1.0).contiguous(), torch.from_numpy(d.target.astype(np.int64))


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels per axis, filling with background (-1)."""
    if max_shift <= 0:
        return x
    B, _, H, W = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=-1.0)  # B 1 H+2m W+2m
    dy, dx = torch.randint(0, 2 * m + 1, (2, B), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])


# --------------------------------------------------------------------------------------------- model


def official_init(model: DDT) -> DDT:
    """The official DDT.initialize_weights on top of torch's default Linear init (uses the global RNG)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()  # what the official modules get at construction
    for emb in (model.x_embedder, model.s_embedder):
        nn.init.xavier_uniform_(emb.proj.weight)
        nn.init.zeros_(emb.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for lin in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):  # zero-out output layers
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    return model


def make_model(cfg: Config, seed: int) -> DDT:
    torch.manual_seed(seed)
    return official_init(DDT(cfg.model))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 800
    batch: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    max_shift: int = 0  # augmentation: random shifts of up to this many pixels
    seed: int = 0
    log_every: int = 50


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr to lr * min_lr_ratio."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def flow_matching_loss(model: DDT, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Official FlowMatchingTrainer, lognorm_t, linear scheduler, constant weight; labels already dropped."""
    B = x.shape[0]
    t = torch.randn(B, generator=g).sigmoid()  # B
    noise = torch.randn(x.shape, generator=g)
    tb = t.view(B, 1, 1, 1)
    x_t = tb * x + (1 - tb) * noise  # alpha = t, sigma = 1 - t
    v = x - noise  # dalpha * x + dsigma * noise
    out, _ = model(x_t, t, y)
    return (out - v).pow(2).mean()


def train(cfg: Config, images: torch.Tensor, labels: torch.Tensor, tc: TrainConfig, log=print):
    """Returns (ema state dict, [(step, mean loss over the last log_every steps)], {"wall": s, "cpu": s}).

    CPU seconds are this process's (all threads): with the machine shared, cpu / threads is the wall time
    the run would take alone."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, images, labels, tc, log)
    finally:  # a global switch: leave it as we found it (the tests call this in-process)
        torch.use_deterministic_algorithms(previous)


def _train(cfg: Config, images: torch.Tensor, labels: torch.Tensor, tc: TrainConfig, log):
    model = make_model(cfg, tc.seed)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.999), weight_decay=tc.weight_decay)
    g = torch.Generator().manual_seed(tc.seed + 1)  # data order, t, noise, label dropout, shifts
    null = cfg.model.null_class
    n = images.shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    history, running, t0, c0 = [], [], time.time(), time.process_time()
    for step in range(tc.steps):
        if pos + tc.batch > n:  # new epoch
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + tc.batch]
        pos += tc.batch
        x = random_shift(images[idx], tc.max_shift, g)
        y = labels[idx].clone()
        y[torch.rand(y.shape[0], generator=g) < NULL_P] = null
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        loss = flow_matching_loss(model, x, y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        decay = min(tc.ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early weights fade out fast
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        running.append(loss.item())
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            history.append((step + 1, float(np.mean(running))))
            log(f"step {step + 1:5d}/{tc.steps}  loss {history[-1][1]:.4f}  lr {lr_at(step, tc):.2e}  "
                f"{time.time() - t0:6.1f}s")
            running = []
    return ema, history, {"wall": time.time() - t0, "cpu": time.process_time() - c0}


# --------------------------------------------------------------------------------------------- sampling


def timesteps(sc: SamplerConfig) -> np.ndarray:
    """Official EulerSampler grid: linspace(0, 1 - last_step, N), then 1.0, then the timeshift map. float64."""
    t = np.concatenate([np.linspace(0.0, 1.0 - sc.last_step, sc.num_steps), [1.0]])
    t = t / (t + (1 - t) * sc.timeshift)
    assert t.shape == (sc.num_steps + 1,) and np.all(np.diff(t) > 0)
    return t


@torch.no_grad()
def sample(model: DDT, y: torch.Tensor, noise: torch.Tensor, sc: SamplerConfig, guidance: float | None = None):
    """Euler ODE with CFG on a [uncond; cond] batch, guidance only where lo < t < hi. Returns (B, C, H, W)."""
    w = sc.guidance if guidance is None else guidance
    lo, hi = sc.guidance_interval
    ts = timesteps(sc)
    B = y.shape[0]
    yy = torch.cat([torch.full_like(y, model.cfg.null_class), y])  # 2B: uncond first, as the official
    x = noise.float().clone()
    s = None
    for i in range(sc.num_steps):
        t_cur, dt = float(ts[i]), float(ts[i + 1] - ts[i])
        if i % sc.state_refresh_rate == 0:
            s = None
        out, s = model(torch.cat([x, x]), torch.full((2 * B,), t_cur), yy, s)
        v_u, v_c = out.chunk(2)
        scale = w if lo < t_cur < hi else 1.0
        x = x + (v_u + scale * (v_c - v_u)) * dt
    return x


# --------------------------------------------------------------------------------------------- evaluation


def fit_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0):
    """An RBF SVC on the real 16x16 pixels, 80/20 stratified split. Returns (classifier, held-out accuracy)."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    X, Y = images.reshape(len(images), -1).numpy(), labels.numpy()
    xa, xb, ya, yb = train_test_split(X, Y, test_size=0.2, stratify=Y, random_state=seed)
    clf = SVC(gamma="scale").fit(xa, ya)
    return clf, float((clf.predict(xb) == yb).mean())


def generate_per_class(model: DDT, sc: SamplerConfig, per_class: int, seed: int, guidance=None, chunk=250):
    """`per_class` samples of each class, noise from a fixed generator. Returns (images, labels)."""
    y = torch.arange(model.cfg.num_classes).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(y), *model.cfg.latent_shape), generator=g)
    xs = [sample(model, y[i:i + chunk], noise[i:i + chunk], sc, guidance) for i in range(0, len(y), chunk)]
    return torch.cat(xs), y


def save_grid(images: torch.Tensor, rows: int, path: Path, zoom: int = 4, gap: int = 1) -> None:
    """images (rows*cols, 1, H, W) in [-1, 1] -> a PNG, one class per row, cells parted by grey lines."""
    from PIL import Image

    n, _, H, W = images.shape
    cols = n // rows
    a = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    cells = np.pad(a.reshape(rows, cols, H, W), ((0, 0), (0, 0), (0, gap), (0, gap)), constant_values=96)
    grid = cells.transpose(0, 2, 1, 3).reshape(rows * (H + gap), cols * (W + gap))
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path)


def evaluate(model: DDT, sc: SamplerConfig, images, labels, per_class: int, guidance=None, grid=None, log=print):
    clf, held_out = fit_classifier(images, labels)
    log(f"independent classifier (RBF SVC on real 16x16 pixels): held-out accuracy {held_out:.4f}")
    t0 = time.time()
    x, y = generate_per_class(model, sc, per_class, seed=1234, guidance=guidance)
    pred = clf.predict(x.reshape(len(x), -1).clamp(-1, 1).numpy())
    rate = float((pred == y.numpy()).mean())
    per = [float((pred[y.numpy() == c] == c).mean()) for c in range(model.cfg.num_classes)]
    log(f"guidance {sc.guidance if guidance is None else guidance}: recognized as the requested class "
        f"{rate:.4f} of {len(y)} samples ({time.time() - t0:.0f}s); per class " + " ".join(f"{p:.2f}" for p in per))
    log(f"sample range [{x.min():.2f}, {x.max():.2f}], mean {x.mean():.3f} (real data mean {images.mean():.3f})")
    if grid:
        save_grid(x.reshape(model.cfg.num_classes, per_class, *x.shape[1:])[:, :10].reshape(-1, *x.shape[1:]),
                  model.cfg.num_classes, Path(grid))
        log(f"grid of samples (one class per row): {grid}")
    return rate, held_out


# --------------------------------------------------------------------------------------------- files


def save_assets(cfg: Config, ema: dict, out: Path, meta: dict) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    weights, config = out / f"{cfg.name}.safetensors", out / f"{cfg.name}.json"
    tensors = {k: v.detach().float().contiguous() for k, v in ema.items()}
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    with atomic_path(config) as tmp:
        tmp.write_text(cfg.to_json())
    return weights, config


def load_model(cfg: Config, path: Path) -> DDT:
    from safetensors.torch import load_file

    model = DDT(cfg.model)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def main(argv=None) -> int:
    tc0 = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(tc0, f.name)), default=getattr(tc0, f.name))
    p.add_argument("--out", type=Path, default=ASSETS, help="folder for <name>.safetensors and <name>.json")
    p.add_argument("--eval-only", action="store_true", help="evaluate the saved weights, do not train")
    p.add_argument("--per-class", type=int, default=50, help="generated samples per class for the check")
    p.add_argument("--guidance", type=float, nargs="*", default=None, help="CFG scales to evaluate (preset's)")
    p.add_argument("--grid", default="/tmp/ddt-tiny-digits-grid.png", help="PNG of samples ('' for none)")
    a = p.parse_args(argv)
    tc = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    torch.set_num_threads(THREADS)
    cfg = PRESETS[NAME]
    images, labels = load_digits_16()
    print(f"data: {tuple(images.shape)} in [{images.min():.0f}, {images.max():.0f}], {cfg.model}")
    if a.eval_only:
        model = load_model(cfg, a.out / f"{NAME}.safetensors")
    else:
        print(f"training: {tc}")
        ema, history, secs = train(cfg, images, labels, tc)
        print(f"training took {secs['wall']:.0f}s wall ({secs['wall'] / 60:.1f} min), {secs['cpu']:.0f}s CPU "
              f"on {torch.get_num_threads()} threads")
        meta = {"config": cfg.to_json(), "train": json.dumps(dataclasses.asdict(tc)),
                "train_wall_s": f"{secs['wall']:.0f}", "train_cpu_s": f"{secs['cpu']:.0f}",
                "final_loss": f"{history[-1][1]:.4f}", "torch": torch.__version__}
        for path in save_assets(cfg, ema, a.out, meta):
            print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
        model = DDT(cfg.model)
        model.load_state_dict(ema, strict=True)
        model.eval()
    for i, w in enumerate(a.guidance or [cfg.sampler.guidance]):
        evaluate(model, cfg.sampler, images, labels, a.per_class, guidance=w, grid=a.grid if i == 0 else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
