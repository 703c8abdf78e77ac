"""Service levels: a request's SLO, its priority, and the plans it may be moved to under load. Torch-free, no clock.

A request's SLO is met when its latency (arrival to images ready, in the server) is at most `scale` (the
server's --slo-scale, default 3) times its predicted solo latency (`costs.solo_seconds` of the plan it asked
for), or at most its own deadline where it gives one. A request that allows a quality trade (`max_fid_delta`,
or `quality: adaptive` = the folder's `fast` plan's measured dFID) carries the plans within that budget as
`Option`s; the scheduler keeps those on the frontier (no other option is both cheaper and better) that cost
less than the plan asked for (`frontier`), and when the request's projected completion misses its SLO it moves
it to the cheapest of them (`adapt` cheapest, the default) or to the one of least dFID whose projected completion
meets it (`adapt` least-dfid) (`Scheduler._plan`).

    terms = Terms(priority=PRIORITY["low"], deadline_s=2.0, options=(Option("fast", fast_sample, 1.8),))
    engine.submit(sample, terms=terms)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ...core.errors import InputError
from ..sampling.request import EXPECTED, SampleRequest

SLO_SCALE = 3.0  # vLLM-Omni's diffusion benchmark: within 3x the solo latency
PRIORITIES = ("low", "normal", "high")  # the priority field's words, lowest first
PRIORITY = {p: i for i, p in enumerate(PRIORITIES)}
NORMAL = PRIORITY["normal"]
QUALITY = ("exact", "adaptive")  # exact: the plan asked for, always; adaptive: the folder's fast budget
CHEAPEST, LEAST_DFID = "cheapest", "least-dfid"
ADAPT = (CHEAPEST, LEAST_DFID)  # where a late request goes: its cheapest option, or the least dFID that meets


@dataclass(frozen=True)
class Option:
    """A plan a request may run: its name (None: the settings as the request gave them), the request resolved
    with it (the request's labels, num, seed and cfg; the plan's steps, solver, forecast, schedule, ...), and
    its measured dFID (None: unknown, the request's own settings)."""

    plan: str | None
    sample: SampleRequest
    dfid: float | None


@dataclass(frozen=True)
class Terms:
    """What a request asks of the service besides its samples: its priority (an index of PRIORITIES), a deadline
    in seconds from its arrival (None: --slo-scale x its solo latency), and the plans it may be moved to (those
    within its budget; `adaptive` False: it allows no quality trade, and is never moved)."""

    priority: int = NORMAL
    deadline_s: float | None = None
    options: tuple[Option, ...] = ()
    adaptive: bool = False  # it allows a trade (a budget was given, even one no stored plan fits)
    dfid: float | None = None  # the dFID of the plan it asked for (0.0: the model's own sampler; None: unknown)


def check_terms(priority=None, deadline_ms=None, max_fid_delta=None, quality=None, names=None) -> dict:
    """The checks of the serving fields, worded like every other request field (`request.EXPECTED`):
    {priority: int, deadline_s: float | None, budget: float | None | "fast"} (budget None: no trade)."""
    name = names or {}
    out: dict = {"priority": NORMAL, "deadline_s": None, "budget": None}
    if priority is not None:
        if priority not in PRIORITY:
            raise InputError(name.get("priority", "priority"), EXPECTED["priority"], repr(priority))
        out["priority"] = PRIORITY[priority]
    if deadline_ms is not None:
        if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)) or not (
                math.isfinite(deadline_ms) and deadline_ms > 0):
            raise InputError(name.get("deadline_ms", "deadline_ms"), EXPECTED["deadline_ms"], repr(deadline_ms))
        out["deadline_s"] = float(deadline_ms) / 1000.0
    if quality is not None and quality not in QUALITY:
        raise InputError(name.get("quality", "quality"), EXPECTED["quality"], repr(quality))
    if max_fid_delta is not None:
        if isinstance(max_fid_delta, bool) or not isinstance(max_fid_delta, (int, float)) or not (
                math.isfinite(max_fid_delta) and max_fid_delta >= 0):
            raise InputError(name.get("max_fid_delta", "max_fid_delta"), EXPECTED["max_fid_delta"],
                             repr(max_fid_delta))
        if quality == "adaptive":
            raise InputError(name.get("max_fid_delta", "max_fid_delta"), "either max_fid_delta or quality: adaptive "
                             "(the fast plan's budget)", "both")
        out["budget"] = float(max_fid_delta)
    elif quality == "adaptive":
        out["budget"] = "fast"
    return out


def frontier(options: Sequence[Option], cost: Sequence[float], asked_cost: float) -> list[int]:
    """The indices of the options worth moving to, least dFID first: cheaper than the plan asked for, with a
    known dFID, and on the frontier (no other option costs no more with no more dFID, one of them less).
    Along the result the dFID rises and the cost falls."""
    keep = [i for i, o in enumerate(options) if o.dfid is not None and cost[i] < asked_cost]
    out = []
    for i in keep:
        beaten = any((cost[j] <= cost[i] and options[j].dfid <= options[i].dfid)
                     and (cost[j] < cost[i] or options[j].dfid < options[i].dfid) for j in keep if j != i)
        if not beaten:
            out.append(i)
    # equal (cost, dFID) twins: keep the first
    seen, uniq = set(), []
    for i in sorted(out, key=lambda i: (options[i].dfid, -cost[i], i)):
        key = (cost[i], options[i].dfid)
        if key not in seen:
            seen.add(key)
            uniq.append(i)
    return uniq
