"""The encoder-schedule grammar, defined once: `all | uniform:R | dp:K | FILE.json`. Torch-free.

- `all`: the encoder runs at every step;
- `uniform:R`: every R-th step from 0 (the official `state_refresh_rate`);
- `dp:K`: K steps chosen by the statistical DP on a template trajectory (`runtime.sampling.schedules`: stored
  with the engines, or computed on them);
- a JSON file `{"recompute_steps": [...], ...}` (the CLI only: no HTTP field names a file).

Every schedule contains step 0: the first step has no state to reuse. `parse_schedule` is the one parser; the
request (`runtime.sampling.request`) calls it with the field name its caller typed (`--schedule` on the command
line, `schedule` in a JSON body), so both word their errors from the same check.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ...core.config import SamplerConfig
from ...core.errors import InputError

SCHEDULE_KINDS = ("all", "uniform:R", "dp:K", "FILE.json")
MAX_SCHEDULE_VALUE = 10 ** 6  # R or K: far above any step count a request may ask (the API's max steps)


@dataclass(frozen=True)
class ScheduleSpec:
    kind: str  # all | uniform | dp | file
    value: int | None = None  # R for uniform, K for dp
    path: Path | None = None
    text: str = "all"  # as asked (what records and answers show)

    def __str__(self) -> str:
        return self.text


def schedule_words(files: bool = True) -> str:
    """What a schedule must be, in words (errors and the API's description say it)."""
    return " | ".join(k for k in SCHEDULE_KINDS if files or k != "FILE.json")


def parse_schedule(text: str, field: str = "--schedule", files: bool = True) -> ScheduleSpec:
    """`all`, `uniform:R`, `dp:K` (R, K positive integers) or, with `files`, a path to a schedule JSON."""
    if not isinstance(text, str):
        raise InputError(field, schedule_words(files), repr(text))
    text = text.strip()
    if text == "all":
        return ScheduleSpec("all", text=text)
    head, sep, tail = text.partition(":")
    if sep and head in ("uniform", "dp"):
        if not (tail.isascii() and tail.isdigit()) or not 1 <= int(tail) <= MAX_SCHEDULE_VALUE:
            raise InputError(field, f"{head}:<integer in [1, {MAX_SCHEDULE_VALUE}]>", text)
        return ScheduleSpec(head, int(tail), text=text)
    if files and Path(text).suffix == ".json":
        if not Path(text).is_file():
            raise InputError(field, "an existing schedule JSON file", text)
        return ScheduleSpec("file", path=Path(text), text=text)
    raise InputError(field, schedule_words(files), text)


def default_schedule(sampler: SamplerConfig) -> str:
    """The schedule with none asked: `all`, or uniform:R for a sampler with state_refresh_rate R (the official)."""
    return "all" if sampler.state_refresh_rate == 1 else f"uniform:{sampler.state_refresh_rate}"


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
    """Steps for every kind but `dp`, which needs the engines (`schedules.resolve_schedule`)."""
    if spec.kind == "all":
        return list(range(num_steps))
    if spec.kind == "uniform":
        return uniform_steps(num_steps, spec.value)
    if spec.kind == "file":
        return read_schedule_json(spec.path, num_steps)
    raise AssertionError(f"{spec.kind} schedules are resolved against engines")
