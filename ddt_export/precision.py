"""How far each precision's graphs are from the fp32 graphs of the same model, measured in onnxruntime (CPU).

Per graph: both folders' graphs run on the same inputs; error = max |out - ref| / max |ref| (the specs'
tolerance metric) and rel_l2 = ||out - ref|| / ||ref||, worst over the input batches. Inputs are either random
(the spec's dummy inputs; the decoder's s is the fp32 encoder's output on them, so it has the real s
statistics) or rows of a calibration folder (real trajectory inputs: what FP8 scales were computed on).
Per sample: the host loop on both folders from the same noise and labels; error of the final latents.

onnxruntime 1.32's CPU provider has no bfloat16 MatMul/Gemm kernels, so a bf16 graph fails at session
creation ("Could not find an implementation for MatMul(13)"); that message is recorded instead of a number.
Torch-free (numpy + onnxruntime).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import NumericsError
from .manifest import read_manifest
from .specs import DECODER, ENCODER, VAE_DECODER, GraphSpec, model_dims

BATCHES = (1, 3)
CALIB_ROWS = 32  # rows of a calibration folder used for the measurement, evenly spread over the trajectory


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _try_session(path: Path):
    """(session, "") or (None, why onnxruntime CPU cannot run the graph)."""
    try:
        return _session(path), ""
    except Exception as e:  # onnxruntime raises untyped errors; the reason is the record
        return None, f"onnxruntime CPU: {str(e).splitlines()[0][:240]}"


def onnxruntime_status(folder: Path) -> dict[str, dict]:
    """{graph: {"not_run": reason} or {"runs": True}}: whether onnxruntime CPU can open each graph of a folder
    (bf16 graphs cannot: no bf16 MatMul kernels), for folders with no fp32 graphs to compare against."""
    man = read_manifest(folder)
    out = {}
    for name, rec in man.graphs.items():
        sess, why = _try_session(Path(folder) / rec["file"])
        out[name] = {"runs": True} if sess is not None else {"not_run": why}
    return out


def tensor_errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, ||out - ref|| / ||ref||) in float64: the specs' tolerance measure and the
    relative L2 error of one tensor; (inf, inf) when out is not finite. Every parity number uses this."""
    if not np.isfinite(out).all():
        return float("inf"), float("inf")
    ref64, diff = np.asarray(ref, np.float64), np.asarray(out, np.float64) - np.asarray(ref, np.float64)
    return (float(np.abs(diff).max() / max(np.abs(ref64).max(), 1e-12)),
            float(np.linalg.norm(diff) / max(np.linalg.norm(ref64), 1e-12)))


def relative_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) float64 ||a_i - b_i|| / ||b_i|| over each sample's elements; a, b (B, ...) float."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)


def _feeds(spec: GraphSpec, ref_dir: Path, dims: dict, num_classes: int, calibration: Path | None,
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
        enc = _session(ref_dir / ENCODER.file)
        out = []
        for b in BATCHES:
            e = ENCODER.dummy_inputs(dims, b, rng, num_classes)
            out.append({"x": e["x"], "s": enc.run(["s"], e)[0]})
        return out
    return [spec.dummy_inputs(dims, b, rng, num_classes) for b in BATCHES]


def graph_errors(folder: Path, ref_folder: Path, *, calibration: Path | None = None, seed: int = 1234,
                 check: bool = True) -> dict[str, dict]:
    """{graph: {"max_rel_err", "rel_l2", "inputs", "reference"} or {"not_run": reason}} for `folder` vs fp32.

    With `check`, raises one NumericsError listing every graph over its spec tolerance for the precision.
    """
    folder, ref_folder = Path(folder), Path(ref_folder)
    man, ref = read_manifest(folder), read_manifest(ref_folder)
    if calibration is not None:
        from .calibrate import read_calibration

        calibration_rec = read_calibration(calibration)  # checked once, not per graph
    else:
        calibration_rec = None
    dims = model_dims(man.config.model, *(_vae_dims(man)))
    out, failures = {}, []
    for spec in (ENCODER, DECODER, VAE_DECODER):
        if spec.name not in man.graphs or spec.name not in ref.graphs:
            continue
        sess, why = _try_session(folder / man.graphs[spec.name]["file"])
        if sess is None:
            out[spec.name] = {"not_run": why}
            continue
        feeds = _feeds(spec, ref_folder, dims, man.config.model.num_classes, calibration, calibration_rec, seed)
        ref_sess = _session(ref_folder / ref.graphs[spec.name]["file"])
        worst = [0.0, 0.0]
        for f in feeds:
            for o, r in zip(sess.run(spec.output_names(), f), ref_sess.run(spec.output_names(), f)):
                worst = [max(w, e) for w, e in zip(worst, tensor_errors(o, r))]
        used = "calibration rows" if calibration is not None and spec in (ENCODER, DECODER) else "random"
        out[spec.name] = {"max_rel_err": worst[0], "rel_l2": worst[1], "inputs": used,
                          "rows": int(sum(len(next(iter(f.values()))) for f in feeds)),
                          "reference": "fp32 graph, onnxruntime CPU"}
        tol = spec.tolerance[man.precision]
        if check and not worst[0] <= tol:
            failures.append(f"{spec.name}: max rel err {worst[0]:.3e} > {tol:.1e}")
    if failures:
        raise NumericsError(f"{folder} ({man.precision}) vs fp32 graphs", "errors within the spec tolerance",
                            "; ".join(failures))
    return out


def _vae_dims(man) -> tuple[int, int]:
    rec = man.graphs.get(VAE_DECODER.name, {})
    return rec.get("image_channels", 3), rec.get("factor", 8)


def record_parity(folder: Path, errors: dict[str, dict], key: str = "vs_fp32_onnx") -> None:
    """Store measured errors under graphs[name]["parity"][key] in the folder's manifest (graphs untouched)."""
    folder = Path(folder)
    man = read_manifest(folder)
    for name, rec in errors.items():
        if name in man.graphs:
            parity = man.graphs[name].get("parity") or {}
            parity[key] = rec
            man.graphs[name]["parity"] = parity
    man.write(folder)


def sample_error(folder: Path, ref_folder: Path, *, num: int = 4, seed: int = 0, steps: int | None = None,
                 schedule: Sequence[int] | None = None, labels: Sequence[int] | None = None) -> dict:
    """Final latents of the host loop on `folder` vs on `ref_folder`, same noise, labels, sampler, schedule."""
    from .generate import make_labels, make_noise, sampler_for
    from .runtime import load_engines, sample

    eng, ref = load_engines(folder, "onnxruntime"), load_engines(ref_folder, "onnxruntime")
    m = ref.config.model
    sampler = sampler_for(ref, steps)
    recompute = list(schedule) if schedule is not None else list(range(sampler.num_steps))
    y = make_labels(m.num_classes, list(labels) if labels else None, None, num)
    noise = make_noise(seed, num, m.latent_shape)
    a = sample(eng, noise, y, sampler, recompute)
    b = sample(ref, noise, y, sampler, recompute)
    max_rel, rel_l2 = tensor_errors(a, b)
    per_sample = relative_errors(a, b).tolist()
    return {"final_latent_rel_l2": rel_l2, "final_latent_max_rel_err": max_rel, "per_sample_rel_l2": per_sample,
            "num": num, "seed": seed, "steps": sampler.num_steps, "labels": y.tolist()}
