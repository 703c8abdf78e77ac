"""Train the "digits FID" feature extractor, export it to ONNX, and write the real digits' statistics.

    python scripts/train_digits_features.py

A small CNN classifier on the same 16x16 digits as `train_digits.py` (same preprocessing), trained
deterministically on an 80/20 stratified split (held-out accuracy printed). The features are the globally
average-pooled activations of the last conv block (64-d, as Inception's pool3 for FID); the logits a Linear
on top. SiLU, not ReLU: ReLU left dead feature units, i.e. zero rows in the covariance.
Writes, each via a temporary name:
  ddt_export/assets/digits_features.onnx  input `image` float32 (N, 1, 16, 16) in [-1, 1];
                                          outputs `features` float32 (N, 64), `logits` float32 (N, 10)
  ddt_export/assets/digits_stats.npz      `mu` (64,), `sigma` (64, 64) float64 of all 1797 real digits,
                                          computed with onnxruntime from that ONNX file
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import ASSETS, THREADS, load_digits_16, random_shift  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddt_export.core.artifacts import atomic_path  # noqa: E402

FEATURES_ONNX = "digits_features.onnx"
STATS_NPZ = "digits_stats.npz"
FEATURE_DIM = 64
NUM_CLASSES = 10
OPSET = 18
PARITY_TOL = 1e-5


class DigitsCNN(nn.Module):
    """(N, 1, 16, 16) in [-1, 1] -> (features (N, 64), logits (N, 10))."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * width, feature_dim, 3, padding=1), nn.SiLU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, image: torch.Tensor):
        f = self.body(image).mean(dim=(2, 3))  # N 64: global average pool
        return f, self.head(self.dropout(f))


def split(labels: torch.Tensor, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 80/20 stratified split (indices), the same as train_digits.fit_classifier's."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    a, b = train_test_split(idx, test_size=0.2, stratify=labels.numpy(), random_state=seed)
    return a, b


def train_cnn(images, labels, train_idx, epochs: int = 30, batch: int = 64, lr: float = 2e-3, seed: int = 0,
              max_shift: int = 1, log=print) -> DigitsCNN:
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    x_all, y_all = images[train_idx], labels[train_idx]
    steps = epochs * ((len(x_all) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for ep in range(epochs):
        perm, total = torch.randperm(len(x_all), generator=g), 0.0
        for i in range(0, len(x_all), batch):
            idx = perm[i:i + batch]
            x = random_shift(x_all[idx], max_shift, g)
            loss = F.cross_entropy(model(x)[1], y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (ep + 1) % 5 == 0:
            log(f"epoch {ep + 1:3d}/{epochs}  loss {total / len(x_all):.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitsCNN, images, labels) -> float:
    return float((model(images)[1].argmax(1) == labels).float().mean())


def export_onnx(model: DigitsCNN, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    from ddt_export.export.exporter import quiet_exporter

    with quiet_exporter():
        torch.onnx.export(model, (torch.zeros(2, 1, 16, 16),), str(path), input_names=["image"],
                          output_names=["features", "logits"], dynamic_shapes={"image": {0: batch}},
                          opset_version=OPSET, dynamo=True, external_data=False, optimize=True, verbose=False)


def onnx_features(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return tuple(sess.run(["features", "logits"], {"image": images.astype(np.float32)}))


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = features.astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ASSETS)
    a = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    images, labels = load_digits_16()
    tr, te = split(labels)
    t0 = time.time()
    model = train_cnn(images, labels, tr, epochs=a.epochs, seed=a.seed)
    print(f"trained in {time.time() - t0:.0f}s; accuracy train {accuracy(model, images[tr], labels[tr]):.4f}, "
          f"held-out {accuracy(model, images[te], labels[te]):.4f} ({len(te)} images)")

    onnx_path, stats_path = a.out / FEATURES_ONNX, a.out / STATS_NPZ
    with atomic_path(onnx_path) as tmp:
        export_onnx(model, tmp)
        feats, logits = onnx_features(tmp, images.numpy())
    with torch.no_grad():
        tf, tl = model(images)
    diff = max(np.abs(feats - tf.numpy()).max(), np.abs(logits - tl.numpy()).max())
    print(f"onnx vs torch on all {len(images)} images: max abs diff {diff:.2e} (tolerance {PARITY_TOL:.0e})")
    if not diff <= PARITY_TOL:
        raise SystemExit(f"ONNX parity failed: {diff:.2e} > {PARITY_TOL:.0e}")
    feats, _ = onnx_features(onnx_path, images.numpy())  # from the file as written
    mu, sigma = stats(feats)
    with atomic_path(stats_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
    eig = np.linalg.eigvalsh(sigma)
    print(f"stats: mu {mu.shape}, sigma {sigma.shape}, eigenvalues [{eig.min():.2e}, {eig.max():.2e}]")
    for path in (onnx_path, stats_path):
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
