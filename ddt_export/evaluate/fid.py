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

Feature extractors (`evaluate.features`) take **uint8 NHWC images in [0, 255]** (the format of ADM batches and
of image files; channels 1 or 3) and return float64 features (N, d). Sampler output (float NCHW in [-1, 1])
goes through `core.images.images_from_samples` first, which quantizes as the official `fp2uint8` does.
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..core.artifacts import atomic_path
from ..core.errors import ArtifactError, ConfigError, InputError, NumericsError
from .features import DEFAULT_BATCH, FEATURES, FeatureExtractor, make_extractor

FID_EPS = 1e-6  # diagonal offset added to both sigmas when sqrtm(sigma1 sigma2) is not finite
IMAG_ATOL = 1e-3  # largest |imag| on sqrtm's diagonal dropped as rounding (pytorch-fid, ADM)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# FID's bias grows like d / n (the covariance of d-d features estimated from n samples): below this many samples
# per dimension (320 for the 64-d digits features, 10240 for Inception's 2048) `fid` warns that the number means
# little. validate's default (500 digits samples) is above it.
MIN_SAMPLES_PER_DIM = 5


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


# --------------------------------------------------------------------------------------- paired deltas


@dataclass(frozen=True)
class FidProbe:
    """FID(P, D) - FID(R, D) predicted from a few images of P paired with R's (image i of P made from R's noise i),
    R the reference sample set with statistics `ref`, D the data. With dm and dS the differences of the paired
    images' means and covariances (what both sets share cancels in them):

    - `linear`: 2 (mu_R - mu_D).dm + |dm|^2 + <G, dS>: the mean term exact, the trace term
      Tr(S + S_D - 2 (S^1/2 S_D S^1/2)^1/2) to first order, G = I - Sd^1/2 (Sd^1/2 S_R Sd^1/2)^-1/2 Sd^1/2 its
      gradient at S_R (d Tr(M^1/2) = Tr(M^-1/2 dM) / 2). Unbiased for small changes, low for large ones (it
      misses FID's curvature);
    - `plugin`: FID(mu_R + dm, S_R + dS; D) - FID(R, D), exact on the whole set, high on a few images (dS carries
      their sampling noise into the curvature);
    - `predict`: their mean, what `tune` ranks by: on the digits model it tracks the measured |dFID| of 56 plans
      (500 samples) from 64 images with Spearman 0.97 (the linear alone 0.86, the plug-in 0.89, the final-latent
      error 0.61; benchmarks/fast_sampling).
    Eigenvalues below `floor` times the largest are floored (fewer images than features)."""

    ref: Stats
    data: Stats
    g: np.ndarray  # (d, d)

    def _diffs(self, ref_features: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, p = np.asarray(ref_features, np.float64), np.asarray(features, np.float64)
        if r.shape != p.shape or r.ndim != 2 or len(r) < 2 or r.shape[1] != self.ref.dim:
            raise InputError("paired features", f"two (n, {self.ref.dim}) arrays, n >= 2", f"{r.shape}, {p.shape}")
        return p.mean(axis=0) - r.mean(axis=0), np.cov(p, rowvar=False) - np.cov(r, rowvar=False)

    def linear(self, ref_features: np.ndarray, features: np.ndarray) -> float:
        dm, ds = self._diffs(ref_features, features)
        return float(2.0 * (self.ref.mu - self.data.mu) @ dm + dm @ dm + np.sum(self.g * ds))

    def plugin(self, ref_features: np.ndarray, features: np.ndarray) -> float:
        dm, ds = self._diffs(ref_features, features)
        sigma = _sym_power(self.ref.sigma + ds, 1.0, 0.0)  # a PSD covariance: negative eigenvalues to 0
        return frechet_distance(self.ref.mu + dm, sigma, self.data.mu, self.data.sigma) - fid(self.ref, self.data)

    def predict(self, ref_features: np.ndarray, features: np.ndarray) -> float:
        return 0.5 * (self.linear(ref_features, features) + self.plugin(ref_features, features))


def _sym_power(a: np.ndarray, power: float, floor: float) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    w = np.maximum(w, floor * max(w.max(), 0.0) + (np.finfo(np.float64).tiny if power < 0 else 0.0))
    return (v * w ** power) @ v.T


def fid_probe(ref: Stats, data: Stats, floor: float = 1e-10) -> FidProbe:
    """The `FidProbe` of FID against `data` around the reference statistics `ref` (same features)."""
    if ref.dim != data.dim:
        raise InputError("FID statistics", f"the same dimension on both sides ({ref.dim})", data.dim)
    sd = _sym_power(data.sigma, 0.5, floor)
    m_inv_sqrt = _sym_power(sd @ ref.sigma @ sd, -0.5, floor)
    return FidProbe(ref, data, np.eye(ref.dim) - sd @ m_inv_sqrt @ sd)


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
    from PIL import Image, UnidentifiedImageError

    files = image_files(folder)
    mode, size = None, None
    for start in range(0, len(files), batch):
        out = []
        for p in files[start:start + batch]:
            try:
                im = Image.open(p)
                im.load()
            except (OSError, UnidentifiedImageError, SyntaxError) as e:  # not an image, truncated, corrupt
                raise InputError(f"image {p}", "a readable image file", f"{type(e).__name__}: {e}") from None
            with im:
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

    def compares(self) -> str:
        """What the number is, in one line."""
        return (f"FID compares Gaussian fits (mean and covariance of {self.a.dim}-d {self.features} features) of "
                f"{self.a.source} and {self.b.source}: 0 for equal fits, larger is farther; it compares only with "
                f"FIDs of the same features at the same sample counts")

    def warning(self) -> str | None:
        """Set when a side's sample count is too small for the number to mean much (`MIN_SAMPLES_PER_DIM`)."""
        small = [s for s in (self.a, self.b) if s.n is not None and s.n < MIN_SAMPLES_PER_DIM * s.dim]
        if not small:
            return None
        s = min(small, key=lambda x: x.n)
        singular = f"; with n <= {s.dim} the covariance is singular" if s.n <= s.dim else ""
        return (f"warning: FID of {s.n} samples ({s.source}) means little: below {MIN_SAMPLES_PER_DIM * s.dim} "
                f"({MIN_SAMPLES_PER_DIM} per feature dimension) its small-sample bias dominates{singular}; use "
                "thousands of samples (ADM: 50000) and the same count on both runs you compare")


def lazy_extractor(features: str, inception_onnx: Path | None, batch: int) -> Callable[[], FeatureExtractor]:
    """The options checked now; the extractor built on the first call only (statistics inputs never need it)."""
    if features not in FEATURES:
        raise ConfigError("--features", " | ".join(FEATURES), features)
    if batch < 1:
        raise ConfigError("--batch", ">= 1", batch)
    cache: list[FeatureExtractor] = []

    def get_extractor() -> FeatureExtractor:
        if not cache:
            cache.append(make_extractor(features, inception_onnx, batch))
        return cache[0]

    return get_extractor


def fid_from_paths(a: Path, b: Path, features: str = "digits", inception_onnx: Path | None = None,
                   batch: int = DEFAULT_BATCH, from_images: bool = False) -> FidResult:
    """FID between two inputs (each an .npz or an image folder); the extractor is built once, only if needed."""
    get_extractor = lazy_extractor(features, inception_onnx, batch)
    sa = load_stats(a, get_extractor, batch=batch, from_images=from_images)
    sb = load_stats(b, get_extractor, batch=batch, from_images=from_images)
    if sa.dim != sb.dim:
        raise InputError("FID statistics", f"the same dimension on both sides ({sa.describe()})", sb.describe(),
                         "stored statistics must come from the extractor chosen with --features")
    return FidResult(fid(sa, sb), sa, sb, features)
