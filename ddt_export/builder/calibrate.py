"""Calibration capture: the encoder and decoder inputs of real sampling trajectories on the fp32 graphs.

FP8 activation scales are only as good as the data they are computed on, so calibration runs what deployment
will run: the official sampler (every step), the full CFG batch [uncond; cond] at every call
(`cond_only_outside=False`, so the unconditional half is seen outside the guidance interval too) and the
encoder schedule that will be used (the encoder sees only its recompute steps; the decoder every step).
Inputs are recorded by the host loop's observer just before each graph call. Torch-free.

A calibration folder holds `encoder.npz` and `decoder.npz` (one array per graph input, rows along axis 0,
plus `step`: the sampling step of each row) and a `manifest.json` written last: the source engines' graph
sha256s, the provenance (weights, model, sampler and the encoder schedule in its options: what decides whether
a build can use it), the seed and labels, the row counts. When a graph
sees more rows than `max_rows` (or `max_bytes`), rows are subsampled evenly over the whole trajectory, so
every part of it stays represented; the manifest records captured and stored counts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.artifacts import MANIFEST, artifact_folder, library_versions, sha256_file
from ..core.errors import ArtifactError, InputError
from ..core.log import Say
from ..core.provenance import Provenance
from ..core.specs import DECODER, ENCODER, Dims, GraphSpec
from ..runtime.sampling.request import CLI, FieldNames, RequestInput

KIND = "ddt-export calibration"
FORMAT_VERSION = 2
DEFAULT_NUM = 8  # images per trajectory batch: 2 x 8 = 16 rows per graph call with CFG
DEFAULT_SEED = 0
DEFAULT_REQUEST = RequestInput(num=DEFAULT_NUM, seed=DEFAULT_SEED)
DEFAULT_MAX_ROWS = 512  # per graph; ModelOpt's calibration runs all of them through onnxruntime
DEFAULT_MAX_BYTES = 1 << 30  # per graph (DDT-XL/256: one decoder row is 1.2 MB of s)
CAPTURED = (ENCODER, DECODER)
FIELDS = ("weights", "model", "sampler", "options")  # what a calibration set depends on (options: its schedule)


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


def _row_budget(spec: GraphSpec, dims: Dims, max_rows: int, max_bytes: int) -> int:
    row_bytes = sum(int(np.prod(t.shape(dims, 1))) * np.dtype(t.dtype).itemsize for t in spec.inputs)
    return max(1, min(max_rows, max_bytes // row_bytes))


def calibration_provenance(fp32: Provenance, sampler, recompute: Sequence[int]) -> Provenance:
    """What a calibration captured on an fp32 folder of provenance `fp32` under `sampler` and `recompute` is."""
    return fp32.replace(sampler=sampler, batch=None, vae=None, platform={},
                        options={"schedule": ",".join(map(str, recompute))})


def default_out(engines_dir: Path) -> Path:
    """calibration/<config name>: where `ddt-export calibrate` writes without --out."""
    from ..core.manifest import read_manifest

    return Path("calibration") / read_manifest(engines_dir).name


def capture(engines_dir: Path, out: Path | None = None, given: RequestInput = DEFAULT_REQUEST, *,
            names: FieldNames = CLI, max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = DEFAULT_MAX_BYTES,
            progress=None, say: Say = print) -> tuple[Path, dict]:
    """Run the calibration trajectories of the request (classes, num, seed, steps, schedule; num default
    DEFAULT_NUM) on an fp32 engine folder and write `out` (default: `default_out`). Returns (out, its manifest)."""
    from ..core.noise import StepNoise, sample_noise
    from ..runtime import load_engines, plan_steps, sample, work_rows
    from ..runtime.sampling.request import resolve
    from ..runtime.sampling.schedules import resolve_schedule

    out = Path(out) if out is not None else default_out(engines_dir)
    with load_engines(engines_dir, backend="onnxruntime") as engines:
        man, m = engines.manifest, engines.config.model
        if man.precision != "fp32":
            raise InputError("--engines", "an fp32 export (calibration runs the fp32 graphs)",
                             f"a {man.precision} folder: {engines_dir}")
        request = resolve_schedule(resolve(engines.config, given, names), engines, say)
        labels, seed, num, sampler = request.labels, request.seed, request.num, request.sampler
        recompute, spec = list(request.recompute), str(request.schedule)
        noise = sample_noise(seed, range(num), m.latent_shape)
        rows = work_rows(plan_steps(sampler, recompute, cond_only_outside=False), num)
        totals = {"encoder": rows["encoder_rows"], "decoder": rows["decoder_rows"]}
        recorders = {s.name: _Recorder(s, totals[s.name], _row_budget(s, engines.dims, max_rows, max_bytes))
                     for s in CAPTURED}
        sample(engines, noise, labels, sampler, recompute, cond_only_outside=False, progress=progress,
               rng=StepNoise(seed, range(num)),
               observer=lambda graph, step, inputs: recorders[graph](step, inputs) if graph in recorders else None)
    record = {
        "kind": KIND, "format_version": FORMAT_VERSION, "name": man.name,
        "provenance": calibration_provenance(man.provenance, sampler, recompute).to_dict(),
        "source": {"engines": str(Path(engines_dir).resolve()), "precision": man.precision,
                   "graphs": {g: man.graphs[g].sha256 for g in totals}},
        "schedule": {"spec": spec, "recompute_steps": list(recompute)},
        "cond_only_outside": False, "seed": seed, "num": num, "labels": labels.tolist(), "graphs": {},
        "versions": library_versions(("ddt-export", "numpy", "onnxruntime")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with artifact_folder(out) as staging:
        for name, rec in recorders.items():
            arrays = rec.arrays()
            with open(staging.path(f"{name}.npz"), "wb") as f:
                np.savez(f, **arrays)
            record["graphs"][name] = {
                "file": f"{name}.npz", "sha256": staging.install(f"{name}.npz"), "rows_captured": rec.seen,
                "rows_stored": int(len(arrays["step"])),
                "inputs": {t.name: list(arrays[t.name].shape) for t in rec.spec.inputs},
            }
        staging.record = record
    return out, record


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


def calibration_inputs(folder: Path, spec: GraphSpec, rec: dict | None = None,
                       steps: set[int] | None = None) -> dict[str, np.ndarray]:
    """The stored rows of one graph's inputs, by input name (the `step` column dropped). `rec`: the folder's
    record from `read_calibration`, already checked (the npz files are not hashed again). `steps`: only the rows
    captured at these sampling steps (ArtifactError when that leaves none)."""
    rec = read_calibration(folder) if rec is None else rec
    if spec.name not in rec["graphs"]:
        raise ArtifactError(f"calibration {folder}", f"rows for {spec.name}", f"only {sorted(rec['graphs'])}")
    with np.load(Path(folder) / rec["graphs"][spec.name]["file"], allow_pickle=False) as z:
        keep = slice(None) if steps is None else np.isin(z["step"], sorted(steps))
        out = {t.name: z[t.name][keep] for t in spec.inputs}
    if not len(next(iter(out.values()))):
        raise ArtifactError(f"calibration {folder}", f"{spec.name} rows at the steps asked",
                            f"none at the {len(steps)} steps asked", "calibrate with a schedule that reaches them")
    return out


def differences(rec: dict, asked: Provenance, any_schedule: bool = False) -> list[str]:
    """What differs between a calibration record and the run it would calibrate ([] when it fits), by the
    provenance rule. any_schedule: a calibration given on purpose was captured under the schedule to run."""
    built = Provenance.from_dict(rec["provenance"], "calibration manifest")
    return built.diff(asked, tuple(f for f in FIELDS if not (any_schedule and f == "options")))
