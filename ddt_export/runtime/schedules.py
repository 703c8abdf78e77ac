"""Encoder schedules: which steps recompute the encoder state, and where `dp:K` schedules come from. Torch-free.

Specs: `all` (every step), `uniform:R` (every R-th step from 0, the official state_refresh_rate), `dp:K` (K
steps chosen by the statistical DP, `runtime.dp`, on a template trajectory run on the engines themselves), or a
JSON file `{"recompute_steps": [...], ...}`. Every schedule contains step 0: the first step has no state to
reuse.

A `dp:K` schedule is stored in the engine folder (`schedule-N-K.json`, `similarity-N.npy`, a heatmap) with the
provenance it was computed under; it is reused only when that provenance's weights, model and sampler equal the
engines' (`Provenance.diff`), else computed again (the caller is told which).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.artifacts import load_npy, save_npy, write_json
from ..core.config import SamplerConfig
from ..core.errors import ArtifactError, InputError
from ..core.log import Say
from ..core.noise import sample_noise
from ..core.provenance import Provenance
from .dp import plot_heatmap, schedule_cost, similarity, solve_dp

TEMPLATE_SAMPLES = 8  # the official sharing_dp template batch
TEMPLATE_SEED = 0
SCHEDULE_FIELDS = ("weights", "model", "sampler")  # what a DP schedule depends on besides N and K

SCHEDULE_KINDS = ("all", "uniform:R", "dp:K", "FILE.json")


@dataclass(frozen=True)
class ScheduleSpec:
    kind: str  # all | uniform | dp | file
    value: int | None = None  # R for uniform, K for dp
    path: Path | None = None


def parse_spec(text: str) -> ScheduleSpec:
    """`all`, `uniform:R`, `dp:K` or a path to a schedule JSON."""
    text = str(text).strip()
    if text == "all":
        return ScheduleSpec("all")
    head, sep, tail = text.partition(":")
    if sep and head in ("uniform", "dp"):
        try:
            value = int(tail)
        except ValueError:
            raise InputError("--schedule", f"{head}:<positive integer>", text)
        if value < 1:
            raise InputError("--schedule", f"{head}:<positive integer>", text)
        return ScheduleSpec(head, value)
    path = Path(text)
    if path.suffix == ".json":
        if not path.is_file():
            raise InputError("--schedule", "an existing schedule JSON file", text)
        return ScheduleSpec("file", path=path)
    raise InputError("--schedule", " | ".join(SCHEDULE_KINDS), text)


def validate_steps(steps: Sequence[int], num_steps: int, where: str = "schedule") -> list[int]:
    """Recompute steps as a sorted list of distinct ints in [0, N) starting at 0, else InputError."""
    try:
        out = [int(s) for s in steps]
    except (TypeError, ValueError):
        raise InputError(where, "a list of integer steps", repr(steps)[:80])
    if any(o != s for o, s in zip(out, steps) if isinstance(s, float)):
        raise InputError(where, "integer steps", repr(list(steps))[:80])
    if not out:
        raise InputError(where, "at least one recompute step (step 0)", "none")
    if out != sorted(set(out)):
        raise InputError(where, "strictly increasing steps", out)
    if out[0] != 0:
        raise InputError(where, "step 0 first (the first step has no state to reuse)", out[0])
    if out[-1] >= num_steps:
        raise InputError(where, f"steps in [0, {num_steps}) for {num_steps} sampling steps", out[-1])
    return out


def uniform_steps(num_steps: int, rate: int) -> list[int]:
    """Every rate-th step from 0: the official `i % state_refresh_rate == 0`."""
    if rate < 1:
        raise InputError("uniform:R", "R >= 1", rate)
    return list(range(0, num_steps, rate))


def read_schedule_json(path: Path, num_steps: int) -> list[int]:
    """Recompute steps from a schedule JSON; its num_steps, when recorded, must equal N."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"schedule {path}", "a readable JSON file", str(e))
    if not isinstance(doc, dict) or "recompute_steps" not in doc:
        raise InputError(f"schedule {path}", '{"recompute_steps": [...], ...}', type(doc).__name__ if not
                         isinstance(doc, dict) else f"keys {sorted(doc)}")
    if "num_steps" in doc and doc["num_steps"] != num_steps:
        raise InputError(f"schedule {path}: num_steps", num_steps, doc["num_steps"],
                         "the schedule was computed for another step count")
    return validate_steps(doc["recompute_steps"], num_steps, f"schedule {path}: recompute_steps")


def steps_for(spec: ScheduleSpec, num_steps: int) -> list[int]:
    """Steps for every kind but `dp`, which needs the engines (see `resolve_schedule`)."""
    if spec.kind == "all":
        return list(range(num_steps))
    if spec.kind == "uniform":
        return uniform_steps(num_steps, spec.value)
    if spec.kind == "file":
        return read_schedule_json(spec.path, num_steps)
    raise AssertionError(f"{spec.kind} schedules are resolved against engines")


def default_schedule(sampler: SamplerConfig) -> str:
    """The schedule with no --schedule: `all`, or uniform:R for a sampler with state_refresh_rate R (the official)."""
    return "all" if sampler.state_refresh_rate == 1 else f"uniform:{sampler.state_refresh_rate}"


def schedule_record(steps: list[int], num_steps: int, **settings) -> dict:
    return {"recompute_steps": list(map(int, steps)), "num_steps": num_steps, "recompute": len(steps), **settings}


def write_schedule(path: Path, record: dict) -> Path:
    write_json(Path(path), record)
    return Path(path)


def schedule_provenance(engines, sampler: SamplerConfig, seed: int = TEMPLATE_SEED) -> Provenance:
    """What a DP schedule computed on `engines` under `sampler` depends on (the template in options)."""
    return engines.manifest.provenance.replace(
        sampler=sampler, precision=None, batch=None, vae=None, platform={},
        options={"template": f"{TEMPLATE_SAMPLES} samples, seed {seed}"})


def compute_schedule(engines, sampler: SamplerConfig, recompute: int, *, seed: int = TEMPLATE_SEED,
                     progress=None) -> tuple[dict, np.ndarray]:
    """Template trajectory on the engines -> similarity (N, N) float64 -> DP. Returns (schedule record, sim)."""
    from .host import record_states

    n, m = sampler.num_steps, engines.config.model
    if not 1 <= recompute <= n:
        raise InputError("--recompute K", f"1 <= K <= --steps = {n}", recompute)
    noise = sample_noise(seed, range(TEMPLATE_SAMPLES), m.latent_shape)  # (8, C, H, W), per sample
    labels = np.random.default_rng(seed).integers(0, m.num_classes, TEMPLATE_SAMPLES, dtype=np.int64)
    sim = similarity(record_states(engines, noise, labels, sampler, progress=progress))  # (N, N) float64
    steps, cost = solve_dp(sim, recompute)
    rate = math.ceil(n / recompute)  # the sparsest uniform schedule with no more steps than the DP's
    base = uniform_steps(n, rate)
    uniform = {"rate": rate, "recompute": len(base), "cost": schedule_cost(sim, base)}
    record = schedule_record(steps, n, method="dp", cost=cost, uniform=uniform,
                             provenance=schedule_provenance(engines, sampler, seed).to_dict())
    return record, sim


def model_label(engines) -> str:
    return engines.config.name + (" (random weights)" if engines.manifest.provenance.weights_kind == "random" else "")


def store_schedule(out_dir: Path, record: dict, sim: np.ndarray, name: str = "") -> dict[str, Path]:
    """similarity-N.npy, schedule-N-K.json and schedule-N-K.png in `out_dir`."""
    n, k, out = record["num_steps"], record["recompute"], Path(out_dir)
    paths = {"similarity": save_npy(out / f"similarity-{n}.npy", sim),
             "json": write_schedule(out / f"schedule-{n}-{k}.json", record)}
    paths["png"] = plot_heatmap(sim, record["recompute_steps"], out / f"schedule-{n}-{k}.png",
                                f"{name}: 1 - cos sim of encoder states, N={n}, K={k}")
    return paths


def schedule_from_similarity(sim_path: Path, recompute: int, out: Path) -> tuple[dict, dict[str, Path]]:
    """Solve the DP from a saved similarity matrix; writes `out` (.json) and the heatmap beside it."""
    sim = load_npy(sim_path, "--from-similarity")
    steps, cost = solve_dp(sim, recompute)
    record = schedule_record(steps, int(sim.shape[0]), method="dp", cost=cost, similarity=str(sim_path))
    out = Path(out)
    return record, {"json": write_schedule(out, record), "png": plot_heatmap(sim, steps, out.with_suffix(".png"))}


def stored_schedule(path: Path, asked: Provenance, num_steps: int) -> tuple[list[int] | None, str]:
    """(steps, "") from a stored dp schedule whose provenance fits `asked`, else (None, why not)."""
    if not path.is_file():
        return None, "no stored schedule for these settings"
    try:
        rec = json.loads(path.read_text())
        built = Provenance.from_dict(rec["provenance"], str(path))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ArtifactError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"
    diffs = built.diff(asked, SCHEDULE_FIELDS)
    if diffs:
        return None, f"{path} was computed under other settings ({'; '.join(diffs)})"
    return validate_steps(rec["recompute_steps"], num_steps, str(path)), ""


def resolve_schedule(spec: str | None, engines, sampler: SamplerConfig, say: Say = print,
                     progress=None) -> tuple[list[int], str]:
    """Recompute steps for a --schedule spec (default: `default_schedule`); dp:K needs the engines."""
    if spec is None:
        spec = default_schedule(sampler)
    parsed = parse_spec(spec)
    if parsed.kind != "dp":
        return steps_for(parsed, sampler.num_steps), spec
    n, k = sampler.num_steps, parsed.value
    if k > n:
        raise InputError("--schedule dp:K", f"K <= {n} steps", k)
    path = engines.folder / f"schedule-{n}-{k}.json"
    steps, why = stored_schedule(path, schedule_provenance(engines, sampler), n)
    if steps is not None:
        say(f"schedule dp:{k}: using {path}")
        return steps, spec
    say(f"schedule dp:{k}: {why}; running the {TEMPLATE_SAMPLES}-sample template trajectory ({n} steps) and the DP")
    rec, sim = compute_schedule(engines, sampler, k, progress=progress)
    try:
        say(f"saved {store_schedule(engines.folder, rec, sim, model_label(engines))['json']}")
    except OSError as e:  # a read-only engine folder: use the schedule for this run only
        say(f"could not store the schedule in {engines.folder} ({e}); using it for this run only")
    return rec["recompute_steps"], spec


def make_schedule(recompute: int, *, engines_dir: Path | None = None, from_similarity: Path | None = None,
                  out: Path | None = None, steps: int | None = None, cfg: float | None = None,
                  seed: int = TEMPLATE_SEED, progress=None) -> tuple[dict, dict[str, Path]]:
    """`ddt-export schedule`: the DP on the engines' template trajectory (stored in the engine folder), or on a
    saved similarity matrix (written to `out`). Returns (schedule record, written files)."""
    if from_similarity is not None:
        if engines_dir is not None or out is None:
            raise InputError("schedule --from-similarity", "--out FILE.json and no --engines",
                             "--engines" if engines_dir is not None else "no --out")
        return schedule_from_similarity(from_similarity, recompute, out)
    if engines_dir is None:
        raise InputError("schedule", "--engines DIR (or --from-similarity SIM.npy)", "neither")
    from .engines import load_engines
    from .generate import sampler_for

    with load_engines(engines_dir) as engines:
        sampler = sampler_for(engines, steps, cfg)
        rec, sim = compute_schedule(engines, sampler, recompute, seed=seed, progress=progress)
        return rec, store_schedule(engines_dir, rec, sim, model_label(engines))
