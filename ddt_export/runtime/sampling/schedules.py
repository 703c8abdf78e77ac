"""Where `dp:K` schedules come from, and every schedule's recompute steps. Torch-free.

The grammar (`all | uniform:R | dp:K | FILE.json`) is `grammar.py`'s; this module resolves a request's schedule
to steps. A `dp:K` schedule comes from the statistical DP (`runtime.sampling.dp`) on a template trajectory run
on the engines themselves; it is stored in the engine folder (`schedule-N-K.json`, `similarity-N.npy`, a
heatmap; settings other than those holding these names under `schedule-N-K-<digest>`, `schedule_stem`) with the
provenance it was computed under, and reused only when that provenance's weights, model and
sampler equal the engines' (`Provenance.diff`), else computed again (the caller is told which). One resolver
(`schedule_steps`) serves every caller; how a missing dp:K is computed is the caller's (here, on the engines;
`generate --ray`, on a worker). The DP minimizes the reuse error (the official), also under encoder forecasting
(`DP_ON_FORECAST` False, the measured choice: docs/sampling.md); the forecast's error (`dp.solve_forecast_dp`,
order 1) is there on request (`schedule --dp-error forecast`). A stored schedule is reused only when it was
computed on the error the default asks for (its `method`), so the two never mix.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from ...core.artifacts import load_npy, save_npy, write_json
from ...core.config import SamplerConfig
from ...core.errors import ArtifactError, InputError
from ...core.log import Progress, Say
from ...core.manifest import Manifest
from ...core.noise import sample_noise
from ...core.provenance import Provenance
from ..graphs.engines import Engines, load_engines
from ...core.sampling import step_times
from .dp import (forecast_errors, forecast_schedule_cost, plot_heatmap, schedule_cost, similarity,
                 solve_dp, solve_forecast_dp)
from .grammar import ScheduleSpec, steps_for, uniform_steps, validate_steps
from .host import record_states
from .request import CLI, RequestInput, SampleRequest, resolve_sampler

TEMPLATE_SAMPLES = 8  # the official sharing_dp template batch
TEMPLATE_SEED = 0
SCHEDULE_FIELDS = ("weights", "model", "sampler")  # what a DP schedule depends on besides N and K
DP_METHODS = ("reuse", "forecast")  # the error the DP minimizes (`dp_method`)
METHOD_NAMES = {"reuse": "dp", "forecast": "dp-forecast1"}  # a stored schedule's `method`
# Under forecasting, does dp:K minimize the forecast's error? Measured no (docs/sampling.md, benchmarks/fast_sampling:
# adams:2, 12 steps, forecast 2, 3 seeds x 500: dFID +0.103 vs -0.004 at K = 6, +1.158 vs +0.246 at K = 4).
DP_ON_FORECAST = False


def stored_method(record: dict) -> str:
    """A stored schedule's `method` (METHOD_NAMES' values); a record written before it was recorded is the reuse
    DP's."""
    return record.get("method", METHOD_NAMES["reuse"])


def schedule_record(steps: list[int], num_steps: int, **settings) -> dict:
    return {"recompute_steps": list(map(int, steps)), "num_steps": num_steps, "recompute": len(steps), **settings}


def write_schedule(path: Path, record: dict) -> Path:
    write_json(Path(path), record)
    return Path(path)


def schedule_provenance(manifest: Manifest, sampler: SamplerConfig, seed: int = TEMPLATE_SEED) -> Provenance:
    """What a DP schedule computed on a folder's engines under `sampler` depends on (the template in options)."""
    return manifest.provenance.replace(
        sampler=sampler, precision=None, batch=None, vae=None, platform={},
        options={"template": f"{TEMPLATE_SAMPLES} samples, seed {seed}"})


def template_states(engines: Engines, sampler: SamplerConfig, seed: int = TEMPLATE_SEED,
                    progress: Progress | None = None) -> np.ndarray:
    """The encoder states (N, 2B, L, D) float32 of the template trajectory: TEMPLATE_SAMPLES samples of `seed`,
    every step recomputed, the full CFG batch."""
    m = engines.config.model
    noise = sample_noise(seed, range(TEMPLATE_SAMPLES), m.latent_shape)  # (8, C, H, W), per sample
    labels = np.random.default_rng(seed).integers(0, m.num_classes, TEMPLATE_SAMPLES, dtype=np.int64)
    return record_states(engines, noise, labels, sampler, progress=progress)


def dp_method(sampler: SamplerConfig, method: str | None = None) -> str:
    """Which error the DP minimizes: `reuse` (the official: 1 - cos of the reused state) or `forecast` (of the
    state the sampler's forecast gives, `dp.forecast_errors`). Default: DP_ON_FORECAST when the sampler
    forecasts, else reuse."""
    if method is None:
        return "forecast" if sampler.forecast > 0 and DP_ON_FORECAST else "reuse"
    if method not in DP_METHODS:
        raise InputError("--dp-error", " | ".join(DP_METHODS), method)
    return method


def schedule_from_states(states: np.ndarray, sampler: SamplerConfig, recompute: int, provenance: Provenance,
                         method: str | None = None) -> tuple[dict, np.ndarray]:
    """The DP's K recompute steps from template states (N, B, L, D). Returns (schedule record, sim (N, N))."""
    n = sampler.num_steps
    if not 1 <= recompute <= n:
        raise InputError("--recompute K", f"1 <= K <= --steps = {n}", recompute)
    sim = similarity(states)  # (N, N) float64: the heatmap, and the reuse DP's input
    rate = math.ceil(n / recompute)  # the sparsest uniform schedule with no more steps than the DP's
    base = uniform_steps(n, rate)
    method = dp_method(sampler, method)
    if method == "forecast":  # the state a step gets is the order-1 forecast from the last two recompute steps
        errors = forecast_errors(states, step_times(sampler)[0], order=1)
        steps, cost = solve_forecast_dp(errors, recompute)
        base_cost = forecast_schedule_cost(errors, base)
    else:
        steps, cost = solve_dp(sim, recompute)
        base_cost = schedule_cost(sim, base)
    uniform = {"rate": rate, "recompute": len(base), "cost": base_cost}
    record = schedule_record(steps, n, method=METHOD_NAMES[method], cost=cost,
                             uniform=uniform, provenance=provenance.to_dict())
    return record, sim


def compute_schedule(engines: Engines, sampler: SamplerConfig, recompute: int, *, seed: int = TEMPLATE_SEED,
                     progress: Progress | None = None, method: str | None = None) -> tuple[dict, np.ndarray]:
    """Template trajectory on the engines -> similarity (N, N) float64 -> DP. Returns (schedule record, sim)."""
    n = sampler.num_steps
    if not 1 <= recompute <= n:
        raise InputError("--recompute K", f"1 <= K <= --steps = {n}", recompute)
    states = template_states(engines, sampler, seed, progress)
    return schedule_from_states(states, sampler, recompute, schedule_provenance(engines.manifest, sampler, seed),
                                method)


def model_label(engines: Engines) -> str:
    return engines.config.name + (" (random weights)" if engines.manifest.provenance.weights_kind == "random" else "")


def schedule_stem(folder: Path, n: int, k: int, settings: Provenance, method_name: str) -> Path:
    """The one file (without suffix) a dp:K schedule of these settings lives in: `schedule-N-K` when that name is
    free or holds these settings (or a stale schedule of other weights or another model, which it replaces),
    else `schedule-N-K-<digest of the settings>`. So schedules of different settings (another cfg, solver,
    timeshift) each keep their own file instead of replacing each other's, and a server that alternates
    between them computes each once."""
    canonical = Path(folder) / f"schedule-{n}-{k}"
    try:
        rec, held = _read_stored(canonical.with_suffix(".json"))
    except UNREADABLE:
        return canonical  # free, or unreadable: nothing worth keeping there
    if held.diff(settings, ("weights", "model")) or (
            not held.diff(settings, SCHEDULE_FIELDS) and stored_method(rec) == method_name):
        return canonical
    return _digest_stem(folder, n, k, settings, method_name)


def _digest_stem(folder: Path, n: int, k: int, settings: Provenance, method_name: str) -> Path:
    d = settings.to_dict()
    key = json.dumps({**{f: d[f] for f in SCHEDULE_FIELDS}, "method": method_name}, sort_keys=True, default=str)
    return Path(folder) / f"schedule-{n}-{k}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def store_schedule(out_dir: Path, record: dict, sim: np.ndarray, name: str = "") -> dict[str, Path]:
    """schedule-N-K.json, its heatmap schedule-N-K.png and the similarity matrix similarity-N.npy in `out_dir`
    (for settings other than those holding these names: schedule-N-K-<digest>.*, similarity-N-<digest>.npy;
    `schedule_stem`)."""
    n, k = record["num_steps"], record["recompute"]
    settings = Provenance.from_dict(record["provenance"], "schedule record")
    stem = schedule_stem(Path(out_dir), n, k, settings, stored_method(record))
    sim_path = stem.with_name(stem.name.replace(f"schedule-{n}-{k}", f"similarity-{n}", 1) + ".npy")
    paths = {"similarity": save_npy(sim_path, sim),
             "json": write_schedule(stem.with_suffix(".json"), record)}
    paths["png"] = plot_heatmap(sim, record["recompute_steps"], stem.with_suffix(".png"),
                                f"{name}: 1 - cos sim of encoder states, N={n}, K={k}")
    return paths


def schedule_from_similarity(sim_path: Path, recompute: int, out: Path) -> tuple[dict, dict[str, Path]]:
    """Solve the DP from a saved similarity matrix; writes `out` (.json) and the heatmap beside it."""
    sim = load_npy(sim_path, "--from-similarity")
    steps, cost = solve_dp(sim, recompute)
    record = schedule_record(steps, int(sim.shape[0]), method="dp", cost=cost, similarity=str(sim_path))
    out = Path(out)
    return record, {"json": write_schedule(out, record), "png": plot_heatmap(sim, steps, out.with_suffix(".png"))}


UNREADABLE = (OSError, json.JSONDecodeError, KeyError, TypeError, ArtifactError)  # what `_read_stored` raises


def _read_stored(path: Path) -> tuple[dict, Provenance]:
    """A stored schedule record and the provenance it was computed under."""
    rec = json.loads(Path(path).read_text())
    return rec, Provenance.from_dict(rec["provenance"], str(path))


def stored_schedule(path: Path, asked: Provenance, num_steps: int, method: str = "reuse"
                    ) -> tuple[list[int] | None, str]:
    """(steps, "") from a stored dp schedule whose provenance fits `asked` and which minimized `method`'s error,
    else (None, why not)."""
    if not path.is_file():
        return None, "no stored schedule for these settings"
    try:
        rec, built = _read_stored(path)
    except UNREADABLE as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"
    diffs = built.diff(asked, SCHEDULE_FIELDS)
    if diffs:
        return None, f"{path} was computed under other settings ({'; '.join(diffs)})"
    if stored_method(rec) != METHOD_NAMES[method]:
        return None, f"{path} minimized another error ({stored_method(rec)}, not {METHOD_NAMES[method]})"
    return validate_steps(rec["recompute_steps"], num_steps, str(path)), ""


def schedule_steps(spec: ScheduleSpec, sampler: SamplerConfig, manifest: Manifest, folder: Path,
                   compute: Callable[[int], list[int]], say: Say = print) -> list[int]:
    """Recompute steps of a parsed schedule: every kind but dp:K directly; dp:K from the folder's stored schedule
    when its provenance fits, else `compute(K)` (the template trajectory and the DP, wherever the caller runs
    them)."""
    if spec.kind != "dp":
        return steps_for(spec, sampler.num_steps)
    n, k = sampler.num_steps, spec.value
    if k > n:
        raise InputError("schedule dp:K", f"K <= {n} steps", k)
    asked, method = schedule_provenance(manifest, sampler), dp_method(sampler)
    why = ""
    for stem in (Path(folder) / f"schedule-{n}-{k}", _digest_stem(folder, n, k, asked, METHOD_NAMES[method])):
        steps, not_here = stored_schedule(stem.with_suffix(".json"), asked, n, method)
        if steps is not None:
            say(f"schedule dp:{k}: using {stem.with_suffix('.json')}")
            return steps
        why = why or not_here
    say(f"schedule dp:{k}: {why}; running the {TEMPLATE_SAMPLES}-sample template trajectory ({n} steps) and the DP")
    return compute(k)


def computed_schedule(engines: Engines, sampler: SamplerConfig, k: int, say: Say = print,
                      progress: Progress | None = None) -> list[int]:
    """dp:K run now on the engines, and stored in their folder (a read-only folder: used for this run only)."""
    rec, sim = compute_schedule(engines, sampler, k, progress=progress)
    try:
        say(f"saved {store_schedule(engines.folder, rec, sim, model_label(engines))['json']}")
    except OSError as e:
        say(f"could not store the schedule in {engines.folder} ({e}); using it for this run only")
    return rec["recompute_steps"]


def with_schedule(request: SampleRequest, manifest: Manifest, folder: Path, compute: Callable[[int], list[int]],
                  say: Say = print) -> SampleRequest:
    """The request with its recompute steps from `schedule_steps` (`compute(K)` where a dp:K must be computed);
    a request that has them already (`SampleRequest.recompute`: a dp:K plan's recorded steps, set by
    `request.pinned_steps`) as it is."""
    if request.recompute is not None:
        return request
    return request.with_steps(schedule_steps(request.schedule, request.sampler, manifest, folder, compute, say))


def resolve_schedule(request: SampleRequest, engines: Engines, say: Say = print,
                     progress: Progress | None = None) -> SampleRequest:
    """The request with its recompute steps (dp:K: stored with the engines, or computed on them now)."""
    return with_schedule(request, engines.manifest, engines.folder,
                         lambda k: computed_schedule(engines, request.sampler, k, say, progress), say)


def make_schedule(recompute: int, *, engines_dir: Path | None = None, from_similarity: Path | None = None,
                  out: Path | None = None, given: RequestInput = RequestInput(), seed: int = TEMPLATE_SEED,
                  progress: Progress | None = None, method: str | None = None) -> tuple[dict, dict[str, Path]]:
    """`ddt-export schedule`: the DP on the engines' template trajectory (stored in the engine folder), or on a
    saved similarity matrix (written to `out`). `given`: the sampler overrides (steps, cfg); `method`: the error
    the DP minimizes (`dp_method`). Returns (schedule record, written files)."""
    if from_similarity is not None:
        if engines_dir is not None or out is None:
            raise InputError("schedule --from-similarity", "--out FILE.json and no --engines",
                             "--engines" if engines_dir is not None else "no --out")
        if method not in (None, "reuse"):
            raise InputError("--dp-error with --from-similarity", "reuse (a similarity matrix has no forecast)",
                             method)
        return schedule_from_similarity(from_similarity, recompute, out)
    if engines_dir is None:
        raise InputError("schedule", "--engines DIR (or --from-similarity SIM.npy)", "neither")
    with load_engines(engines_dir) as engines:
        sampler = resolve_sampler(engines.config.sampler, given, CLI)
        rec, sim = compute_schedule(engines, sampler, recompute, seed=seed, progress=progress, method=method)
        return rec, store_schedule(engines_dir, rec, sim, model_label(engines))
