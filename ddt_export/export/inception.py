"""The FID Inception-v3 of pytorch-fid, rebuilt without torchvision, and its export to ONNX. Torch: export only.

The FID number for ImageNet is defined by the TensorFlow graph `inception-2015-12-05` (pool_3, 2048-d).
pytorch-fid ported its weights to `pt_inception-2015-12-05-6726825d.pth`, a state dict of torchvision's
`Inception3(num_classes=1008, aux_logits=False)` with four patches that make it follow the TF graph:

- InceptionA / InceptionC / first InceptionE (Mixed_5b-d, 6b-e, 7b): the 3x3 average pool of the pool branch
  ignores the zero padding (`count_include_pad=False`, as TF's avg_pool does);
- second InceptionE (Mixed_7c): the pool branch is a 3x3 *max* pool (a quirk of the TF graph).

This module reimplements that network with the same attribute names, so the .pth loads one to one and strictly
(`load_fid_weights` checks every key and shape first and lists all mismatches in one `CheckpointError`).

Outputs of the exported graph: what ADM's evaluator takes from the TF graph, for its five numbers.
- `features` (N, 2048): pool_3, for FID, precision and recall.
- `spatial` (N, 2023): sFID's `mixed_6/conv:0`, first 7 channels, flattened. The TF graph names its eleven
  mixed blocks `mixed, mixed_1, ..., mixed_10` in order; torchvision's are Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e,
  7a, 7b, 7c, so `mixed_6` is **Mixed_6d**; inside a block, TF's `conv` is the 1x1 branch (the towers are
  `tower/conv*`, `tower_1/conv*`, `tower_2/conv`) and the op named `conv` is the ReLU after its batch norm, so
  `mixed_6/conv:0` is `Mixed_6d.branch1x1`'s output, (N, 192, 17, 17). The weight-conversion table of
  torch-fidelity (`utils/util_convert_inception_weights.py`) maps `mixed_6/conv/conv2d_params` to
  `Mixed_6d.branch1x1.conv` the same way. ADM slices `[..., :7]` of the NHWC tensor and flattens it, so the
  graph takes channels 0..6 and flattens in (h, w, c) order, to match the layout of the stored `mu_s`/`sigma_s`.
- `logits` (N, 1008): pool_3 @ fc.weight.T, **without** fc.bias, over all 1008 classes. That is what ADM's IS
  (and openai/improved-gan's before it) takes the softmax of: the weight matrix of `softmax/logits/MatMul`
  applied to pool_3, the bias add and the class subset left out. torch-fidelity calls it `logits_unbiased`.

Input convention (pytorch-fid's): `image` float32 (N, 3, H, W) RGB in [0, 1], any H and W. The graph resizes
it to 299x299, bilinear, `align_corners=False`, without antialiasing (PyTorch `F.interpolate`; exported as ONNX
Resize, half-pixel) and then scales it to [-1, 1] with `2x - 1`. Both happen *inside* the ONNX graph, so the
host only divides uint8 by 255.

How this differs from the ADM evaluator (guided-diffusion `evaluations/evaluator.py`, which made the reference
batches and their `mu`/`sigma`): ADM feeds float images in [0, 255] to the TF graph at its `ExpandDims:0`
tensor, and the graph's own preprocessing does the rest: TF1 `ResizeBilinear` to 299 (legacy coordinates,
`align_corners=False` and no half-pixel centres, so the image shifts by up to half a pixel and the last rows
and columns are sampled differently) and `(x - 128) / 128` (range [-1, 0.992], not [-1, 1]). The weights are
the same, so features and FID values are close to but not identical with ADM's (pytorch-fid's README quotes
0.08 absolute on an LSUN example; the gap is systematic, not noise). For numbers comparable to papers,
compute both sides with the same extractor (`ddt-export fid --from-images` recomputes the reference
statistics from the reference batch's `arr_0` images) and report which convention was used.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.artifacts import artifact_folder, library_versions, sha256_file
from ..core.errors import CheckpointError, NumericsError
from ..runtime.graphs import ort
from .checkpoint import check_state_dict

FID_SIZE = 299  # the TF graph's input resolution
FID_DIM = 2048  # pool_3 features
FID_CLASSES = 1008  # the TF graph's classifier width (1000 classes + 8 unused): the Inception Score's softmax
SPATIAL_CHANNELS = 7  # ADM's sFID: the first 7 channels of mixed_6/conv
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023 at 299x299
OUTPUTS = ("features", "spatial", "logits")
BN_EPS = 1e-3  # TF's batch norm epsilon, as in the ported weights
OFFICIAL_SHA256_PREFIX = "6726825d"  # torch-hub convention: the file name carries its sha256 prefix
ONNX_NAME = "inception_fid.onnx"
INFO_NAME = "inception_fid.json"
PARITY_TOL = 1e-4  # max |onnxruntime - float64 PyTorch| / max |float64 PyTorch| on the export check batch ...
PARITY_FP32_MARGIN = 4.0  # ... plus this many times PyTorch fp32's own error (see `onnx_parity`)


# --------------------------------------------------------------------------------------- blocks


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU; names `conv`, `bn` as in the checkpoint."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TF's 3x3 SAME average pool divides by the number of real (unpadded) inputs
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b, 5c, 5d at 35x35: 64 + 64 + 96 + pool_features channels
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35x288 -> 17x17x768 (384 + 96 + 288)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e at 17x17x768: factorized 7x7 convolutions, 4 x 192 channels
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        return self.forward_with_1x1(x)[0]

    def forward_with_1x1(self, x):
        """(block output N x 768 x h x w, its 1x1 branch N x 192 x h x w): TF's `mixed_k/conv` is that branch."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1), b1


class InceptionD(nn.Module):  # Mixed_7a: 17x17x768 -> 8x8x1280 (320 + 192 + 768)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b, 7c at 8x8: 320 + 768 + 768 + 192 = 2048 channels
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # Mixed_7c of the TF graph max-pools its pool branch; Mixed_7b averages
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)  # N x 768
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)  # N x 768
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


# --------------------------------------------------------------------------------------- model


class FIDInceptionV3(nn.Module):
    """image (N, 3, H, W) float32 RGB in [0, 1] -> pool_3 features (N, 2048). Attribute names = checkpoint keys."""

    def __init__(self, size: int = FID_SIZE):
        super().__init__()
        self.size = size  # the resize target; 299 for FID (tests may use a smaller one for speed)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FID_DIM, FID_CLASSES)  # unused: present so the checkpoint loads strictly

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_all(image)[0]

    def forward_all(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image (N, 3, H, W) in [0, 1] -> (pool_3 (N, 2048), spatial (N, 7 h w), logits (N, 1008)); see the
        module doc for what `spatial` and `logits` are (ADM's sFID and Inception Score inputs)."""
        x = F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1]                                    N x 3 x 299 x 299
        x = self.Conv2d_1a_3x3(x)  # N x 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)  # N x 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)  # N x 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # N x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)  # N x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)  # N x 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # N x 192 x 35 x 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # N x 288 x 35 x 35
        x = self.Mixed_6a(x)  # N x 768 x 17 x 17
        x, b1 = self.Mixed_6d.forward_with_1x1(self.Mixed_6c(self.Mixed_6b(x)))  # b1: N x 192 x 17 x 17
        x = self.Mixed_6e(x)  # N x 768 x 17 x 17
        x = self.Mixed_7a(x)  # N x 1280 x 8 x 8
        x = self.Mixed_7c(self.Mixed_7b(x))  # N x 2048 x 8 x 8
        pool = x.mean(dim=(2, 3))  # N x 2048 (pool_3)
        spatial = b1[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # N x 2023: 17 x 17 x 7, (h, w, c)
        logits = pool @ self.fc.weight.T  # N x 1008, no bias: ADM's softmax/logits/MatMul
        return pool, spatial, logits


# --------------------------------------------------------------------------------------- weights


def check_fid_state_dict(model: nn.Module, sd: dict, where: str) -> None:
    """Every key present with its shape, nothing extra; one `CheckpointError` listing all mismatches.

    `num_batches_tracked` buffers are optional (files saved before PyTorch 0.4.1 lack them; they are unused).
    """
    expected = model.state_dict()
    check_state_dict(expected, sd, where, "the keys and shapes of pytorch-fid's pt_inception-2015-12-05-6726825d.pth",
                     optional={k for k in expected if k.endswith("num_batches_tracked")})


def load_fid_weights(model: FIDInceptionV3, path: Path) -> dict:
    """Load pytorch-fid's .pth strictly (safe unpickling: tensors only). Returns {"path", "sha256", "official"}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("--weights", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth", f"no file {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or non-tensor pickle
        raise CheckpointError(str(path), "a PyTorch state dict of tensors", f"{type(e).__name__}: {e}")
    if not isinstance(sd, dict):
        raise CheckpointError(str(path), "a state dict (dict of tensors)", type(sd).__name__)
    check_fid_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=False)  # strictness already checked, num_batches_tracked aside
    digest = sha256_file(path)
    return {"path": str(path), "sha256": digest, "official": digest.startswith(OFFICIAL_SHA256_PREFIX)}


# --------------------------------------------------------------------------------------- export


class _AllOutputs(nn.Module):
    """The exported module: image -> (features, spatial, logits), the graph's three outputs."""

    def __init__(self, model: FIDInceptionV3):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model.forward_all(image)


def export_onnx(model: FIDInceptionV3, path: Path, opset: int = 18) -> None:
    """Write `model` as ONNX: input `image` (N, 3, H, W) float32 in [0, 1]; outputs `features` (N, 2048),
    `spatial` (N, 2023) and `logits` (N, 1008) (see the module doc).

    Batch, height and width are dynamic; the 299x299 resize is inside the graph.
    """
    model = model.eval()
    example = torch.rand(2, 3, 64, 64)
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=16),
            3: torch.export.Dim("width", min=16)}
    from .graphs import quiet_exporter

    with torch.no_grad(), quiet_exporter():
        torch.onnx.export(_AllOutputs(model), (example,), str(path), input_names=["image"],
                          output_names=list(OUTPUTS), opset_version=opset, dynamo=True, external_data=False,
                          verbose=False, dynamic_shapes={"image": dims})


def onnx_parity(model: FIDInceptionV3, onnx_path: Path, images: np.ndarray) -> dict:
    """Errors of the ONNX graph (onnxruntime, CPU) and of PyTorch fp32 itself against PyTorch in float64.

    images: (N, 3, H, W) float32 in [0, 1]. Each error is max |x - ref| / max |ref| of one output; `onnx` and
    `torch_fp32` are the largest over the outputs the graph has (`outputs`: each one's). Comparing against
    float64 separates a wrong graph from fp32 rounding, which a deep ReLU network with random weights
    amplifies to ~1e-4 relative (torch fp32 and onnxruntime then differ by that much, each equally right).
    """
    model = model.eval()
    x = torch.from_numpy(images)
    with torch.no_grad():
        refs = [t.numpy() for t in copy.deepcopy(model).double().forward_all(x.double())]  # float64
        fp32s = [t.numpy() for t in model.forward_all(x)]
    sess = ort.session(onnx_path)
    names = [o.name for o in sess.get_outputs() if o.name in OUTPUTS]
    outs = dict(zip(names, sess.run(names, {"image": images})))
    per = {}
    for name, ref, fp32 in zip(OUTPUTS, refs, fp32s):
        if name not in outs:
            continue
        if outs[name].shape != ref.shape:
            raise NumericsError(f"{onnx_path}: {name} shape", ref.shape, outs[name].shape)
        scale = max(float(np.abs(ref).max()), 1e-12)
        per[name] = {"dim": ref.shape[1], "onnx": float(np.abs(outs[name] - ref).max() / scale),
                     "torch_fp32": float(np.abs(fp32 - ref).max() / scale)}
    return {"onnx": max(v["onnx"] for v in per.values()),
            "torch_fp32": max(v["torch_fp32"] for v in per.values()), "outputs": per}


def parity_tolerance(report: dict) -> float:
    """The ONNX graph may be as far from float64 as PyTorch fp32 is (times a margin), plus PARITY_TOL."""
    return PARITY_TOL + PARITY_FP32_MARGIN * report["torch_fp32"]


def export_inception(weights: Path | None, out: Path, model: FIDInceptionV3 | None = None) -> Path:
    """Load pytorch-fid's .pth (or take a ready `model`), export `out/inception_fid.onnx`, check it, atomically.

    The graph is written in a scratch folder, checked against PyTorch (`onnx_parity`) on 2 images of odd size
    (the resize path), then renamed into `out`; `inception_fid.json` (source sha256, conventions, parity) last.
    """
    out = Path(out)
    if model is None:
        model = FIDInceptionV3()
        source = load_fid_weights(model, weights)
    else:
        source = {"path": None, "sha256": None, "official": False}
    rng = np.random.default_rng(0)
    check = rng.random((2, 3, 64, 80), dtype=np.float32)  # small and non-square: exercises the resize
    with artifact_folder(out, manifest=INFO_NAME) as staging:  # inception_fid.json is its manifest: last
        path = staging.path(ONNX_NAME)
        export_onnx(model, path)
        rep = onnx_parity(model, path, check)
        tol = parity_tolerance(rep)
        if not rep["onnx"] <= tol:
            raise NumericsError(f"{ONNX_NAME} vs PyTorch float64 (max rel err)", f"<= {tol:.2e}",
                                f"{rep['onnx']:.2e}", f"PyTorch fp32 itself: {rep['torch_fp32']:.2e}")
        staging.record = {
            "graph": ONNX_NAME, "sha256": staging.install(ONNX_NAME), "source": source,
            "input": {"name": "image", "dtype": "float32", "shape": ["N", 3, "H", "W"], "range": [0, 1],
                      "layout": "RGB"},
            "output": {"name": "features", "dtype": "float32", "shape": ["N", FID_DIM]},
            "outputs": {"features": {"shape": ["N", FID_DIM], "what": "pool_3 (FID, precision, recall)"},
                        "spatial": {"shape": ["N", rep["outputs"]["spatial"]["dim"]],
                                    "what": "mixed_6/conv = Mixed_6d.branch1x1, channels 0..6, (h, w, c) (sFID)"},
                        "logits": {"shape": ["N", FID_CLASSES],
                                   "what": "pool_3 @ fc.weight.T, no bias (Inception Score, as ADM)"}},
            "preprocessing": "in graph: bilinear resize to 299 (align_corners=False, no antialias), then 2x-1 "
                             "(pytorch-fid convention; not the ADM TF graph's resize and (x-128)/128)",
            "parity": {"max_rel_err": rep["onnx"], "torch_fp32_max_rel_err": rep["torch_fp32"], "tol": tol,
                       "outputs": rep["outputs"]},
            "versions": library_versions(),
        }  # a folder whose json names another sha256 is refused by `evaluate.features.InceptionFeatures`
    return out / ONNX_NAME
