"""What `tune` writes into the engine folder: the frontier's plans, `fast`, plans/frontier.json and .png.

Every file is written to a temporary name and renamed (`core.artifacts`), under the engine folder's lock; plans
of an earlier tune that are not on the new frontier are removed last, so the folder never mixes two searches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..core.artifacts import folder_lock, write_json
from ..core.errors import NumericsError
from ..core.log import Say
from ..runtime import Engines
from ..runtime.sampling.plans import FAST, Plan, plan_names, plan_path, write_plan
from .frontier import REFERENCE, frontier_paths, pareto, plan_name, plot_frontier

KIND = "ddt-export tune"


@dataclass
class TuneResult:
    record: dict  # plans/frontier.json
    plans: dict[str, Path] = field(default_factory=dict)  # name -> file written
    fast: str | None = None  # the structure `fast` names (its descriptive name); None when nothing is within


def _finite(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


def candidate_record(row: dict, reference_interval) -> dict:
    """A row of the search as JSON: the candidate's settings, its cost and errors."""
    c = row["candidate"]
    name = REFERENCE if row["stage"] == "reference" else plan_name(
        c.solver, c.steps, c.schedule, c.forecast, c.timeshift, c.interval, reference_interval)
    rec = {"name": name, "stage": row["stage"], "solver": c.solver, "steps": c.steps, "schedule": c.schedule,
           "forecast": c.forecast, "timeshift": c.timeshift, "interval": list(c.interval), "gflop": row["gflop"],
           "encoder_calls": row["encoder_calls"], "recompute_steps": row["recompute_steps"],
           "trajectory_error": _finite(row["trajectory_error"]), "predicted_dfid": row.get("predicted_dfid"),
           "metric": _finite(row["metric"]), "frontier": bool(row.get("frontier"))}
    if "failed" in row:
        rec["failed"] = row["failed"]
    if "seeds" in row:
        rec.update(fid=row["seeds"]["fid"], precision=row["seeds"]["precision"], recall=row["seeds"]["recall"],
                   dfid=row["dfid"], dfid_per_seed=row["dfid_per_seed"], dprecision=row["dprecision"],
                   drecall=row["drecall"], within_budget=row["within_budget"])
    return rec


def measured(rec: dict, ref: dict, protocol: dict) -> dict:
    """What a plan file records it was measured to do (against the reference's samples of the same seeds)."""
    return {"dfid": rec["dfid"], "dfid_per_seed": rec["dfid_per_seed"], "fid": rec["fid"], "fid_reference": ref["fid"],
            "dprecision": rec["dprecision"], "drecall": rec["drecall"], "precision": rec["precision"],
            "recall": rec["recall"], "precision_reference": ref["precision"], "recall_reference": ref["recall"],
            "trajectory_error": rec["trajectory_error"], "predicted_dfid": rec["predicted_dfid"],
            "gflop_per_image": rec["gflop"],
            "reference_gflop_per_image": ref["gflop"], "speedup": ref["gflop"] / rec["gflop"],
            "encoder_calls": rec["encoder_calls"], "recompute_steps": rec["recompute_steps"],
            "within_budget": rec["within_budget"], "structure": rec["name"], "protocol": protocol}


def write_frontier(engines: Engines, o, rows: dict, confirmed: list[dict], protocol: dict, seconds: float,
                   say: Say):
    """Plans on the |dFID| frontier (the reference included), `fast`, the record and the plot; returns a
    TuneResult. NumericsError after writing when no candidate is within the budget."""
    ref_iv = confirmed[0]["candidate"].interval
    probed = [candidate_record(r, ref_iv) for r in rows.values()]
    done = [candidate_record(r, ref_iv) for r in confirmed]
    for rec in pareto(done, lambda r: (r["gflop"], abs(r["dfid"]))):
        rec["fid_frontier"] = True
    ref = done[0]
    within = [r for r in done[1:] if r["within_budget"]]
    fast = min(within, key=lambda r: (r["gflop"], abs(r["dfid"]))) if within else None
    plans = {}
    chosen = [(r["name"], r) for r in done if r.get("fid_frontier")] + ([(FAST, fast)] if fast else [])
    for name, rec in chosen:  # `fast` is also under its own name when it is on the frontier (it usually is)
        plans[name] = Plan(name, rec["steps"], rec["solver"], rec["forecast"], rec["timeshift"],
                           tuple(rec["interval"]), rec["schedule"], measured(rec, ref, protocol))
    if fast:
        fast["plan"] = FAST
    for rec in done:
        rec["frontier"] = bool(rec.get("fid_frontier"))
    record = {"kind": KIND, "engines": str(engines.folder), "model": engines.config.name,
              "weights": engines.manifest.provenance.weights, "protocol": protocol, "candidates": probed,
              "confirmed": done, "plans": sorted(plans), "fast": fast["name"] if fast else None,
              "seconds": seconds}
    folder = Path(engines.folder)
    json_path, png_path = frontier_paths(folder)
    written = {}
    with folder_lock(folder):
        for name, plan in plans.items():
            written[name] = write_plan(folder, plan, engines.manifest.provenance)
        write_json(json_path, record)
        plot_frontier(probed, done, o.max_fid_delta, png_path, "|predicted dFID| (probe)" if ref.get(
                      "predicted_dfid") is not None else "final-latent error vs the reference (probe)",
                      f"{engines.config.name}: plans against its {ref['steps']}-step {ref['solver']} reference "
                      f"({protocol['samples']} samples x {len(protocol['seeds'])} seeds)")
        for name in plan_names(folder):
            if name not in plans:
                plan_path(folder, name).unlink()
    say(f"wrote {len(plans)} plans, {json_path} and {png_path}")
    result = TuneResult(record, written, fast["name"] if fast else None)
    if fast is None:
        best = min(done[1:], key=lambda r: abs(r["dfid"]), default=None)
        raise NumericsError("tune budget", f"a plan with |dFID| <= {o.max_fid_delta:g} and |d recall| <= "
                            f"{o.max_recall_delta:g}", "none of the confirmed candidates" + (
                                f" (closest: {best['name']}, dFID {best['dfid']:+.4f}, d recall "
                                f"{best['drecall']:+.4f})" if best else ""),
                            f"no `{FAST}` plan written; frontier in {json_path}")
    return result
