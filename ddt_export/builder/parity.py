"""How far each precision's graphs are from the fp32 graphs of the same model, measured in onnxruntime (CPU).

Per graph: both sides' graphs run on the same inputs; error = max |out - ref| / max |ref| (the precision
table's tolerance measure) and rel_l2 = ||out - ref|| / ||ref||, worst over the input batches. Inputs are
either random (the spec's dummy inputs; the decoder's s is the fp32 encoder's output on them, so it has the real
s statistics) or rows of a calibration folder (real trajectory inputs: what FP8 scales were computed on).
Per sample: the host loop on both folders from the same noise and labels; error of the final latents.

onnxruntime 1.32's CPU provider has no bfloat16 MatMul/Gemm kernels, so a bf16 graph fails at session
creation ("Could not find an implementation for MatMul(13)"); that message is recorded instead of a number.
Torch-free (numpy + onnxruntime).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import NumericsError
from ..core.manifest import read_manifest
from ..core.numerics import relative_errors, tensor_errors
from ..core.precision import Precision
from ..core.specs import DECODER, ENCODER, VAE_DECODER, Dims, GraphSpec
from ..runtime.graphs import ort

BATCHES = (1, 3)
CALIB_ROWS = 32  # rows of a calibration folder used for the measurement, evenly spread over the trajectory


def _feeds(spec: GraphSpec, ref_dir: Path, dims: Dims, num_classes: int, calibration: Path | None,
           calibration_rec: dict | None, seed: int) -> list[dict[str, np.ndarray]]:
    """Input batches for one graph: calibration rows, or random inputs (decoder s from the fp32 encoder)."""
    if calibration is not None and spec in (ENCODER, DECODER):
        from .calibrate import calibration_inputs

        rows = calibration_inputs(calibration, spec, calibration_rec)
        n = len(next(iter(rows.values())))
        pick = np.unique(np.linspace(0, n - 1, min(n, CALIB_ROWS)).round().astype(np.int64))
        return [{k: v[pick[i:i + 16]] for k, v in rows.items()} for i in range(0, len(pick), 16)]
    rng = np.random.default_rng(seed)
    if spec is DECODER:
        enc = ort.session(ref_dir / ENCODER.file)
        out = []
        for b in BATCHES:
            e = ENCODER.dummy_inputs(dims, b, rng, num_classes)
            out.append({"x": e["x"], "s": enc.run(["s"], e)[0]})
        return out
    return [spec.dummy_inputs(dims, b, rng, num_classes) for b in BATCHES]


def graph_errors(folder: Path, ref_folder: Path, *, calibration: Path | None = None, seed: int = 1234,
                 check: bool = True) -> dict[str, dict]:
    """`files_errors` for the graphs of a finished folder against the fp32 folder `ref_folder`."""
    man = read_manifest(folder)
    files = {name: Path(folder) / rec.file for name, rec in man.graphs.items()}
    return files_errors(files, man.precision_row, man.dims, man.config.model.num_classes, ref_folder,
                        calibration=calibration, seed=seed, check=check, where=str(folder))


def files_errors(files: dict[str, Path], precision: Precision, dims: Dims, num_classes: int, ref_folder: Path, *,
                 calibration: Path | None = None, seed: int = 1234, check: bool = True,
                 where: str = "graphs") -> dict[str, dict]:
    """{graph: {"max_rel_err", "rel_l2", "inputs", "rows", "reference"} or {"not_run": reason}} for graph files
    (e.g. still in a build's staging folder) vs the fp32 folder `ref_folder`.

    With `check`, raises one NumericsError listing every graph over its tolerance for the precision.
    """
    ref_folder = Path(ref_folder)
    ref = read_manifest(ref_folder)
    calibration_rec = None
    if calibration is not None:
        from .calibrate import read_calibration

        calibration_rec = read_calibration(calibration)  # checked once, not per graph
    out, failures = {}, []
    for spec in (ENCODER, DECODER, VAE_DECODER):
        if spec.name not in files or spec.name not in ref.graphs:
            continue
        sess, why = ort.try_session(files[spec.name])
        if sess is None:
            out[spec.name] = {"not_run": why}
            continue
        feeds = _feeds(spec, ref_folder, dims, num_classes, calibration, calibration_rec, seed)
        ref_sess = ort.session(ref_folder / ref.graphs[spec.name].file)
        worst = [0.0, 0.0]
        for f in feeds:
            for o, r in zip(sess.run(spec.output_names(), f), ref_sess.run(spec.output_names(), f)):
                worst = [max(w, e) for w, e in zip(worst, tensor_errors(o, r))]
        used = "calibration rows" if calibration is not None and spec in (ENCODER, DECODER) else "random"
        out[spec.name] = {"max_rel_err": worst[0], "rel_l2": worst[1], "inputs": used,
                          "rows": int(sum(len(next(iter(f.values()))) for f in feeds)),
                          "reference": "fp32 graph, onnxruntime CPU"}
        tol = precision.tol(spec.name)
        if check and not worst[0] <= tol:
            failures.append(f"{spec.name}: max rel err {worst[0]:.3e} > {tol:.1e}")
    if failures:
        raise NumericsError(f"{where} ({precision.name}) vs fp32 graphs", "errors within the precision's tolerance",
                            "; ".join(failures))
    return out


def sample_error(folder: Path, ref_folder: Path, *, num: int = 4, seed: int = 0, steps: int | None = None,
                 schedule: Sequence[int] | None = None, labels: Sequence[int] | None = None) -> dict:
    """Final latents of the host loop on `folder` vs on `ref_folder`, same noise, labels, sampler, schedule."""
    from ..core.noise import StepNoise, sample_noise
    from ..runtime import load_engines, sample
    from ..runtime.sampling.request import RequestInput, make_labels, resolve_sampler

    given = RequestInput(classes=tuple(labels) if labels else None, num=num, steps=steps)
    with load_engines(folder, "onnxruntime") as eng, load_engines(ref_folder, "onnxruntime") as ref:
        m = ref.config.model
        sampler = resolve_sampler(ref.config.sampler, given)
        recompute = list(schedule) if schedule is not None else list(range(sampler.num_steps))
        y = make_labels(m.num_classes, given)
        noise = sample_noise(seed, range(num), m.latent_shape)
        a = sample(eng, noise, y, sampler, recompute, rng=StepNoise(seed, range(num)))
        b = sample(ref, noise, y, sampler, recompute, rng=StepNoise(seed, range(num)))
    max_rel, rel_l2 = tensor_errors(a, b)
    per_sample = relative_errors(a, b).tolist()
    return {"final_latent_rel_l2": rel_l2, "final_latent_max_rel_err": max_rel, "per_sample_rel_l2": per_sample,
            "num": num, "seed": seed, "steps": sampler.num_steps, "labels": y.tolist()}
