"""ADM's evaluation suite over files: `ddt-export evaluate`, and validate's ADM section with its gates. Torch-free.

For a sample batch against a reference batch it computes ADM's five numbers (`evaluate.adm` defines them): the
Inception Score of the samples, FID, sFID, precision and recall (and, beside them, the reference's own IS).
Each side (`Batch`) is a folder of images or an ADM-style .npz, read as the ADM evaluator reads it:
- `mu`/`sigma` and `mu_s`/`sigma_s` stored in the .npz are used as they are for FID and sFID (ADM's reference
  batches, e.g. `VIRTUAL_imagenet256_labeled.npz`, hold both), unless `from_images`;
- `arr_0` uint8 images (N, H, W, C) are featurized in batches, streamed from the archive: IS needs the samples'
  images, precision and recall need both sides' images. A side that holds statistics only gets those metrics
  skipped, with the reason in `skipped` (and a gate that needs them refuses to start).
A metric the feature graph cannot give (an Inception graph exported before `spatial`/`logits` existed) is skipped
the same way. Skipped metrics are null in the JSON and say why.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..core.errors import ArtifactError, ConfigError, InputError
from ..core.log import Progress
from .adm import IS_SPLIT, NHOOD_K, Activations, inception_score, precision_recall
from .features import DEFAULT_BATCH, FeatureExtractor
from .fid import Stats, fid, image_files, iter_folder_images, iter_npz_images, lazy_extractor, stats_from_features

METRICS = ("inception_score", "fid", "sfid", "precision", "recall")
LABELS = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
          "recall": "Recall"}
RATIO_GATES = ("precision", "recall")  # validate's --min-precision-ratio / --min-recall-ratio


def activations_of(extractor: FeatureExtractor, images: np.ndarray) -> Activations:
    """Every activation the extractor gives (ONNX graphs: their outputs; any other extractor: `extract` only)."""
    get = getattr(extractor, "activations", None)
    return get(images) if get is not None else Activations(extractor.extract(images))


def missing_of(extractor: FeatureExtractor) -> dict[str, str]:
    get = getattr(extractor, "missing", None)
    if get is not None:
        return get()
    return {k: f"the {extractor.name} extractor gives `features` only" for k in ("spatial", "logits")}


@dataclass(frozen=True)
class Batch:
    """One side: its activations (None: statistics only), FID statistics, sFID statistics (None: no way to get them).

    `missing`: why an activation or statistic is absent, keyed `spatial`, `logits`, `images`."""

    source: str
    acts: Activations | None
    stats: Stats
    stats_s: Stats | None
    missing: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        images = "no images" if self.acts is None else f"{len(self.acts)} images"
        stored = "stored mu/sigma" if self.stats.n is None else "mu/sigma from the images"
        stored_s = "" if self.stats_s is None else (", stored mu_s/sigma_s" if self.stats_s.n is None else "")
        return f"{self.source}: {images}, {stored}{stored_s}, {self.stats.dim}-d"


def batch_from_activations(acts: Activations, source: str, missing: dict[str, str] | None = None) -> Batch:
    """A side whose images were featurized: statistics from its activations."""
    missing = dict(missing or {})
    spatial = None if acts.spatial is None else stats_from_features(acts.spatial, f"{source} (spatial)")
    if spatial is None:
        missing.setdefault("spatial", "the feature graph has no `spatial` output")
    return Batch(source, acts, stats_from_features(acts.pool, source), spatial, missing)


def image_count(path: Path) -> int | None:
    """How many images a folder or an .npz's arr_0 holds (None when it cannot tell cheaply)."""
    if path.is_dir():
        return len(image_files(path))
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            return int(header(f)[0][0])
    except (OSError, KeyError, ValueError, IndexError, zipfile.BadZipFile):
        return None


def _featurize(batches: Iterator[np.ndarray], extractor: FeatureExtractor, total: int | None,
               progress: Progress | None) -> Activations:
    parts, done = [], 0
    for b in batches:
        parts.append(activations_of(extractor, b))
        done += len(b)
        if progress is not None:
            progress(done, total or done)
    return Activations.concat(parts)


def read_batch(path: Path, get_extractor: Callable[[], FeatureExtractor], *, batch: int = DEFAULT_BATCH,
               from_images: bool = False, progress: Progress | None = None) -> Batch:
    """A folder of images or an ADM-style .npz -> Batch (see the module doc). The extractor is asked for only
    when there are images to featurize."""
    path = Path(path)
    if path.is_dir():
        ex = get_extractor()
        acts = _featurize(iter_folder_images(path, batch), ex, image_count(path), progress)
        return batch_from_activations(acts, str(path), missing_of(ex))
    if not path.is_file() or path.suffix != ".npz":
        raise InputError("evaluation input", "an .npz (arr_0 images and/or mu/sigma) or a folder of images", str(path))
    try:
        with np.load(path) as z:
            keys = set(z.files)
            stored = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys and not from_images}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ArtifactError(str(path), "an .npz archive (np.savez)", f"{type(e).__name__}: {e}")
    has_stats, has_images = {"mu", "sigma"} <= set(stored), "arr_0" in keys
    if not has_stats and not has_images:
        raise ArtifactError(str(path), "an ADM-style .npz with `arr_0` uint8 images and/or `mu` and `sigma`",
                            f"keys {sorted(keys)}")
    missing, acts = {}, None
    if has_images:
        ex = get_extractor()
        acts = _featurize(iter_npz_images(path, "arr_0", batch), ex, image_count(path), progress)
        missing.update(missing_of(ex))
    else:
        missing["images"] = f"{path} holds statistics only (no arr_0 images)"
    stats = Stats(stored["mu"], stored["sigma"], source=str(path)) if has_stats else \
        stats_from_features(acts.pool, str(path))
    if {"mu_s", "sigma_s"} <= set(stored):
        stats_s = Stats(stored["mu_s"], stored["sigma_s"], source=f"{path} (spatial)")
    elif acts is not None and acts.spatial is not None:
        stats_s = stats_from_features(acts.spatial, f"{path} (spatial)")
    else:
        stats_s = None
        missing.setdefault("spatial", missing.get("images", "the feature graph has no `spatial` output") +
                           "; and no stored mu_s/sigma_s")
    return Batch(str(path), acts, stats, stats_s, missing)


# --------------------------------------------------------------------------------------- the five numbers


def _check_dims(a: Stats, b: Stats, what: str) -> None:
    if a.dim != b.dim:
        raise InputError(f"{what} statistics", f"the same dimension on both sides ({a.source}: {a.dim}-d)",
                         f"{b.source}: {b.dim}-d", "both sides must come from the same feature extractor")


def _is_of(side: Batch) -> tuple[float | None, int | None, str]:
    if side.acts is None:
        return None, None, f"needs the images: {side.missing.get('images', 'none')}"
    if side.acts.logits is None:
        return None, None, side.missing.get("logits", "the feature graph has no `logits` output")
    value, splits = inception_score(side.acts.logits)
    return value, splits, ""


def adm_numbers(samples: Batch, ref: Batch) -> dict:
    """ADM's five numbers of `samples` against `ref` (+ the reference's IS); skipped ones are None, with a reason."""
    out, skipped = {}, {}
    out["inception_score"], out["inception_score_splits"], why = _is_of(samples)
    if why:
        skipped["inception_score"] = why
    _check_dims(samples.stats, ref.stats, "FID")
    out["fid"] = fid(samples.stats, ref.stats)
    out["sfid"] = None
    if samples.stats_s is None or ref.stats_s is None:
        skipped["sfid"] = "; ".join(f"{s.source}: {s.missing.get('spatial', '')}" for s in (samples, ref)
                                    if s.stats_s is None)
    else:
        _check_dims(samples.stats_s, ref.stats_s, "sFID")
        out["sfid"] = fid(samples.stats_s, ref.stats_s)
    out["precision"] = out["recall"] = None
    if samples.acts is None or ref.acts is None:
        skipped["precision"] = skipped["recall"] = "needs the images of both sides: " + "; ".join(
            s.missing.get("images", "") for s in (samples, ref) if s.acts is None)
    else:
        out["precision"], out["recall"] = precision_recall(ref.acts.pool, samples.acts.pool)
    out["reference_inception_score"], _, why = _is_of(ref)
    if why:
        skipped["reference_inception_score"] = why
    out.update(n_samples=None if samples.acts is None else len(samples.acts),
               n_reference=None if ref.acts is None else len(ref.acts),
               is_split_size=IS_SPLIT, nhood_k=NHOOD_K, skipped=skipped)
    return out


def format_numbers(nums: dict) -> list[str]:
    """The five numbers as ADM's evaluator prints them, one per line; a skipped one says why."""
    lines = []
    for k in METRICS:
        v = nums[k]
        if v is None:
            lines.append(f"{LABELS[k]}: skipped ({nums['skipped'][k]})")
        elif k == "inception_score":
            s = nums["inception_score_splits"]
            lines.append(f"{LABELS[k]}: {v:.4f} ({s} split{'s' if s != 1 else ''} of up to {nums['is_split_size']})")
        else:
            lines.append(f"{LABELS[k]}: {v:.4f}")
    return lines


@dataclass(frozen=True)
class Evaluation:
    samples: Batch
    reference: Batch
    features: str
    numbers: dict

    def record(self) -> dict:
        return {"samples": self.samples.describe(), "reference": self.reference.describe(),
                "features": self.features, **self.numbers}


def evaluate_paths(samples: Path, ref: Path, features: str = "digits", inception_onnx: Path | None = None,
                   batch: int = DEFAULT_BATCH, from_images: bool = False,
                   progress: Progress | None = None) -> Evaluation:
    """ADM's five numbers of SAMPLES against REF (each an .npz or an image folder); the extractor is built once."""
    get_extractor = lazy_extractor(features, inception_onnx, batch)
    a = read_batch(samples, get_extractor, batch=batch, from_images=from_images, progress=progress)
    b = read_batch(ref, get_extractor, batch=batch, from_images=from_images, progress=progress)
    return Evaluation(a, b, features, adm_numbers(a, b))


# --------------------------------------------------------------------------------------- validate's section


def check_ratio(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(flag, "a finite number > 0 (engine / reference)", value)


def check_gates_possible(data: Batch | None, ratios: dict[str, float | None]) -> None:
    """Before any sampling: a precision/recall gate needs the data's images."""
    asked = [k for k, v in ratios.items() if v is not None]
    if asked and data is not None and data.acts is None:
        raise ConfigError(f"--min-{asked[0]}-ratio", "data with images (arr_0) for precision and recall",
                          data.missing.get("images", "no images"),
                          "ADM reference batches (VIRTUAL_*.npz) carry arr_0; statistics alone do not suffice")


def validate_section(acts: dict[str, Activations], data: Batch | None, missing: dict[str, str],
                     ratios: dict[str, float | None]) -> dict:
    """ADM's five numbers for the engine side and the reference side against the data (or, without data, against
    the reference samples), their deltas (engine - reference), the precision/recall ratios and their gates."""
    sides = {k: batch_from_activations(v, f"{k} samples", missing) for k, v in acts.items()}
    against = data if data is not None else sides["reference"]
    sec = {"against": against.describe() if data is not None else "the reference samples (no data statistics)"}
    for k, side in sides.items():
        sec[k] = adm_numbers(side, against)
    e, r = sec["engine"], sec["reference"]
    sec["delta"] = {k: (e[k] - r[k] if e[k] is not None and r[k] is not None else None) for k in METRICS}
    sec["ratio"] = {k: (e[k] / r[k] if e[k] is not None and r[k] else None) for k in RATIO_GATES}
    gates = {}
    for k, bound in ratios.items():
        if bound is not None:
            value = sec["ratio"][k]
            gates[k] = {"definition": f"{k}(engine) / {k}(reference)", "ratio": value, "min": bound,
                        "passed": value is not None and value >= bound}
    if gates:
        sec["gates"] = gates
    return sec


def failed_gates(sec: dict) -> list[str]:
    """One phrase per failed gate of the section, e.g. `recall(engine) / recall(reference) = 0.81 < 0.9`."""
    out = []
    for g in sec.get("gates", {}).values():
        if not g["passed"]:
            v = "undefined" if g["ratio"] is None else f"{g['ratio']:.4g}"
            out.append(f"{g['definition']} = {v} < {g['min']:g}")
    return out


def summary_lines(sec: dict) -> list[str]:
    """validate's printed ADM summary: a row per metric with engine, reference, delta; then the gates."""
    lines = [f"ADM metrics against {sec['against']}:"]
    for k in METRICS:
        e, r, d = sec["engine"][k], sec["reference"][k], sec["delta"][k]
        if e is None and r is None:
            lines.append(f"  {LABELS[k]}: skipped ({sec['engine']['skipped'].get(k, '')})")
            continue
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        extra = f", ratio {sec['ratio'][k]:.4f}" if k in RATIO_GATES and sec["ratio"][k] is not None else ""
        lines.append(f"  {LABELS[k]}: engine {fmt(e)}, reference {fmt(r)}, delta {fmt(d)}{extra}")
    for g in sec.get("gates", {}).values():
        v = "undefined" if g["ratio"] is None else f"{g['ratio']:.4f}"
        lines.append(f"  gate {g['definition']} = {v} >= {g['min']:g}: {'passed' if g['passed'] else 'FAILED'}")
    return lines
