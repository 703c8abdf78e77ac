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

IS cuts its splits in the order `is_order` (`adm.IS_ORDERS`; default shuffled with a fixed seed, `as-given` is
ADM's number), recorded under `is_order`. Each side's class order (`adm.class_order`, from the .npz's `arr_1`
labels when it has them, else from the argmax of the logits) is recorded under `class_order`; a side sorted by
class with more than one split gets a warning through `say` giving its IS in both orders.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..core.errors import ArtifactError, ConfigError, InputError
from ..core.log import Progress, Say, silent
from .adm import (IS_ORDER, IS_ORDERS, IS_SEED, IS_SPLIT, NHOOD_K, Activations, check_is_order, class_order,
                  ordered_inception_score, precision_recall)
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

    `missing`: why an activation or statistic is absent, keyed `spatial`, `logits`, `images`. `labels`: (N,)
    integer classes in image order (an .npz's `arr_1`), or None."""

    source: str
    acts: Activations | None
    stats: Stats
    stats_s: Stats | None
    missing: dict[str, str] = field(default_factory=dict)
    labels: np.ndarray | None = None

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
    missing, acts, labels = {}, None, None
    if has_images:
        labels = _labels_of(path) if "arr_1" in keys else None
        ex = get_extractor()
        acts = _featurize(iter_npz_images(path, "arr_0", batch), ex, image_count(path), progress)
        if labels is not None and len(labels) != len(acts):  # when image_count could not tell beforehand
            raise ArtifactError(f"{path} arr_1", f"({len(acts)},) labels, one per image of arr_0", labels.shape)
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
    return Batch(str(path), acts, stats, stats_s, missing, labels)


def _labels_of(path: Path) -> np.ndarray:
    """An ADM .npz's `arr_1`: (N,) integer labels of the N images in `arr_0`, checked before featurizing."""
    with np.load(path) as z:
        labels = z["arr_1"]
    n = image_count(path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (n is not None and len(labels) != n):
        raise ArtifactError(f"{path} arr_1", f"({n},) integer labels, one per image of arr_0",
                            f"{labels.shape} {labels.dtype}")
    return labels


# --------------------------------------------------------------------------------------- the five numbers


def _check_dims(a: Stats, b: Stats, what: str) -> None:
    if a.dim != b.dim:
        raise InputError(f"{what} statistics", f"the same dimension on both sides ({a.source}: {a.dim}-d)",
                         f"{b.source}: {b.dim}-d", "both sides must come from the same feature extractor")


def order_record(order: str) -> dict:
    """How IS cut its splits, as the report records it."""
    check_is_order(order)
    if order == "as-given":
        return {"order": order, "seed": None, "how": "the batch's stored order, as ADM's evaluator"}
    return {"order": order, "seed": IS_SEED, "how": f"numpy default_rng({IS_SEED}).permutation(N)"}


def order_text(rec: dict) -> str:
    """`shuffled, seed 0` / `as given`: the split order in a printed line."""
    return "as given" if rec["seed"] is None else f"{rec['order']}, seed {rec['seed']}"


def _is_of(side: Batch, order: str, say: Say) -> tuple[float | None, int | None, str, dict | None]:
    """(IS, splits, why skipped, class order record) of one side; warns when the side is sorted by class and
    has more than one split (then its stored order changes ADM's IS)."""
    if side.acts is None:
        return None, None, f"needs the images: {side.missing.get('images', 'none')}", None
    logits = side.acts.logits
    if logits is None:
        return None, None, side.missing.get("logits", "the feature graph has no `logits` output"), None
    value, splits = ordered_inception_score(logits, order)
    co = class_order(side.labels, "labels (arr_1)") if side.labels is not None else \
        class_order(logits.argmax(axis=1), "predicted classes (argmax of the logits)")
    if co.sorted and splits > 1:
        other = IS_ORDERS[1] if order == IS_ORDERS[0] else IS_ORDERS[0]
        scores = {order: value, other: ordered_inception_score(logits, other)[0]}
        say(f"warning: {side.source} is sorted by class ({co.source}: {co.same_neighbours:.1%} of neighbours "
            f"share a class, {co.random_expected:.1%} in a random order). ADM's evaluator cuts its {splits} IS "
            f"splits of {IS_SPLIT} in the stored order, so each sees few classes: IS as given (ADM's number) "
            f"{scores['as-given']:.4f}, shuffled (seed {IS_SEED}) {scores['shuffled']:.4f}; reported: {order}")
    return value, splits, "", co.record()


def adm_numbers(samples: Batch, ref: Batch, is_order: str = IS_ORDER, say: Say = silent) -> dict:
    """ADM's five numbers of `samples` against `ref` (+ the reference's IS); skipped ones are None, with a reason.

    IS cuts its splits in `is_order` (one of `adm.IS_ORDERS`); `say` gets the class-order warnings."""
    out, skipped, orders = {}, {}, {}
    out["inception_score"], out["inception_score_splits"], why, orders["samples"] = _is_of(samples, is_order, say)
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
    out["reference_inception_score"], _, why, orders["reference"] = _is_of(ref, is_order, say)
    if why:
        skipped["reference_inception_score"] = why
    out.update(n_samples=None if samples.acts is None else len(samples.acts),
               n_reference=None if ref.acts is None else len(ref.acts),
               is_split_size=IS_SPLIT, is_order=order_record(is_order), class_order=orders, nhood_k=NHOOD_K,
               skipped=skipped)
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
            lines.append(f"{LABELS[k]}: {v:.4f} ({s} split{'s' if s != 1 else ''} of up to {nums['is_split_size']}, "
                         f"{order_text(nums['is_order'])})")
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
                   batch: int = DEFAULT_BATCH, from_images: bool = False, is_order: str = IS_ORDER, *,
                   progress: Progress | None = None, say: Say = silent) -> Evaluation:
    """ADM's five numbers of SAMPLES against REF (each an .npz or an image folder); the extractor is built once.
    IS cuts its splits in `is_order` (`adm.IS_ORDERS`); `say` gets the class-order warnings."""
    check_is_order(is_order)  # before minutes of featurizing
    get_extractor = lazy_extractor(features, inception_onnx, batch)
    a = read_batch(samples, get_extractor, batch=batch, from_images=from_images, progress=progress)
    b = read_batch(ref, get_extractor, batch=batch, from_images=from_images, progress=progress)
    return Evaluation(a, b, features, adm_numbers(a, b, is_order, say))


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
                     ratios: dict[str, float | None], say: Say = silent) -> dict:
    """ADM's five numbers for the engine side and the reference side against the data (or, without data, against
    the reference samples), their deltas (engine - reference), the precision/recall ratios and their gates.
    IS in the default split order (`adm.IS_ORDER`), recorded in each side's numbers."""
    sides = {k: batch_from_activations(v, f"{k} samples", missing) for k, v in acts.items()}
    against = data if data is not None else sides["reference"]
    sec = {"against": against.describe() if data is not None else "the reference samples (no data statistics)"}
    said = set()  # `against` is scored once per side: its warning once

    def say_once(message: str) -> None:
        if message not in said:
            said.add(message)
            say(message)

    for k, side in sides.items():
        sec[k] = adm_numbers(side, against, say=say_once)
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
        if k == "inception_score":
            extra = f" (splits {order_text(sec['engine']['is_order'])})"
        lines.append(f"  {LABELS[k]}: engine {fmt(e)}, reference {fmt(r)}, delta {fmt(d)}{extra}")
    for g in sec.get("gates", {}).values():
        v = "undefined" if g["ratio"] is None else f"{g['ratio']:.4f}"
        lines.append(f"  gate {g['definition']} = {v} >= {g['min']:g}: {'passed' if g['passed'] else 'FAILED'}")
    return lines
