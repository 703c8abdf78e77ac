"""Calibration capture: the encoder and decoder inputs of real sampling trajectories on the fp32 graphs.

FP8 activation scales are only as good as the data they are computed on, so calibration runs what deployment
will run: the official sampler (every step), the full CFG batch [uncond; cond] at every call
(`cond_only_outside=False`, so the unconditional half is seen outside the guidance interval too) and the
encoder schedule that will be used (the encoder sees only its recompute steps; the decoder every step).
Inputs are recorded by the host loop's observer just before each graph call. Torch-free.

A calibration folder holds `encoder.npz` and `decoder.npz` (one array per graph input, rows along axis 0,
plus `step`: the sampling step of each row) and a `manifest.json` written last: the source engines' graph
sha256s and model, the sampler settings, the schedule, the seed and labels, the row counts. When a graph
sees more rows than `max_rows` (or `max_bytes`), rows are subsampled evenly over the whole trajectory, so
every part of it stays represented; the manifest records captured and stored counts.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import Config, SamplerConfig
from .errors import ArtifactError, InputError
from .manifest import MANIFEST, atomic_dir, library_versions, sha256_file, write_json
from .specs import DECODER, ENCODER, GraphSpec

KIND = "ddt-export calibration"
FORMAT_VERSION = 1
DEFAULT_NUM = 8  # images per trajectory batch: 2 x 8 = 16 rows per graph call with CFG
DEFAULT_SEED = 0
DEFAULT_MAX_ROWS = 512  # per graph; ModelOpt's calibration runs all of them through onnxruntime
DEFAULT_MAX_BYTES = 1 << 30  # per graph (DDT-XL/256: one decoder row is 1.2 MB of s)
CAPTURED = (ENCODER, DECODER)
Say = Callable[[str], None]


def read_classes(path: Path) -> list[int]:
    """Class ids from a text file (integers separated by whitespace or commas, `#` comments) or a 1-D .npy."""
    path = Path(path)
    if not path.is_file():
        raise InputError("--classes", "an existing file of class ids", str(path))
    if path.suffix == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise InputError(f"--classes {path}", "a 1-D integer array", f"{a.dtype} {a.shape}")
        return [int(v) for v in a]
    words = " ".join(line.split("#", 1)[0] for line in path.read_text().splitlines()).replace(",", " ").split()
    try:
        out = [int(w) for w in words]
    except ValueError as e:
        raise InputError(f"--classes {path}", "integers separated by whitespace or commas", str(e))
    if not out:
        raise InputError(f"--classes {path}", "at least one class id", "none")
    return out


class _Recorder:
    """Observer keeping an even subsample of the rows one graph is called with (row indices fixed in advance)."""

    def __init__(self, spec: GraphSpec, total: int, keep: int):
        self.spec, self.total, self.seen = spec, total, 0
        picks = np.linspace(0, total - 1, keep).round().astype(np.int64) if total else np.zeros(0, np.int64)
        self.keep = set(np.unique(picks).tolist())
        self.rows: dict[str, list[np.ndarray]] = {t.name: [] for t in spec.inputs}
        self.steps: list[np.ndarray] = []

    def __call__(self, step: int, inputs: dict[str, np.ndarray]) -> None:
        n = len(next(iter(inputs.values())))
        pick = np.array([i for i in range(n) if self.seen + i in self.keep], np.int64)
        self.seen += n
        if pick.size:
            for name in self.rows:
                self.rows[name].append(np.array(inputs[name][pick]))  # copy: the loop reuses nothing, but be safe
            self.steps.append(np.full(pick.size, step, np.int32))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {name: np.concatenate(parts) for name, parts in self.rows.items()}
        out["step"] = np.concatenate(self.steps)
        return out


def _row_budget(spec: GraphSpec, dims: dict[str, int], max_rows: int, max_bytes: int) -> int:
    row_bytes = sum(int(np.prod(t.shape(dims, 1))) * np.dtype(t.dtype).itemsize for t in spec.inputs)
    return max(1, min(max_rows, max_bytes // row_bytes))


def capture(engines_dir: Path, out: Path, *, num: int = DEFAULT_NUM, seed: int = DEFAULT_SEED,
            classes: Sequence[int] | None = None, schedule: str | None = None, steps: int | None = None,
            max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = DEFAULT_MAX_BYTES, progress=None,
            say: Say = print) -> dict:
    """Run the calibration trajectories on an fp32 engine folder and write `out`. Returns its manifest dict."""
    from .generate import make_labels, make_noise, resolve_schedule, sampler_for
    from .runtime import load_engines, plan_steps, sample, work_rows

    engines = load_engines(engines_dir, backend="onnxruntime")
    man, m = engines.manifest, engines.config.model
    if man.precision != "fp32":
        raise InputError("--engines", "an fp32 export (calibration runs the fp32 graphs)",
                         f"a {man.precision} folder: {engines_dir}")
    if num < 1:
        raise InputError("--num", ">= 1", num)
    labels = make_labels(m.num_classes, list(classes) if classes else None, None, num)
    noise = make_noise(seed, num, m.latent_shape)
    sampler = sampler_for(engines, steps)
    recompute, spec = resolve_schedule(schedule, engines, sampler, say)
    rows = work_rows(plan_steps(sampler, recompute, cond_only_outside=False), num)
    totals = {"encoder": rows["encoder_rows"], "decoder": rows["decoder_rows"]}
    recorders = {s.name: _Recorder(s, totals[s.name], _row_budget(s, engines.dims, max_rows, max_bytes))
                 for s in CAPTURED}
    sample(engines, noise, labels, sampler, recompute, cond_only_outside=False, progress=progress,
           observer=lambda graph, step, inputs: recorders[graph](step, inputs) if graph in recorders else None)
    out = Path(out)
    record = {
        "kind": KIND, "format_version": FORMAT_VERSION, "config": engines.config.to_dict(),
        "source": {"engines": str(Path(engines_dir).resolve()), "precision": man.precision, "model": man.source,
                   "graphs": {g: man.graphs[g]["sha256"] for g in totals}},
        "sampler": dataclasses.asdict(sampler), "schedule": {"spec": spec, "recompute_steps": list(recompute)},
        "cond_only_outside": False, "seed": seed, "num": num, "labels": labels.tolist(), "graphs": {},
        "versions": library_versions(("ddt-export", "numpy", "onnxruntime")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # unfinished until the new manifest lands
    with atomic_dir(out, "calibration") as scratch:
        for name, rec in recorders.items():
            arrays = rec.arrays()
            np.savez(scratch / f"{name}.npz", **arrays)
            (scratch / f"{name}.npz").replace(out / f"{name}.npz")
            record["graphs"][name] = {
                "file": f"{name}.npz", "sha256": sha256_file(out / f"{name}.npz"), "rows_captured": rec.seen,
                "rows_stored": int(len(arrays["step"])),
                "inputs": {t.name: list(arrays[t.name].shape) for t in rec.spec.inputs},
            }
    write_json(out / MANIFEST, record)
    return record


def read_calibration(folder: Path) -> dict:
    """The manifest of a finished calibration folder, with its npz files checked against their sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError("calibration folder", "a folder written by `ddt-export calibrate` (with manifest.json)",
                            str(folder), "run `ddt-export calibrate` first")
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(str(path), "valid JSON", str(e))
    if rec.get("kind") != KIND or rec.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(str(path), f"a {KIND} manifest, format {FORMAT_VERSION}",
                            f"kind {rec.get('kind')!r}, format {rec.get('format_version')!r}", "calibrate again")
    for name, g in rec["graphs"].items():
        f = folder / g["file"]
        if not f.is_file() or sha256_file(f) != g["sha256"]:
            raise ArtifactError(f"calibration {f}", "the file recorded in manifest.json", "missing or changed",
                                "calibrate again")
    return rec


def calibration_inputs(folder: Path, spec: GraphSpec, rec: dict | None = None) -> dict[str, np.ndarray]:
    """The stored rows of one graph's inputs, by input name (the `step` column dropped). `rec`: the folder's
    record from `read_calibration`, already checked (the npz files are not hashed again)."""
    rec = read_calibration(folder) if rec is None else rec
    if spec.name not in rec["graphs"]:
        raise ArtifactError(f"calibration {folder}", f"rows for {spec.name}", f"only {sorted(rec['graphs'])}")
    with np.load(Path(folder) / rec["graphs"][spec.name]["file"], allow_pickle=False) as z:
        return {t.name: z[t.name] for t in spec.inputs}


def matches(rec: dict, config: Config, source: dict, sampler: SamplerConfig,
            recompute: Sequence[int] | None) -> list[str]:
    """What differs between a calibration record and the run it would calibrate ([] when it fits).

    recompute None: any encoder schedule (a calibration given on purpose was captured under the one to run)."""
    diffs = []
    if rec["config"]["model"] != dataclasses.asdict(config.model):
        diffs.append("model architecture")
    if rec["source"]["model"].get("sha256") != source.get("sha256"):
        diffs.append("weights (source sha256)")
    if rec["sampler"] != json.loads(json.dumps(dataclasses.asdict(sampler))):
        diffs.append("sampler settings")
    if recompute is not None and rec["schedule"]["recompute_steps"] != list(recompute):
        diffs.append("encoder schedule")
    return diffs
