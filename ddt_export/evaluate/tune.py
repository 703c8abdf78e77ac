"""`ddt-export tune`: search sampler plans on an engine folder's own model; store the frontier with the engines.

A plan fixes solver, steps, timeshift, encoder schedule, forecast order and guidance interval
(`runtime.sampling.plans`); what the search tries and its options are in `tune_space.py`. The search runs against
the model's reference trajectory (the manifest's sampler, its default schedule) with the paired protocol: every
candidate gets the same noise, labels and seeds as the reference (`core.noise`: sample i of seed S), so a difference
is the plan's alone. It fits a CPU by pruning:

0. the reference: `num` samples per seed, FID statistics, and FID's predictor around them (`fid.FidProbe`);
1. probe (cheap): each candidate on the first `probe` samples of the first seed, paired with the reference's:
   its predicted dFID (`FidProbe.predict`, from the paired features: on the digits model it tracks the measured
   dFID, where the final-latent error does not; docs/sampling.md), and the final-latent error
   ||x - x_ref|| / ||x_ref|| (the ranking metric without data statistics). In three stages, each on the last
   one's best:
   a. solver x steps x timeshift (encoder every step, no forecast, the reference's interval);
   b. for each step count, the `keep` best of (a) x encoder schedules (uniform:R, dp:K) x forecast orders;
   c. the probe frontier x other guidance intervals;
2. confirm (FID and recall), at most `confirm` candidates (`confirm_plan`): a walk, cheapest first, over every
   probed candidate whose |predicted dFID| is within the budget (not only the probe frontier's: the probe
   predicts FID, not recall, and on the digits model its cheapest Pareto points are few-step Euler plans that
   lose 0.07-0.12 of recall), stopping at the first that passes; then evenly spread points of the probe
   frontier (network GFLOP per image against |predicted dFID|) beyond it; each on `num` samples per seed: FID
   against the data (or the reference samples), ADM's precision and recall;
3. write: the frontier of |dFID| against network GFLOP per image (the FLOP model at the model's size,
   `plan.network_flops`) as ENGINES/plans/NAME.json, the model's own trajectory as `reference`, the cheapest
   plan within the budget (|dFID| <= max_fid_delta and |d recall| <= max_recall_delta, mean over seeds) as
   `fast`; plans/frontier.json (every candidate, the protocol) and plans/frontier.png. Plans of earlier runs are
   removed. With nothing within the budget, everything is written, no `fast`, and NumericsError says so.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..core.artifacts import library_versions
from ..core.errors import ConfigError, NumericsError
from ..core.flops import step_flops
from ..core.log import Progress, Say
from ..core.noise import StepNoise, sample_noise
from ..core.numerics import relative_errors
from ..runtime import Engines, load_engines, sample
from ..runtime.sampling.grammar import default_schedule
from ..runtime.sampling.plan import network_flops, plan_steps
from ..runtime.sampling.request import CLI, RequestInput, resolve
from ..runtime.sampling.schedules import (TEMPLATE_SAMPLES, model_label, schedule_from_states, schedule_provenance,
                                          schedule_steps, store_schedule, template_states)
from . import suite
from .adm import precision_recall
from .features import DIGITS_STATS
from .fid import FidProbe, fid, fid_probe, stats_from_features
from .frontier import cheapest_first, pareto, spread, walk
from .tune_space import Candidate, TuneOptions, check_options, encoder_variants, search_steps
from .tune_write import TuneResult, write_frontier
from .validate import choose_features, to_images


class _Work:
    """Progress in sample-steps (one sample through one sampling step), over stages whose totals are estimates
    until each stage is planned."""

    def __init__(self, progress: Progress | None):
        self.progress, self.done, self.estimates = progress, 0, {}

    def estimate(self, stage: str, units: int) -> None:
        self.estimates[stage] = units
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, max(self.done, sum(self.estimates.values())))

    def run(self, samples: int, steps: int):
        """A host-loop progress callback for `samples` going through `steps` steps."""
        base = self.done

        def tick(i: int, n: int) -> None:
            self.done = base + i * samples
            self.report()

        return tick


class _Search:
    """The engines, the reference, and every candidate run, with the DP's template states cached per trajectory."""

    def __init__(self, engines: Engines, o: TuneOptions, work: _Work, say: Say):
        self.engines, self.o, self.work, self.say = engines, o, work, say
        self.config = engines.config
        self.flops = step_flops(self.config.model)
        self.states: dict = {}  # template states per sampler (forecast aside: the template recomputes every step)

    def resolve(self, cand: Candidate, num: int, seed: int):
        """(sampler, recompute steps) of a candidate: checked as a request is, dp:K stored with the engines."""
        req = resolve(self.config, cand.given(num, seed), CLI)
        steps = schedule_steps(req.schedule, req.sampler, self.engines.manifest, self.engines.folder,
                               lambda k: self._dp(req.sampler, k), say=lambda m: None)
        return req.sampler, steps

    def _dp(self, sampler, k: int) -> list[int]:
        key = dataclasses.replace(sampler, forecast=0)
        if key not in self.states:
            self.work.done += TEMPLATE_SAMPLES * sampler.num_steps
            self.states[key] = template_states(self.engines, sampler)
        rec, sim = schedule_from_states(self.states[key], sampler, k,
                                        schedule_provenance(self.engines.manifest, sampler))
        try:
            store_schedule(self.engines.folder, rec, sim, model_label(self.engines))
        except OSError as e:  # a read-only folder: the schedule is recomputed wherever the plan is used
            self.say(f"could not store the dp:{k} schedule in {self.engines.folder} ({e})")
        return rec["recompute_steps"]

    def gflop(self, sampler, steps: Sequence[int]) -> float:
        return network_flops(plan_steps(sampler, steps), self.flops.encoder, self.flops.decoder) / 1e9

    def latents(self, sampler, steps: Sequence[int], seed: int, num: int, lo: int = 0) -> np.ndarray:
        """Final latents of samples lo..lo+num-1 of `seed` (classes cycled by index), in batches."""
        m, out = self.config.model, []
        for a in range(lo, lo + num, self.o.batch):
            idx = range(a, min(a + self.o.batch, lo + num))
            labels = np.arange(idx.start, idx.stop, dtype=np.int64) % m.num_classes
            out.append(sample(self.engines, sample_noise(seed, idx, m.latent_shape), labels, sampler, list(steps),
                              rng=StepNoise(seed, idx), progress=self.work.run(len(idx), sampler.num_steps)))
        return np.concatenate(out)

    def run(self, extractor, cand: Candidate, seed: int, num: int) -> tuple[np.ndarray, np.ndarray]:
        """(final latents, features (num, d)) of samples 0..num-1 of `seed` under the candidate."""
        sampler, steps = self.resolve(cand, num, seed)
        lat = self.latents(sampler, steps, seed, num)
        return lat, suite.activations_of(extractor, to_images(self.engines, lat, sampler.num_steps)).pool


@dataclass
class _Probe:
    """What a candidate is probed against: the reference's first `probe` samples of the first seed (latents and
    features) and the FID predictor at the reference's statistics (None without data: trajectory error only)."""

    latents: np.ndarray
    features: np.ndarray
    fid: FidProbe | None

    def metric(self, row: dict) -> float:
        """What the probe ranks by: |predicted dFID| with data statistics, else the trajectory error."""
        return abs(row["predicted_dfid"]) if self.fid is not None else row["trajectory_error"]


def _probe(search: _Search, extractor, cands: list[Candidate], probe: _Probe, rows: dict, stage: str) -> None:
    o = search.o
    for c in cands:
        if c in rows:
            continue
        sampler, steps = search.resolve(c, o.probe, o.seeds[0])
        row = {"candidate": c, "stage": stage, "gflop": search.gflop(sampler, steps), "encoder_calls": len(steps),
               "recompute_steps": list(steps)}
        try:
            lat, feats = search.run(extractor, c, o.seeds[0], o.probe)
            row["trajectory_error"] = float(relative_errors(lat, probe.latents).mean())
            if probe.fid is not None:
                row["predicted_dfid"] = probe.fid.predict(probe.features, feats)
            row["metric"] = probe.metric(row)
        except NumericsError as e:  # a candidate that diverges is recorded, never confirmed
            row["trajectory_error"] = row["metric"] = math.inf
            row["failed"] = str(e)
        rows[c] = row


def tune(engines_dir: Path, options: TuneOptions, *, progress: Progress | None = None, say: Say = print
         ) -> TuneResult:
    """The search in the module doc on the engine folder `engines_dir`; returns what it wrote. Raises
    NumericsError (after writing) when no candidate is within the budget."""
    o = options
    check_options(o)
    t0 = time.perf_counter()
    work = _Work(progress)
    with load_engines(engines_dir) as engines:
        extractor, why = choose_features(engines, o.features, o.inception_onnx)
        if extractor is None:
            raise ConfigError("feature extractor", "one, to confirm plans with FID", "none", why)
        stats = o.stats if o.stats is not None else (DIGITS_STATS if extractor.name == "digits" else None)
        data = suite.read_batch(Path(stats), lambda: extractor) if stats is not None else None
        search = _Search(engines, o, work, say)
        ref_req = resolve(engines.config, RequestInput(num=o.num, seed=o.seeds[0]), CLI)
        ref = Candidate(ref_req.sampler.solver, ref_req.sampler.num_steps, ref_req.sampler.timeshift,
                        tuple(ref_req.sampler.guidance_interval), default_schedule(ref_req.sampler),
                        ref_req.sampler.forecast)
        steps_list, intervals = search_steps(o, ref_req.sampler)
        sp = o.space
        stage_a = [Candidate(s, n, ts, ref.interval) for n in steps_list for s in sp.solvers for ts in sp.timeshifts]
        enc_count = len(encoder_variants(o, Candidate("euler", max(steps_list or [1]), 1.0, ref.interval)))
        work.estimate("reference", o.num * len(o.seeds) * ref.steps)
        work.estimate("probe", o.probe * (sum(c.steps for c in stage_a) + sp.keep * enc_count * sum(steps_list)))
        work.estimate("confirm", o.num * len(o.seeds) * o.confirm * max(steps_list or [1]))
        say(f"tune {engines.config.name}: reference {ref.solver}, {ref.steps} steps, {ref.schedule}: {o.num} samples "
            f"x {len(o.seeds)} seeds; then {len(stage_a)} solver candidates, probe {o.probe} samples")
        ref_runs = [search.run(extractor, ref, seed, o.num) for seed in o.seeds]
        ref_feats = [f for _, f in ref_runs]
        probe = _Probe(ref_runs[0][0][:o.probe], ref_feats[0][:o.probe],
                       fid_probe(stats_from_features(ref_feats[0]), data.stats) if data is not None else None)
        ref_sampler, ref_steps = search.resolve(ref, o.num, o.seeds[0])
        rows: dict[Candidate, dict] = {ref: {"candidate": ref, "stage": "reference", "trajectory_error": 0.0,
                                             "predicted_dfid": 0.0, "metric": 0.0,
                                             "gflop": search.gflop(ref_sampler, ref_steps),
                                             "encoder_calls": len(ref_steps), "recompute_steps": list(ref_steps)}}
        _probe(search, extractor, stage_a, probe, rows, "solver")
        best = []
        for n in steps_list:
            ranked = sorted((r for c, r in rows.items() if r["stage"] == "solver" and c.steps == n),
                            key=lambda r: r["metric"])
            best += [r["candidate"] for r in ranked[:sp.keep] if math.isfinite(r["metric"])]
        _probe(search, extractor, [v for b in best for v in encoder_variants(o, b)], probe, rows, "encoder")
        front = pareto(list(rows.values()), lambda r: (r["gflop"], r["metric"]))
        _probe(search, extractor, [dataclasses.replace(r["candidate"], interval=iv) for r in front
                                   if r["candidate"] != ref for iv in intervals], probe, rows, "interval")
        front = [r for r in pareto(list(rows.values()), lambda r: (r["gflop"], r["metric"]))
                 if r["candidate"] != ref and math.isfinite(r["metric"])]
        for r in front:
            r["frontier"] = True
        rows[ref]["frontier"] = True
        say(f"probed {len(rows) - 1} candidates; {len(front)} on the frontier of "
            + ("|predicted dFID|" if probe.fid is not None else "trajectory error") + " against GFLOP")
        confirmed = _confirm(search, extractor, data, ref_feats, list(rows.values()), front, rows[ref],
                             probe.fid is not None)
        protocol = _protocol(o, engines, ref_req, extractor, data, stats)
        return write_frontier(engines, o, rows, confirmed, protocol, time.perf_counter() - t0, say)


def confirm_plan(rows: Sequence[dict], front: Sequence[dict], budget: float | None, limit: int,
                 measure: Callable[[dict], bool], planned: Callable[[list[dict]], None] = lambda rs: None
                 ) -> list[dict]:
    """Which probed rows the confirm stage measures (`measure`: FID and recall on the full sample, True when
    within the budget), at most `limit`, in the order measured:

    1. the walk: cheapest first, every probed candidate the probe predicts within the budget (|predicted dFID|
       <= `budget`), not only the probe's Pareto points (the probe predicts FID, not recall: the cheapest of its
       Pareto points can lose recall where a costlier one off that set keeps it), one of each set of identical
       probe results (the same trajectory under another name); it stops at the first that passes, the cheapest
       within the budget of all it could reach. Without a FID predictor (`budget` None) it walks the probe
       frontier;
    2. the rest of `limit`, evenly spread over the probe frontier beyond the one found (the frontier's shape).
    `planned` gets what is measured and what is still to be, first the walk's upper bound, then the truth."""
    probed = [r for r in rows if r["stage"] != "reference" and math.isfinite(r["metric"])]
    pool = front if budget is None else [r for r in probed if r["metric"] <= budget]
    order = cheapest_first(pool, lambda r: r["gflop"], lambda r: r["metric"],
                           lambda r: (r["gflop"], r["trajectory_error"], r.get("predicted_dfid")))
    planned(order[:limit])
    done, found = walk(order, measure, limit)
    seen = {id(r) for r in done}
    rest = [r for r in front if id(r) not in seen and r["stage"] != "reference"
            and (found is None or r["gflop"] > found["gflop"])]
    extra = spread(rest, limit - len(done)) if limit > len(done) else []
    planned(done + extra)
    for r in extra:
        measure(r)
    return done + extra


def _confirm(search: _Search, extractor, data, ref_feats: list[np.ndarray], rows: list[dict], front: list[dict],
             base: dict, fid_probe: bool) -> list[dict]:
    """FID and recall on the candidates `confirm_plan` chooses; each confirmed row gets its per-seed FIDs,
    precision and recall and their deltas against the reference."""
    o = search.o
    base.update(seeds=_scores(ref_feats, data, ref_feats), dfid=0.0, dprecision=0.0, drecall=0.0,
                within_budget=True, dfid_per_seed=[0.0] * len(o.seeds))

    def measure(row: dict) -> bool:
        c = row["candidate"]
        feats = [search.run(extractor, c, seed, o.num)[1] for seed in o.seeds]
        s, b = _scores(feats, data, ref_feats), base["seeds"]
        row.update(seeds=s, dfid_per_seed=[x - y for x, y in zip(s["fid"], b["fid"])])
        row["dfid"] = statistics.mean(row["dfid_per_seed"])
        row["dprecision"] = statistics.mean(s["precision"]) - statistics.mean(b["precision"])
        row["drecall"] = statistics.mean(s["recall"]) - statistics.mean(b["recall"])
        row["within_budget"] = abs(row["dfid"]) <= o.max_fid_delta and abs(row["drecall"]) <= o.max_recall_delta
        search.say(f"  {c.solver} {c.steps} steps {c.schedule} forecast {c.forecast} shift {c.timeshift:g} interval "
                   f"{list(c.interval)}: {row['gflop']:.3g} GFLOP, dFID {row['dfid']:+.3f}"
                   + (f" (predicted {row['predicted_dfid']:+.3f})" if "predicted_dfid" in row else "")
                   + f", d recall {row['drecall']:+.4f}" + (" (within budget)" if row["within_budget"] else ""))
        return row["within_budget"]

    def planned(rs: list[dict]) -> None:
        search.work.estimate("confirm", o.num * len(o.seeds) * sum(r["candidate"].steps for r in rs))

    measured = confirm_plan(rows, front, o.max_fid_delta if fid_probe else None, o.confirm, measure, planned)
    return [base] + sorted(measured, key=lambda r: r["gflop"])


def _scores(per_seed: list[np.ndarray], data, reference: list[np.ndarray]) -> dict:
    """Per seed: FID against the data (or the reference samples), ADM's precision and recall against the data's
    images (or the reference samples). Features (num, d) per seed, the reference's of the same seeds."""
    out = {"fid": [], "precision": [], "recall": []}
    for feats, ref in zip(per_seed, reference):
        against = data.stats if data is not None else stats_from_features(ref)
        images = data.acts.pool if data is not None and data.acts is not None else ref
        out["fid"].append(fid(stats_from_features(feats), against))
        p, r = precision_recall(images, feats)
        out["precision"].append(p)
        out["recall"].append(r)
    return out


def _protocol(o: TuneOptions, engines: Engines, ref_req, extractor, data, stats) -> dict:
    images = data is not None and data.acts is not None
    return {"seeds": list(o.seeds), "samples": o.num, "probe_samples": o.probe, "probe_seed": o.seeds[0],
            "noise": "sample i of seed S: numpy default_rng([S, i]) (core.noise), the same for every candidate",
            "labels": f"0..{engines.config.model.num_classes - 1} cycled by sample index",
            "reference": {"sampler": dataclasses.asdict(ref_req.sampler),
                          "schedule": default_schedule(ref_req.sampler)},
            "features": extractor.name,
            "fid_against": str(stats) if data is not None else "the reference samples",
            "precision_recall_against": f"the images of {stats}" if images else "the reference samples",
            "budget": {"max_fid_delta": o.max_fid_delta, "max_recall_delta": o.max_recall_delta,
                       "rule": "|mean over seeds of dFID| <= max_fid_delta and |d recall| <= max_recall_delta"},
            "space": dataclasses.asdict(o.space), "versions": library_versions(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
