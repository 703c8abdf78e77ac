"""FID: the Frechet distance between Gaussian fits of image features, statistics loaders, feature extractors.

Torch-free (numpy, scipy, onnxruntime, pillow): it runs on the production install.

    FID = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))

computed in float64 with `scipy.linalg.sqrtm` exactly as pytorch-fid and the ADM evaluator do (eps * I added to
both sigmas when the product's square root is not finite; a small imaginary part dropped, a large one an error).

Statistics (`load_stats`) come from
- an ADM-style .npz: `mu` (d,) and `sigma` (d, d), used as stored; otherwise `arr_0` uint8 images (N, H, W, C),
  streamed from the archive in batches (ADM sample batches of 50k images do not fit a small machine). ADM's
  reference batches (`VIRTUAL_imagenet256_labeled.npz`) hold both: the stored `mu`/`sigma` are used unless
  `from_images`, which recomputes them from `arr_0` with our extractor (same convention on both sides);
- a folder of images (.png, also .jpg/.jpeg/.bmp/.webp), sorted by name, all one size; subfolders are not read
  (`ddt-export generate` puts its preview grid in one).

Feature extractors implement `FeatureExtractor`: `extract(images)` takes **uint8 NHWC images in [0, 255]** (the
format of ADM batches and of image files; channels 1 or 3) and returns float64 features (N, d).
`DigitsFeatures` runs the bundled `assets/digits_features.onnx` (16x16 grayscale digits, 64-d);
`InceptionFeatures` runs `inception_fid.onnx` from `ddt-export fid-inception` (pytorch-fid's convention, see
`ddt_export.inception` for how it differs from ADM's TensorFlow graph). Sampler output (float NCHW in [-1, 1])
goes through `images_from_samples` first, which quantizes as the official `fp2uint8` does.
"""
from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from .errors import ArtifactError, ConfigError, InputError, NumericsError
from .manifest import atomic_path, sha256_file
from .sampling import to_uint8

FID_EPS = 1e-6  # diagonal offset added to both sigmas when sqrtm(sigma1 sigma2) is not finite
IMAG_ATOL = 1e-3  # largest |imag| on sqrtm's diagonal dropped as rounding (pytorch-fid, ADM)
ASSETS = Path(__file__).resolve().parent / "assets"
DIGITS_ONNX = ASSETS / "digits_features.onnx"
DIGITS_STATS = ASSETS / "digits_stats.npz"
DIGITS_SIZE = 16
INCEPTION_DIM = 2048
FEATURES = ("digits", "inception")
DEFAULT_BATCH = 50
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's convert("L")


# --------------------------------------------------------------------------------------- distance


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FID_EPS) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): mu (d,), sigma (d, d); float64 throughout."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise InputError("FID statistics", "mu (d,) and sigma (d, d) of one d on both sides",
                         f"mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}",
                         "both sides must come from the same feature extractor")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)  # product might be almost singular
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm(sigma1 sigma2) not finite; adding {eps} to the diagonal of both sigmas")
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding gives a slight imaginary component
        imag = np.abs(np.diagonal(covmean).imag).max()
        if not imag <= IMAG_ATOL:
            raise NumericsError("sqrtm(sigma1 sigma2)", f"real up to |imag| <= {IMAG_ATOL} on its diagonal",
                                f"|imag| {imag:.3g} (max over the matrix {np.abs(covmean.imag).max():.3g})",
                                "are both sigmas covariance matrices (symmetric, positive semi-definite)?")
        covmean = covmean.real
    if not np.isfinite(covmean).all():
        raise NumericsError("sqrtm(sigma1 sigma2)", "finite values", "inf/nan even after the eps offset")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    from scipy import linalg

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular product: handled by the caller
        return linalg.sqrtm(a)


# --------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stats:
    """Gaussian fit of features: mu (d,) and sigma (d, d) float64; n images behind them (None: as stored)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    source: str = ""

    def __post_init__(self):
        mu, sigma = np.asarray(self.mu, np.float64), np.asarray(self.sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ArtifactError(f"FID statistics {self.source}", "mu (d,) and sigma (d, d)",
                                f"mu {mu.shape}, sigma {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise NumericsError(f"FID statistics {self.source}", "finite mu and sigma", "inf/nan")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def save(self, path: Path) -> Path:
        """An ADM-style .npz with `mu` and `sigma`, written atomically."""
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma)
        return Path(path)

    def describe(self) -> str:
        what = "stored mu/sigma" if self.n is None else f"{self.n} images"
        return f"{self.source}: {what}, {self.dim}-d"


def fid(a: Stats, b: Stats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def stats_from_features(features: np.ndarray, source: str = "") -> Stats:
    """features (N, d) -> Stats with the mean and the unbiased covariance (np.cov), as pytorch-fid and ADM."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise InputError(f"features of {source or 'the images'}", "(N, d) with N >= 2 images", f.shape)
    return Stats(f.mean(axis=0), np.cov(f, rowvar=False), n=f.shape[0], source=source)


# --------------------------------------------------------------------------------------- feature extractors


class FeatureExtractor(Protocol):
    name: str

    def extract(self, images: np.ndarray) -> np.ndarray:
        """images (N, H, W, C) uint8 in [0, 255], C in {1, 3} -> features (N, d) float64."""
        ...


def check_images(images: np.ndarray, where: str = "images") -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) with C in {1, 3, 4} -> (N, H, W, C) with C in {1, 3} (alpha dropped)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InputError(where, "uint8 images in [0, 255]", images.dtype,
                         "convert sampler output with fid.images_from_samples")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InputError(where, "(N, H, W, C) with C in 1, 3, 4 (NHWC)", images.shape)
    return images[..., :3]


def images_from_samples(x: np.ndarray) -> np.ndarray:
    """Sampler output (N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8, as the official fp2uint8 rounds."""
    return np.ascontiguousarray(to_uint8(x).transpose(0, 2, 3, 1))


def _providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OnnxFeatures:
    """An ONNX graph `image` -> `features` (N, d) under onnxruntime, run in batches. Subclasses preprocess."""

    name = "onnx"
    missing_hint = "a graph with input `image` and output `features`"  # what to do when the file is not there

    def __init__(self, path: Path, batch: int = DEFAULT_BATCH, dim: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.name} feature extractor", "an ONNX file", f"no file {self.path}",
                                self.missing_hint)
        if batch < 1:
            raise ConfigError("--batch", ">= 1", batch)
        self.batch = batch
        try:
            self.session = ort.InferenceSession(str(self.path), providers=_providers())
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise ArtifactError(str(self.path), "an ONNX graph onnxruntime can load", f"{type(e).__name__}: {e}")
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if "image" not in inputs or "features" not in outputs:
            raise ArtifactError(str(self.path), "input `image` and output `features`",
                                f"inputs {inputs}, outputs {list(outputs)}")
        self.dim = outputs["features"][1] if isinstance(outputs["features"][1], int) else None
        if dim is not None and self.dim not in (None, dim):
            raise ArtifactError(f"{self.path}: features", f"(N, {dim})", f"(N, {self.dim})")

    def preprocess(self, images: np.ndarray) -> np.ndarray:  # (n, H, W, C) uint8 -> the graph's float32 input
        raise NotImplementedError

    def extract(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images, f"images for the {self.name} features")
        out = [self.session.run(["features"], {"image": self.preprocess(images[i:i + self.batch])})[0]
               for i in range(0, len(images), self.batch)]
        feats = np.concatenate(out).astype(np.float64) if out else np.zeros((0, self.dim or 0))
        if not np.isfinite(feats).all():
            raise NumericsError(f"{self.name} features from {self.path}", "finite values", "inf/nan")
        return feats


class DigitsFeatures(OnnxFeatures):
    """The bundled digits extractor: (N, 16, 16, 1|3) uint8 -> (N, 64). Graph input (N, 1, 16, 16) in [-1, 1]."""

    name = "digits"
    missing_hint = "the bundled one is made by scripts/train_digits_features.py"

    def __init__(self, path: Path | None = None, batch: int = DEFAULT_BATCH):
        super().__init__(DIGITS_ONNX if path is None else path, batch)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        n, h, w, c = images.shape
        if (h, w) != (DIGITS_SIZE, DIGITS_SIZE):
            raise InputError("images for the digits features", f"{DIGITS_SIZE}x{DIGITS_SIZE}", f"{h}x{w}",
                             "the digits extractor is for the bundled 16x16 model's samples")
        gray = images[..., 0] if c == 1 else np.rint(images.astype(np.float32) @ LUMA.astype(np.float32))
        x = gray.astype(np.float32) / 127.5 - 1.0  # the official uint82fp: (x - 127.5) / 127.5
        return np.ascontiguousarray(x[:, None])  # n x 1 x 16 x 16


class InceptionFeatures(OnnxFeatures):
    """FID Inception-v3 (pytorch-fid convention): (N, H, W, 1|3) uint8 RGB -> pool_3 (N, 2048).

    Graph input (N, 3, H, W) float32 in [0, 1]; the graph resizes to 299 and scales to [-1, 1] itself.
    A folder written by `ddt-export fid-inception` has `inception_fid.json` beside the graph: its sha256 must match.
    """

    name = "inception"
    missing_hint = "export it with `ddt-export fid-inception`"

    def __init__(self, path: Path, batch: int = DEFAULT_BATCH):
        path = Path(path)
        info = path.with_suffix(".json")
        if path.is_file() and info.is_file():
            try:
                recorded = json.loads(info.read_text()).get("sha256")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ArtifactError(str(info), "the JSON written by `ddt-export fid-inception`", repr(e))
            if recorded and recorded != sha256_file(path):
                raise ArtifactError(str(path), f"the graph recorded in {info.name} (sha256 {recorded[:12]})",
                                    "a different file", "export it again with `ddt-export fid-inception`")
        super().__init__(path, batch, dim=INCEPTION_DIM)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)  # grayscale -> RGB, as PIL's convert("RGB")
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0  # n x 3 x H x W


def make_extractor(features: str = "digits", inception_onnx: Path | None = None,
                   batch: int = DEFAULT_BATCH) -> FeatureExtractor:
    if features == "digits":
        return DigitsFeatures(batch=batch)
    if features == "inception":
        if inception_onnx is None:
            raise ConfigError("--inception-onnx", "inception_fid.onnx written by `ddt-export fid-inception`",
                              "nothing", "needed with --features inception")
        return InceptionFeatures(inception_onnx, batch=batch)
    raise ConfigError("--features", " | ".join(FEATURES), features)


# --------------------------------------------------------------------------------------- loaders


def iter_npz_images(path: Path, key: str = "arr_0", batch: int = DEFAULT_BATCH) -> Iterator[np.ndarray]:
    """Stream `key` (N, H, W, C) uint8 from an .npz in batches, without loading the whole array."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ArtifactError(str(path), "an .npz archive (np.savez)", f"{type(e).__name__}: {e}")
    with zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype != np.uint8 or len(shape) not in (3, 4) or fortran:
            raise ArtifactError(f"{path}: {key}", "uint8 images (N, H, W, C), C order",
                                f"{dtype} {shape}{' Fortran order' if fortran else ''}")
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            buf = f.read(n * per_image)
            if len(buf) != n * per_image:
                raise ArtifactError(f"{path}: {key}", f"{shape[0]} images", f"a truncated array at image {start}")
            yield np.frombuffer(buf, np.uint8).reshape((n, *shape[1:]))


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise InputError(f"image folder {folder}", f"image files ({', '.join(IMAGE_EXTENSIONS)})", "none")
    return files


def iter_folder_images(folder: Path, batch: int = DEFAULT_BATCH) -> Iterator[np.ndarray]:
    """Stream a folder's images, sorted by name, as (n, H, W, C) uint8: C = 1 if the first is grayscale, else 3."""
    from PIL import Image

    files = image_files(folder)
    mode, size = None, None
    for start in range(0, len(files), batch):
        out = []
        for p in files[start:start + batch]:
            with Image.open(p) as im:
                if mode is None:
                    mode, size = ("L" if im.mode in ("1", "L", "LA", "I", "I;16") else "RGB"), im.size
                if im.size != size:
                    raise InputError(f"image {p}", f"{size[0]}x{size[1]} like {files[0].name}",
                                     f"{im.size[0]}x{im.size[1]}")
                a = np.asarray(im.convert(mode), np.uint8)
            out.append(a[..., None] if a.ndim == 2 else a)
        yield np.stack(out)


def _stats_from_batches(batches: Iterator[np.ndarray], extractor: FeatureExtractor, source: str) -> Stats:
    feats = [extractor.extract(b) for b in batches]
    return stats_from_features(np.concatenate(feats), f"{source} ({extractor.name} features)")


def load_stats(path: Path, get_extractor: Callable[[], FeatureExtractor] | None = None, *,
               batch: int = DEFAULT_BATCH, from_images: bool = False) -> Stats:
    """Stats of an ADM-style .npz (mu/sigma, or arr_0 images) or a folder of images (see the module doc).

    `get_extractor` is called only when images must be featurized (so stored stats need no ONNX file).
    """
    path = Path(path)
    if path.is_dir():
        if get_extractor is None:
            raise ConfigError(str(path), "a feature extractor for a folder of images", "none")
        return _stats_from_batches(iter_folder_images(path, batch), get_extractor(), str(path))
    if not path.is_file() or path.suffix != ".npz":
        raise InputError("FID input", "an .npz (mu/sigma or arr_0 images) or a folder of images", str(path))
    try:
        with np.load(path) as z:
            keys = set(z.files)
            if {"mu", "sigma"} <= keys and not (from_images and "arr_0" in keys):
                return Stats(z["mu"], z["sigma"], source=str(path))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ArtifactError(str(path), "an .npz archive (np.savez)", f"{type(e).__name__}: {e}")
    if "arr_0" not in keys:
        raise ArtifactError(str(path), "an ADM-style .npz with `mu` and `sigma`, or `arr_0` uint8 images",
                            f"keys {sorted(keys)}")
    if get_extractor is None:
        raise ConfigError(str(path), "a feature extractor for its arr_0 images", "none")
    return _stats_from_batches(iter_npz_images(path, "arr_0", batch), get_extractor(), str(path))


@dataclass(frozen=True)
class FidResult:
    value: float
    a: Stats
    b: Stats
    features: str


def fid_from_paths(a: Path, b: Path, features: str = "digits", inception_onnx: Path | None = None,
                   batch: int = DEFAULT_BATCH, from_images: bool = False) -> FidResult:
    """FID between two inputs (each an .npz or an image folder); the extractor is built once, only if needed."""
    if features not in FEATURES:
        raise ConfigError("--features", " | ".join(FEATURES), features)
    if batch < 1:
        raise ConfigError("--batch", ">= 1", batch)
    cache: list[FeatureExtractor] = []

    def get_extractor() -> FeatureExtractor:
        if not cache:
            cache.append(make_extractor(features, inception_onnx, batch))
        return cache[0]

    sa = load_stats(a, get_extractor, batch=batch, from_images=from_images)
    sb = load_stats(b, get_extractor, batch=batch, from_images=from_images)
    if sa.dim != sb.dim:
        raise InputError("FID statistics", f"the same dimension on both sides ({sa.describe()})", sb.describe(),
                         "stored statistics must come from the extractor chosen with --features")
    return FidResult(fid(sa, sb), sa, sb, features)
