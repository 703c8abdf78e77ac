"""Plans: named sampler settings stored with the engines, each with what it was measured to cost. Torch-free.

A plan fixes the solver, the steps, the timeshift, the encoder schedule, the forecast order and the guidance
interval (everything that trades network work for quality on the same weights); `ddt-export tune` measures a
frontier of them on the engine folder's own model and writes them here:

    ENGINES/plans/NAME.json     {"kind", "format_version", "name", "settings": {...}, "measured": {...},
                                 "provenance": {...}}   (measured: dFID, precision/recall deltas, GFLOP per
                                 image, speed-up, against the model's reference trajectory)

A request names one (`--plan fast`, `"plan": "fast"`); the plan's settings then replace the defaults, and a
request that also sets one of them is refused (the plan is what was measured). A plan made for other weights
or another model is refused, through the provenance it records (`Provenance.diff`). Names are plain words, so
an API field can never name a file.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...core.artifacts import write_json
from ...core.config import SamplerConfig
from ...core.errors import ArtifactError, InputError
from ...core.manifest import Manifest
from ...core.provenance import Provenance

PLANS_DIR = "plans"
KIND = "ddt-export plan"
FORMAT_VERSION = 1
FAST = "fast"  # the cheapest plan within the tuning budget
FRONTIER = "frontier"  # plans/frontier.json and .png: tune's search record and plot, not a plan
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
PLAN_FIELDS = ("steps", "solver", "forecast", "timeshift", "interval", "schedule")  # what a plan fixes
PLAN_PROVENANCE = ("weights", "model")  # what a plan's measurements depend on


@dataclass(frozen=True)
class Plan:
    name: str
    steps: int
    solver: str = "euler"
    forecast: int = 0
    timeshift: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    schedule: str = "all"
    measured: dict = field(default_factory=dict, compare=False)  # dfid, precision/recall deltas, gflop, speed-up

    def settings(self) -> dict:
        """The plan as request fields (`RequestInput` names)."""
        return {"steps": self.steps, "solver": self.solver, "forecast": self.forecast, "timeshift": self.timeshift,
                "interval": tuple(self.interval), "schedule": self.schedule}

    @property
    def pinned_steps(self) -> tuple[int, ...] | None:
        """A dp:K plan's recompute steps as measured (`tune` records them): a request on the plan runs these, not
        a DP solved again under later defaults, so the plan's measured dFID stays its own. None otherwise."""
        steps = self.measured.get("recompute_steps") if self.schedule.startswith("dp:") else None
        return tuple(int(s) for s in steps) if steps else None

    def label(self) -> str:
        return (f"{self.solver} {self.steps} steps, {self.schedule}, forecast {self.forecast}, "
                f"shift {self.timeshift:g}, interval {list(self.interval)}")

    @staticmethod
    def of(name: str, sampler: SamplerConfig, schedule: str, measured: dict | None = None) -> "Plan":
        return Plan(check_name(name), sampler.num_steps, sampler.solver, sampler.forecast, sampler.timeshift,
                    tuple(sampler.guidance_interval), schedule, dict(measured or {}))


def check_name(name: str, field: str = "--plan") -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name == FRONTIER:
        raise InputError(field, f"a plan name: lower-case letters, digits, - and _ (at most 64), not {FRONTIER}",
                         repr(name))
    return name


def plan_path(folder: Path, name: str) -> Path:
    return Path(folder) / PLANS_DIR / f"{check_name(name)}.json"


def plan_names(folder: Path) -> list[str]:
    d = Path(folder) / PLANS_DIR
    return sorted(p.stem for p in d.glob("*.json") if NAME.fullmatch(p.stem) and p.stem != FRONTIER) \
        if d.is_dir() else []


def write_plan(folder: Path, plan: Plan, provenance: Provenance) -> Path:
    """ENGINES/plans/NAME.json, written atomically; `provenance`: the engines' (weights and model are checked)."""
    rec = {"kind": KIND, "format_version": FORMAT_VERSION, "name": plan.name,
           "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.settings().items()},
           "measured": plan.measured, "provenance": provenance.to_dict()}
    path = plan_path(folder, plan.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, rec)
    return path


def read_plan(folder: Path, manifest: Manifest, name: str, field: str = "--plan") -> Plan:
    """The plan `name` of the engine folder; InputError when there is none (naming those there), ArtifactError
    when it is unreadable or was made for other weights or another model."""
    path = plan_path(folder, check_name(name, field))
    if not path.is_file():
        there = plan_names(folder)
        raise InputError(field, f"a plan stored with the engines ({', '.join(there) or 'none yet: ddt-export tune'})",
                         name)
    try:
        rec = json.loads(path.read_text())
        s = rec["settings"]
        plan = Plan(rec["name"], int(s["steps"]), s["solver"], int(s["forecast"]), float(s["timeshift"]),
                    tuple(s["interval"]), s["schedule"], rec.get("measured", {}))
        made = Provenance.from_dict(rec["provenance"], str(path))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(str(path), "a readable plan record", f"{type(e).__name__}: {e}")
    diffs = made.diff(manifest.provenance, PLAN_PROVENANCE)
    if diffs:
        raise ArtifactError(f"plan {name} ({path})", "a plan tuned on these engines' weights and model",
                            "; ".join(diffs), "tune again: ddt-export tune --engines FOLDER")
    return plan


def lookup(folder: Path, manifest: Manifest, field: str = "--plan"):
    """`read_plan` for one folder: what `request.resolve(..., plans=)` takes."""
    return lambda name: read_plan(folder, manifest, name, field)


def read_plans(folder: Path, manifest: Manifest) -> tuple[dict[str, Plan], dict[str, str]]:
    """Every usable plan of the folder, and why each other one is not (foreign, unreadable)."""
    plans, refused = {}, {}
    for name in plan_names(folder):
        try:
            plans[name] = read_plan(folder, manifest, name)
        except ArtifactError as e:
            refused[name] = str(e)
    return plans, refused
