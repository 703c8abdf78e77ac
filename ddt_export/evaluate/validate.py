"""`ddt-export validate`: the quality gate. Engines against a reference from identical noise, labels, schedule.

Reference: the PyTorch model rebuilt in fp32 from the manifest's checkpoint (its sha256 checked against the
manifest), running the official loop (full [uncond; cond] batch every step, `export.reference`), or a second
engine folder of the same model (another precision or backend; its manifest must name the same weights).
Measured, in batches:
- per-sample relative error of the final latents, ||a - b|| / ||b|| (mean, p99, max);
- per-tensor parity of one encoder and one decoder call, on inputs captured from the engines' trajectory at the
  recompute step nearest the middle (same inputs to both sides: the error of the graph alone);
- FID of the engine samples against the reference samples, and with data statistics (`--stats`, or the bundled
  digits statistics for the digits model) each side's FID against the data. The gate bounds the delta
  FID(engine, data) - FID(reference, data), or FID(engine, reference) when there are no statistics;
- ADM's five numbers (IS, FID, sFID, precision, recall; `evaluate.suite`) of each side against the data (against
  the reference samples when there is none), their deltas, and the precision and recall ratios engine /
  reference, gated by `min_precision_ratio` / `min_recall_ratio`. Precision and recall need the data's images
  (`arr_0`; the bundled digits statistics carry them).
Images are the VAE decoder's output when the folder has one (the torch reference's latents go through the
engines' VAE graph, so the delta isolates the DDT), else the latents themselves (pixel-space models).
Writes report.json (atomic) and side_by_side.png (rows of engine samples, each above the reference's).
Torch is imported only for the PyTorch reference.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.artifacts import library_versions, write_json
from ..core.errors import ArtifactError, ConfigError, InputError, NumericsError
from ..core.images import images_from_samples, save_png, tile
from ..core.log import Progress, Say
from ..core.noise import StepNoise, sample_noise
from ..core.numerics import relative_errors, tensor_errors
from ..core.specs import DECODER, ENCODER
from ..runtime import Engines, load_engines, sample
from ..runtime.graphs.engines import call_graph
from ..runtime.sampling.plans import lookup
from ..runtime.sampling.request import CLI, RequestInput, SampleRequest, resolve
from ..runtime.sampling.schedules import resolve_schedule
from . import suite
from .adm import Activations
from .features import DIGITS_SIZE, DIGITS_STATS, FeatureExtractor, make_extractor
from .fid import Stats, fid, stats_from_features

REPORT = "report.json"
PNG = "side_by_side.png"
DEFAULT_NUM = 250  # identical noise on both sides: the delta is paired, so few samples tell (more on a GPU)
DEFAULT_BATCH = 100  # images per trajectory batch (the CFG batch is twice this; graph calls split at batch.max)
PNG_SAMPLES, PNG_COLS = 32, 16
PNG_MIN_SIDE = 512  # tiny images are upscaled (nearest) to at least this many pixels wide


# ------------------------------------------------------------------------------------------ references


class TorchReference:
    """The PyTorch model in fp32 (`export.reference`): the official loop for trajectories, single calls for
    per-tensor parity (one model, on the device the loop runs on)."""

    def __init__(self, engines: Engines):
        try:
            from ..export.reference import TorchReference as Reference
        except ImportError as e:
            raise ArtifactError("--reference torch", "PyTorch (the [export] extra)", repr(e),
                                "pass --reference DIR (a second engine folder of the same model)")
        self.torch = Reference(engines.manifest, "torch-eager-fp32")
        self.images_from = engines  # the engines' VAE graph (if any) decodes the reference latents
        self.record = {"kind": "torch", "precision": "fp32", "backend": "torch-eager-fp32 (official loop)",
                       "checkpoint": engines.manifest.source.path}

    def sample(self, noise, labels, sampler, schedule, rng, progress=None) -> np.ndarray:
        return self.torch.sample(noise, labels, sampler, schedule, rng)

    def call(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.torch.call(graph, inputs)


class EnginesReference:
    """A second engine folder of the same model, through the same host loop."""

    def __init__(self, folder: Path, engines: Engines, backend: str):
        self.engines = load_engines(folder, backend)
        diffs = self.engines.manifest.provenance.diff(engines.manifest.provenance, ("weights", "model"))
        if diffs:
            self.engines.close()
            raise ArtifactError(f"--reference {folder}", f"engines of the same model as {engines.folder}",
                                "; ".join(diffs), "a reference must be built from the same checkpoint")
        # its own VAE graph decodes its latents; without one, the engines' VAE graph does
        self.images_from = self.engines if self.engines.vae_decoder is not None else engines
        m = self.engines.manifest
        self.record = {"kind": "engines", "path": str(folder), "precision": m.precision,
                       "backend": self.engines.backend_name}

    def sample(self, noise, labels, sampler, schedule, rng, progress=None) -> np.ndarray:
        return sample(self.engines, noise, labels, sampler, schedule, progress=progress, rng=rng)

    def call(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return call_graph(self.engines, graph, inputs)


# ------------------------------------------------------------------------------------------ measures


def summarize(errors: np.ndarray) -> dict:
    return {"mean": float(errors.mean()), "p99": float(np.percentile(errors, 99)), "max": float(errors.max())}


def tensor_parity(out: np.ndarray, ref: np.ndarray, tolerance: float) -> dict:
    """max |out - ref| / max |ref| (the export tolerance's measure) and the relative L2 error of one tensor."""
    max_rel, rel_l2 = tensor_errors(out, ref)
    return {"max_rel_err": max_rel, "rel_l2": rel_l2, "tolerance": tolerance, "within_tolerance": max_rel <= tolerance}


def parity_step(schedule: Sequence[int], num_steps: int) -> int:
    """The recompute step nearest the middle of the trajectory (at or before it)."""
    return max(s for s in schedule if s <= num_steps // 2)


class _Capture:
    """Host-loop observer keeping the first encoder and decoder inputs of one step."""

    def __init__(self, step: int):
        self.step, self.inputs = step, {}

    def __call__(self, graph: str, step: int, inputs: dict) -> None:
        if step == self.step and graph in (ENCODER.name, DECODER.name) and graph not in self.inputs:
            self.inputs[graph] = {k: np.array(v) for k, v in inputs.items()}


def _ticker(progress: Progress | None, base: int, b: int, total: int):
    """Host-loop progress (steps done of one batch) -> overall progress in sample-steps."""
    if progress is None:
        return None
    return lambda i, n: progress(base + i * b, total)


def to_images(engines: Engines, latents: np.ndarray, step: int) -> np.ndarray:
    """Final latents (B, C, H, W) -> (B, H, W, C) uint8 images, through the VAE graph when there is one."""
    pixels = latents if engines.vae_decoder is None else call_graph(engines, "vae_decoder", {"latent": latents}, step)
    return images_from_samples(pixels)


def choose_features(engines: Engines, features: str | FeatureExtractor | None, inception_onnx: Path | None
                    ) -> tuple[FeatureExtractor | None, str]:
    """(extractor or None, why none). Default: digits for 16x16 one-channel images, else inception if given."""
    if features is not None and not isinstance(features, str):
        return features, ""
    side, channels = engines.dims.image
    if features is None:
        if (side, channels) == (DIGITS_SIZE, 1):
            features = "digits"
        elif inception_onnx is not None:
            features = "inception"
        else:
            return None, (f"no feature extractor for {side}x{side} images: pass --features inception "
                          "--inception-onnx inception_fid.onnx (`ddt-export fid-inception`)")
    if features == "digits" and side != DIGITS_SIZE:
        raise ConfigError("--features digits", f"{DIGITS_SIZE}x{DIGITS_SIZE} images (the digits model)",
                          f"{side}x{side} images", "use --features inception --inception-onnx FILE")
    return make_extractor(features, inception_onnx), ""


def side_by_side(engine: np.ndarray, reference: np.ndarray, path: Path, cols: int = PNG_COLS) -> Path:
    """Two (n, H, W, C) uint8 sets -> a PNG: a row of engine samples above the same samples from the reference."""
    cols = min(cols, len(engine))
    rows = []
    for start in range(0, len(engine), cols):  # a row of engine samples, then the same from the reference
        for side in (engine, reference):
            row = side[start:start + cols]
            rows += [row, np.zeros((cols - len(row), *row.shape[1:]), np.uint8)]
    return save_png(tile(np.concatenate(rows), cols), path, PNG_MIN_SIDE)


def _sample_pairs(engines: Engines, ref, sides: tuple[SampleRequest, SampleRequest], noise: np.ndarray, extractor,
                  capture: _Capture, o: ValidateOptions, progress: Progress | None):
    """Both sides batch by batch (`sides`: the engines' request, the reference's). Returns per-sample latent errors
    (num,), features and (with an output folder) the first images per side, and the seconds each side took.
    Latents become images only where they are used."""
    request, refreq = sides
    sampler, recompute, labels, seed, png = request.sampler, list(request.recompute), request.labels, request.seed, \
        o.out is not None
    errors, feats, shown = [], {"engine": [], "reference": []}, {"engine": [], "reference": []}
    steps_ref = refreq.sampler.num_steps
    done, total, timing = 0, len(labels) * (sampler.num_steps + steps_ref), {"engine_s": 0.0, "reference_s": 0.0}
    for lo in range(0, len(labels), o.batch):
        x0, y = noise[lo:lo + o.batch], labels[lo:lo + o.batch]
        b = len(y)
        t0 = time.perf_counter()
        host = engines.loop == "host"
        a = sample(engines, x0, y, sampler, recompute, observer=capture if lo == 0 and host else None,
                   progress=_ticker(progress, done, b, total), rng=StepNoise(seed, range(lo, lo + b)))
        timing["engine_s"] += time.perf_counter() - t0
        if lo == 0 and not host:  # an observer needs host arrays: the parity inputs come from a host-loop run
            sample(engines, x0, y, sampler, recompute, observer=capture, rng=StepNoise(seed, range(lo, lo + b)))
        done += b * sampler.num_steps
        t0 = time.perf_counter()
        r = ref.sample(x0, y, refreq.sampler, list(refreq.recompute), StepNoise(seed, range(lo, lo + b)),
                       progress=_ticker(progress, done, b, total))  # the same noise, SDE noise included
        timing["reference_s"] += time.perf_counter() - t0
        done += b * steps_ref
        if progress is not None:
            progress(done, total)
        if not np.isfinite(r).all():
            raise NumericsError(f"reference samples {lo}..{lo + b - 1}", "finite values", "inf/nan")
        errors.append(relative_errors(a, r))
        for side, lat, eng in (("engine", a, engines), ("reference", r, ref.images_from)):
            show = png and sum(len(s) for s in shown[side]) < PNG_SAMPLES
            if extractor is None and not show:
                continue
            imgs = to_images(eng, lat if extractor is not None else lat[:PNG_SAMPLES], sampler.num_steps)
            if extractor is not None:
                feats[side].append(suite.activations_of(extractor, imgs))  # imgs (b, H, W, C) uint8
            if show:
                shown[side].append(imgs[:PNG_SAMPLES])
    return np.concatenate(errors), feats, shown, timing


# ------------------------------------------------------------------------------------------ the command


@dataclass(frozen=True)
class ValidateOptions:
    """How the engines are validated (the request itself, num, seed and schedule, is a `RequestInput`)."""

    reference: str | Path = "torch"  # torch (fp32 PyTorch from the manifest's checkpoint) | a second engine folder
    stats: Path | None = None  # data statistics (default for the digits model: the bundled ones)
    features: str | FeatureExtractor | None = None  # digits | inception | an extractor (default: by image size)
    inception_onnx: Path | None = None
    max_fid_delta: float | None = None  # the gates: NumericsError (after the report is written) past them
    min_precision_ratio: float | None = None
    min_recall_ratio: float | None = None
    out: Path | None = None  # report.json and side_by_side.png
    batch: int = DEFAULT_BATCH  # images per trajectory batch
    backend: str = "auto"
    device_loop: bool = True

    @property
    def ratios(self) -> dict[str, float | None]:
        return {"precision": self.min_precision_ratio, "recall": self.min_recall_ratio}


def _check_options(o: ValidateOptions) -> None:
    if o.batch < 1:
        raise InputError("batch", ">= 1", o.batch)
    if o.max_fid_delta is not None and not math.isfinite(o.max_fid_delta):
        raise InputError("--max-fid-delta", "a finite number", o.max_fid_delta)
    for k, v in o.ratios.items():
        suite.check_ratio(f"--min-{k}-ratio", v)


def _quality_inputs(engines: Engines, o: ValidateOptions, say: Say):
    """(feature extractor or None, why none, the data batch or None): everything refused here, before minutes
    of sampling."""
    extractor, no_fid = choose_features(engines, o.features, o.inception_onnx)
    stats = o.stats
    if extractor is None and (o.max_fid_delta is not None or stats is not None
                              or any(v is not None for v in o.ratios.values())):
        raise ConfigError("feature extractor", "one, for --stats / --max-fid-delta / --min-*-ratio", "none", no_fid)
    if stats is None and extractor is not None and extractor.name == "digits" and DIGITS_STATS.is_file():
        stats = DIGITS_STATS  # the bundled statistics of the 1797 real digits
    if stats is not None and suite.image_count(Path(stats)):
        say(f"featurizing the images of {stats} (precision and recall need them)")
    data_batch = suite.read_batch(Path(stats), lambda: extractor) if stats is not None else None
    suite.check_gates_possible(data_batch, o.ratios)
    if data_batch is not None and getattr(extractor, "dim", None) is not None:
        _check_dims(data_batch.stats, extractor.dim, extractor.name)
    return extractor, no_fid, data_batch


def validate(engines_dir: Path, given: RequestInput = RequestInput(), options: ValidateOptions = ValidateOptions(),
             *, progress: Progress | None = None, say: Say = print) -> dict:
    """Engines vs reference on the request's samples (num default DEFAULT_NUM, labels 0, 1, ... cycled, its seed
    and schedule); returns the report (also written to out/report.json with out/PNG). The engines run the request
    as given, plan, solver and forecast included; the reference runs the model's own sampler (Euler, no
    forecast) at the request's steps and schedule, or, for a plan, the model's reference trajectory (its
    default steps and schedule): so a plan's or a solver's gate measures its distance from the reference.

    Raises NumericsError after writing the report when the FID delta exceeds `max_fid_delta` or a precision /
    recall ratio (engine / reference) is below `min_precision_ratio` / `min_recall_ratio`."""
    o = options
    given = dataclasses.replace(given, num=DEFAULT_NUM if given.num is None else given.num)
    if given.num < 2:
        raise InputError("--num", ">= 2 samples (FID needs a covariance)", given.num)
    _check_options(o)
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        engines = stack.enter_context(load_engines(engines_dir, o.backend, device_loop=o.device_loop))
        if str(o.reference) == "torch":
            ref = TorchReference(engines)
        else:
            ref = EnginesReference(Path(o.reference), engines, o.backend)
            stack.callback(ref.engines.close)
        extractor, no_fid, data_batch = _quality_inputs(engines, o, say)
        request = resolve_schedule(resolve(engines.config, given, CLI, lookup(engines.folder, engines.manifest)),
                                   engines, say)
        plain = RequestInput(num=given.num, seed=given.seed) if given.plan is not None else dataclasses.replace(
            given, solver="euler", forecast=0)
        refreq = resolve_schedule(resolve(engines.config, plain), engines, say)
        noise = sample_noise(request.seed, range(request.num), engines.config.model.latent_shape)  # per sample
        capture = _Capture(parity_step(request.recompute, request.sampler.num_steps))
        errors, feats, shown, timing = _sample_pairs(engines, ref, (request, refreq), noise, extractor, capture, o,
                                                     progress)
        report = {
            **_header(engines_dir, engines, ref, request, refreq),
            "images": "vae_decoder graph" if engines.vae_decoder is not None else "latents (pixel space)",
            "latent_rel_err": dict(summarize(errors), per_sample=errors.tolist()),
            "parity": _parity(engines, ref, capture),
            "fid": _fid_section(feats, extractor, data_batch.stats if data_batch else None, no_fid,
                                o.max_fid_delta),
            "adm": {"skipped": no_fid} if extractor is None else suite.validate_section(
                {k: Activations.concat(v) for k, v in feats.items()}, data_batch, suite.missing_of(extractor),
                o.ratios, say),
            "seconds": dict(timing, total=time.perf_counter() - t_start),
            "versions": library_versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        if o.out is not None:
            out = Path(o.out)
            report["files"] = {"report": str(out / REPORT), "png": str(out / PNG)}
            side_by_side(np.concatenate(shown["engine"])[:PNG_SAMPLES],
                         np.concatenate(shown["reference"])[:PNG_SAMPLES], out / PNG)
            write_json(out / REPORT, report)
        _gate(report, o)
        return report


def _header(engines_dir: Path, engines: Engines, ref, request, refreq) -> dict:
    """The report's record of what was compared: the engines, the reference, the model, the samples and both
    samplers (the engines' request as run; the reference's)."""
    return {
        "engines": {"path": str(engines_dir), "precision": engines.manifest.precision,
                    "backend": engines.backend_name, "loop": engines.loop},
        "reference": ref.record,
        "model": {"name": engines.config.name, "sha256": engines.manifest.provenance.weights,
                  "weights": engines.manifest.provenance.weights_kind},
        "num": request.num, "seed": request.seed, "labels": f"0..{engines.config.model.num_classes - 1} cycled",
        "noise": f"per sample i: numpy default_rng([{request.seed}, i]) (core.noise)",
        "sampler": dataclasses.asdict(request.sampler), "plan": request.plan,
        "schedule": {"spec": str(request.schedule), "recompute_steps": list(request.recompute)},
        "reference_sampler": {"sampler": dataclasses.asdict(refreq.sampler), "schedule": str(refreq.schedule),
                              "recompute_steps": list(refreq.recompute)},
    }


def _parity(engines: Engines, ref, capture: _Capture) -> dict:
    """One encoder and one decoder call on the captured inputs, both sides: the error of the graph alone."""
    out = {}
    for spec in (ENCODER, DECODER):
        inputs = capture.inputs[spec.name]
        got = call_graph(engines, spec.name, inputs)
        out[spec.name] = dict(step=capture.step, rows=len(next(iter(inputs.values()))),
                              **tensor_parity(got, ref.call(spec.name, inputs),
                                              engines.manifest.precision_row.tol(spec.name)))
    return out


def _gate(report: dict, o: ValidateOptions) -> None:
    gate, failed = report["fid"].get("gate"), suite.failed_gates(report["adm"])
    where = f"; report {Path(o.out) / REPORT}" if o.out is not None else ""
    if gate and not gate["passed"]:
        also = f"; also {'; '.join(failed)}" if failed else ""
        raise NumericsError(f"FID delta, {gate['definition']}", f"<= {o.max_fid_delta:g}",
                            f"{gate['delta']:.4g}{also}{where}")
    if failed:
        raise NumericsError("precision/recall gate", "ratios engine / reference at or above the bounds",
                            "; ".join(failed) + where)


def _check_dims(data: Stats, dim: int, features: str) -> None:
    if data.dim != dim:
        raise InputError(f"--stats {data.source}", f"{dim}-d statistics ({features} features)", f"{data.dim}-d",
                         "statistics must come from the same feature extractor")


def _fid_section(feats: dict, extractor, data: Stats | None, no_fid: str, max_fid_delta: float | None) -> dict:
    if extractor is None:
        return {"skipped": no_fid}
    st = {k: stats_from_features(np.concatenate([a.pool for a in v]), k) for k, v in feats.items()}
    if data is not None:
        _check_dims(data, st["engine"].dim, extractor.name)
    sec = {"features": extractor.name, "engine_vs_reference": fid(st["engine"], st["reference"])}
    if data is not None:
        sec.update(stats=data.source, engine_vs_data=fid(st["engine"], data),
                   reference_vs_data=fid(st["reference"], data))
        sec["delta"], definition = sec["engine_vs_data"] - sec["reference_vs_data"], \
            "FID(engine, data) - FID(reference, data)"
    else:
        sec["delta"], definition = sec["engine_vs_reference"], "FID(engine, reference)"
    sec["delta_definition"] = definition
    if max_fid_delta is not None:
        sec["gate"] = {"definition": definition, "delta": sec["delta"], "max_fid_delta": max_fid_delta,
                       "passed": sec["delta"] <= max_fid_delta}
    return sec
