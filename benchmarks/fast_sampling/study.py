"""The fast-sampling study's shared pieces: the engines, cached samples of any plan structure, paired scores.

Protocol (as benchmarks/fp8_sensitivity.py): fp32 ONNX Runtime engines of the bundled model (`build --precision
fp32`), the production host loop (`runtime.sample`); sample i of seed S from `core.noise` (the same noise for
every plan and the reference), classes cycled by index; digits features of the samples against the bundled
statistics (and images, for ADM's precision and recall) of all 1797 real digits. dFID = FID(plan, data) -
FID(reference, data) per seed; the paired bootstrap resamples the sample indices (the same on both sides) 1000
times per seed, and the 95% interval is that of the 3-seed mean. Samples are cached in chunks of 500 per plan
and seed under engines/fast_sampling/cache (a longer run extends a shorter one: per-sample noise), and results
go to results.json as each one is measured, so a rerun repeats nothing finished.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from ddt_export.core.artifacts import atomic_path, write_json  # noqa: E402
from ddt_export.core.noise import StepNoise, sample_noise  # noqa: E402
from ddt_export.runtime import load_engines, sample  # noqa: E402
from ddt_export.runtime.sampling.request import RequestInput, resolve  # noqa: E402
from ddt_export.runtime.sampling.schedules import (schedule_from_states, schedule_provenance,  # noqa: E402
                                                   template_states)
from ddt_export.runtime.sampling.grammar import parse_schedule, steps_for  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
WORK = ROOT / "engines" / "fast_sampling"
CHUNK = 500  # samples per cached chunk
BUDGET, RECALL, TARGET_SPEEDUP = 0.1, 0.01, 5.0  # the target: mean |dFID| <= 0.1, recall within 0.01, 5x


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save(section: str, key: str, value) -> None:
    """One result into results.json; a lock in WORK serializes the steps that run at the same time."""
    import fcntl

    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for the other step's read-modify-write
        res = load()
        res.setdefault(section, {})[key] = value
        write_json(RESULTS, res)


def limit_threads(n: int) -> None:
    """One intra-op thread per onnxruntime session: on a shared 2-core machine twice as fast as the default
    (benchmarks/fid_digits.py measured it). Throughput only: the numbers do not depend on it."""
    import onnxruntime as ort

    class Options(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.intra_op_num_threads = n

    ort.SessionOptions = Options


def digits_engines() -> Path:
    """The fp32 engines (built once; reused while their provenance matches). Steps started together take turns
    (a lock in WORK, as `save`): the first builds, the others then find the folder up to date. The build is
    the study's only writer holding the folder's own lock; another process holding it fails the step at once
    (the build's ArtifactError names it)."""
    import fcntl

    from ddt_export.builder.engine import BuildOptions, build

    out = WORK / "digits-fp32"
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for the other step's build or check of the folder
        build("fp32", BuildOptions(backend="onnxruntime"), out=out, say=lambda m: None)
    return out


@dataclasses.dataclass(frozen=True)
class Structure:
    """A plan's settings; `dp` says which error dp:K minimizes (None: the library's default for the sampler)."""

    solver: str = "euler"
    steps: int = 50
    schedule: str = "all"
    forecast: int = 0
    timeshift: float = 1.0
    interval: tuple = (0.3, 1.0)
    dp: str | None = None

    @property
    def key(self) -> str:
        iv = f"{self.interval[0]:g}-{self.interval[1]:g}"
        return (f"{self.solver.replace(':', '')}-{self.steps}-{self.schedule.replace(':', '')}-f{self.forecast}"
                f"-ts{self.timeshift:g}-cfg{iv}" + (f"-{self.dp}" if self.dp else ""))

    @staticmethod
    def of_plan(plan) -> "Structure":
        return Structure(plan.solver, plan.steps, plan.schedule, plan.forecast, plan.timeshift, tuple(plan.interval))


class Runner:
    """The engines, the digits features and data, and cached samples of any structure."""

    def __init__(self, folder: Path):
        from ddt_export.evaluate.features import DIGITS_STATS, DigitsFeatures
        from ddt_export.evaluate.suite import read_batch

        self.folder = folder
        self.engines = load_engines(folder, "onnxruntime")
        self.ext = DigitsFeatures()
        self.data = read_batch(DIGITS_STATS, lambda: self.ext)
        self.states: dict = {}

    def resolved(self, s: Structure):
        """(sampler, recompute steps) of a structure on these engines."""
        req = resolve(self.engines.config, RequestInput(steps=s.steps, solver=s.solver, forecast=s.forecast,
                                                        timeshift=s.timeshift, interval=s.interval))
        spec = parse_schedule(s.schedule)
        if spec.kind != "dp":
            return req.sampler, steps_for(spec, s.steps)
        key = dataclasses.replace(req.sampler, forecast=0)
        if key not in self.states:
            self.states[key] = template_states(self.engines, req.sampler)
        rec, _ = schedule_from_states(self.states[key], req.sampler, spec.value,
                                      schedule_provenance(self.engines.manifest, req.sampler), s.dp)
        return req.sampler, rec["recompute_steps"]

    def gflop(self, s: Structure) -> float:
        from ddt_export.core.flops import step_flops
        from ddt_export.runtime.sampling.plan import network_flops, plan_steps

        sampler, steps = self.resolved(s)
        f = step_flops(self.engines.config.model)
        return network_flops(plan_steps(sampler, steps), f.encoder, f.decoder) / 1e9

    def cache_key(self, s: Structure) -> str:
        """The structure without its DP method, and the recompute steps a dp:K resolved to (two methods that pick
        the same steps share their samples)."""
        import hashlib

        base = dataclasses.replace(s, dp=None).key
        if not s.schedule.startswith("dp:"):
            return base
        return base + "-" + hashlib.sha1(str(list(self.resolved(s)[1])).encode()).hexdigest()[:10]

    def chunk(self, s: Structure, seed: int, lo: int) -> dict:
        from ddt_export.core.images import images_from_samples

        path = WORK / "cache" / self.cache_key(s) / f"s{seed}-{lo:05d}.npz"
        if not path.is_file():
            sampler, steps = self.resolved(s)
            idx = range(lo, lo + CHUNK)
            m = self.engines.config.model
            t0 = time.time()
            lat = sample(self.engines, sample_noise(seed, idx, m.latent_shape),
                         np.arange(lo, lo + CHUNK) % m.num_classes, sampler, steps, rng=StepNoise(seed, idx))
            feats = self.ext.extract(images_from_samples(lat))
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a killed run leaves no half chunk
                np.savez(fh, latents=lat, features=feats, recompute=np.array(steps), seconds=time.time() - t0)
            say(f"  {s.key} seed {seed}: samples {lo}..{lo + CHUNK - 1} ({time.time() - t0:.0f} s)")
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def features(self, s: Structure, seed: int, num: int) -> np.ndarray:
        assert num % CHUNK == 0, num
        return np.concatenate([self.chunk(s, seed, lo)["features"] for lo in range(0, num, CHUNK)])

    def scores(self, feats: np.ndarray) -> dict:
        from ddt_export.evaluate.adm import precision_recall
        from ddt_export.evaluate.fid import fid, stats_from_features

        p, r = precision_recall(self.data.acts.pool, feats)
        return {"fid": fid(stats_from_features(feats), self.data.stats), "precision": p, "recall": r}


def bootstrap(a: np.ndarray, b: np.ndarray, data, draws: int, seed: int) -> np.ndarray:
    """FID(a) - FID(b) over `draws` resamplings of the sample indices (the same on both sides): (draws,)."""
    from ddt_export.evaluate.fid import fid, stats_from_features

    rng, out = np.random.default_rng(seed), np.empty(draws)
    for k in range(draws):
        idx = rng.integers(0, len(a), len(a))
        out[k] = fid(stats_from_features(a[idx]), data) - fid(stats_from_features(b[idx]), data)
    return out


def compare(run: Runner, s: Structure, ref: Structure, seeds: list[int], num: int, draws: int = 0) -> dict:
    """dFID, precision and recall deltas of `s` against the reference per seed (paired), their means, the
    bootstrap interval of the mean dFID (draws > 0)."""
    per = {seed: (run.features(s, seed, num), run.features(ref, seed, num)) for seed in seeds}
    sc = {seed: (run.scores(a), run.scores(b)) for seed, (a, b) in per.items()}
    row = {"structure": dataclasses.asdict(s), "key": s.key, "gflop": run.gflop(s), "num": num, "seeds": seeds,
           "fid": [sc[x][0]["fid"] for x in seeds], "fid_reference": [sc[x][1]["fid"] for x in seeds]}
    for k in ("fid", "precision", "recall"):
        row[f"d{k}"] = [sc[x][0][k] - sc[x][1][k] for x in seeds]
        row[f"mean_d{k}"] = statistics.mean(row[f"d{k}"])
    row["mean_abs_dfid"] = statistics.mean(abs(d) for d in row["dfid"])
    row["encoder_calls"] = len(run.resolved(s)[1])
    if draws:
        boots = [bootstrap(*per[x], run.data.stats, draws, 1000 + x) for x in seeds]
        mean = np.mean(boots, axis=0)
        row["ci95"] = [float(np.percentile(mean, 2.5)), float(np.percentile(mean, 97.5))]
        row["bootstrap_sd"] = [float(b.std(ddof=1)) for b in boots]
    return row
