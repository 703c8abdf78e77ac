"""Train the "digits FID" feature extractor, export it to ONNX, and write the real digits' statistics.

    python scripts/train_digits_features.py                # train, export, write the statistics
    python scripts/train_digits_features.py --add-spatial  # how the bundled graph got `spatial` (no training)

A small CNN classifier on the same 16x16 digits as `train_digits.py` (same preprocessing), trained
deterministically on an 80/20 stratified split (held-out accuracy printed). The features are the globally
average-pooled activations of the last conv block (64-d, as Inception's pool3 for FID); the logits a Linear
on top (softmax of them: the Inception Score). The spatial features for sFID follow ADM's choice in Inception
(`mixed_6/conv`, its first 7 channels, flattened NHWC): the first 7 channels of the third conv's activations,
8x8 (halfway down, before the last pooling), flattened in (h, w, c) order: 448-d. SiLU, not ReLU: ReLU left dead
feature units, i.e. zero rows in the covariance.
`--add-spatial` adds the `spatial` output to an existing graph that lacks it (the bundled one was trained before
it existed, and training is not bit-reproducible across machines: a rerun here moved the features by up to 0.15),
by appending Slice -> Transpose -> Reshape to that conv's activation; `features` and `logits` are checked
bit-identical before and after on all 1797 digits, and so are the stored `mu`/`sigma`.
Writes, each via a temporary name:
  ddt_export/assets/digits_features.onnx  input `image` float32 (N, 1, 16, 16) in [-1, 1]; outputs `features`
                                          float32 (N, 64), `logits` float32 (N, 10), `spatial` float32 (N, 448)
  ddt_export/assets/digits_stats.npz      an ADM-style reference batch of all 1797 real digits: `mu` (64,),
                                          `sigma` (64, 64), `mu_s` (448,), `sigma_s` (448, 448) float64 computed
                                          with onnxruntime from that ONNX file on the float digits the model was
                                          trained on; `arr_0` (1797, 16, 16, 1) uint8 (the same digits rounded
                                          as samples are, for precision and recall), `arr_1` the labels
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
from ddt_export.core.images import images_from_samples  # noqa: E402
from ddt_export.runtime.graphs import ort as ddt_ort  # noqa: E402  (the one place sessions are made)

FEATURES_ONNX = "digits_features.onnx"
STATS_NPZ = "digits_stats.npz"
FEATURE_DIM = 64
NUM_CLASSES = 10
SPATIAL_CHANNELS = 7  # as ADM's sFID keeps the first 7 channels of Inception's mixed_6/conv
SPATIAL_AT = 7  # body[:7] ends with the third conv's SiLU: (N, 64, 8, 8)
OPSET = 18
PARITY_TOL = 1e-5
OUTPUTS = ("features", "logits", "spatial")


class DigitsCNN(nn.Module):
    """(N, 1, 16, 16) in [-1, 1] -> (features (N, 64), logits (N, 10), spatial (N, 448))."""

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
        h = self.body[:SPATIAL_AT](image)  # N 64 8 8
        f = self.body[SPATIAL_AT:](h).mean(dim=(2, 3))  # N 64: global average pool of N 64 4 4
        spatial = h[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # N 448 = 8 * 8 * 7, NHWC as ADM
        return f, self.head(self.dropout(f)), spatial


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
    from ddt_export.export.graphs import quiet_exporter

    with quiet_exporter():
        torch.onnx.export(model, (torch.zeros(2, 1, 16, 16),), str(path), input_names=["image"],
                          output_names=list(OUTPUTS), dynamic_shapes={"image": {0: batch}},
                          opset_version=OPSET, dynamo=True, external_data=False, optimize=True, verbose=False)


def onnx_features(path: Path, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """features, logits, spatial of images (N, 1, 16, 16) float32 from the ONNX file under onnxruntime."""
    sess = ddt_ort.session(path)
    return tuple(sess.run(list(OUTPUTS), {"image": images.astype(np.float32)}))


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = features.astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def add_spatial_output(src: Path, dst: Path) -> None:
    """Copy the ONNX graph `src` to `dst` with the output `spatial` added: the activation that feeds the second
    MaxPool (the third conv's SiLU, N x 64 x 8 x 8), channels 0..6, transposed to NHWC, flattened: (N, 448)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    if any(o.name == "spatial" for o in g.output):
        raise SystemExit(f"{src} already has a `spatial` output")
    pools = [n for n in g.node if n.op_type == "MaxPool"]
    if len(pools) != 2:
        raise SystemExit(f"{src}: expected the DigitsCNN graph with 2 MaxPool nodes, found {len(pools)}")
    act = pools[1].input[0]
    consts = {"spatial_starts": [0], "spatial_ends": [SPATIAL_CHANNELS], "spatial_axes": [1], "spatial_shape": [0, -1]}
    g.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items())
    g.node.extend([
        helper.make_node("Slice", [act, "spatial_starts", "spatial_ends", "spatial_axes"], ["spatial_nchw"]),
        helper.make_node("Transpose", ["spatial_nchw"], ["spatial_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["spatial_nhwc", "spatial_shape"], ["spatial"]),
    ])
    batch = g.output[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    g.output.append(helper.make_tensor_value_info("spatial", onnx.TensorProto.FLOAT,
                                                  [batch, SPATIAL_CHANNELS * 8 * 8]))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))


def write_stats(onnx_path: Path, stats_path: Path, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The reference batch of the real digits through the ONNX file as written (see the module doc)."""
    feats, _, spatial = onnx_features(onnx_path, images.numpy())
    (mu, sigma), (mu_s, sigma_s) = stats(feats), stats(spatial)
    arr_0 = images_from_samples(images.numpy())  # (1797, 16, 16, 1) uint8, rounded as samples are
    with atomic_path(stats_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=arr_0,
                                arr_1=labels.numpy())
    for name, s in (("sigma", sigma), ("sigma_s", sigma_s)):
        eig = np.linalg.eigvalsh(s)
        print(f"stats: {name} {s.shape}, eigenvalues [{eig.min():.2e}, {eig.max():.2e}]")
    return {"mu": mu, "sigma": sigma}


def add_spatial(out: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """--add-spatial: the graph in `out` gains `spatial`; features, logits and mu/sigma must not move a bit."""
    onnx_path, stats_path = out / FEATURES_ONNX, out / STATS_NPZ
    before = ddt_ort.session(onnx_path).run(
        ["features", "logits"], {"image": images.numpy()})
    with np.load(stats_path) as z:
        stored = {k: z[k] for k in ("mu", "sigma")}
    with atomic_path(onnx_path) as tmp:
        add_spatial_output(onnx_path, tmp)
        after = onnx_features(tmp, images.numpy())
        for name, b, a in zip(("features", "logits"), before, after):
            if not np.array_equal(a, b):
                raise SystemExit(f"{name} changed by adding `spatial`: max abs diff {np.abs(a - b).max():.2e}")
    new = write_stats(onnx_path, stats_path, images, labels)
    for k, v in stored.items():
        if not np.array_equal(new[k], v):
            raise SystemExit(f"{stats_path}: {k} moved by {np.abs(new[k] - v).max():.2e}; it must not")
    print("features and logits bit-identical on all 1797 digits; mu and sigma unchanged")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--add-spatial", action="store_true",
                   help="add `spatial` to the existing graph in --out and rewrite the statistics; no training")
    a = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    images, labels = load_digits_16()
    if a.add_spatial:
        add_spatial(a.out, images, labels)
        return 0
    tr, te = split(labels)
    t0 = time.time()
    model = train_cnn(images, labels, tr, epochs=a.epochs, seed=a.seed)
    print(f"trained in {time.time() - t0:.0f}s; accuracy train {accuracy(model, images[tr], labels[tr]):.4f}, "
          f"held-out {accuracy(model, images[te], labels[te]):.4f} ({len(te)} images)")

    onnx_path, stats_path = a.out / FEATURES_ONNX, a.out / STATS_NPZ
    with atomic_path(onnx_path) as tmp:
        export_onnx(model, tmp)
        got = onnx_features(tmp, images.numpy())
    with torch.no_grad():
        want = model(images)
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
    print(f"onnx vs torch on all {len(images)} images: max abs diff {diff:.2e} (tolerance {PARITY_TOL:.0e})")
    if not diff <= PARITY_TOL:
        raise SystemExit(f"ONNX parity failed: {diff:.2e} > {PARITY_TOL:.0e}")
    write_stats(onnx_path, stats_path, images, labels)  # from the file as written
    for path in (onnx_path, stats_path):
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
