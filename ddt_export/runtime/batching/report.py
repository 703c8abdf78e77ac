"""One report for a simulated run and a measured one, so the two can be compared number for number. Torch-free.

    served = [Served(latency=1.2, met=True, dfid=0.0, plan=None), ...]   # one per answered request
    summary = summarize(served, offered=100, rejected=3, span=60.0)
    errors = compare(simulated_summary, measured_summary)                # relative error per number

SLO attainment counts every offered request: one answered late, failed or refused (503) missed its SLO.
Goodput is the requests answered within their SLO per second of the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .slo import NORMAL

COMPARED = ("throughput", "goodput", "slo_attainment", "p50", "p99")


@dataclass(frozen=True)
class Served:
    """One answered request: its latency (arrival to answer, seconds), whether it met its SLO (None: unknown),
    the plan it ran (None: its own settings) and that plan's dFID (None: unknown), whether it was moved there."""

    latency: float
    met: bool | None
    dfid: float | None = None
    plan: str | None = None
    degraded: bool = False
    adaptive: bool = False
    priority: int = NORMAL


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else None


def summarize(served: Sequence[Served], offered: int, rejected: int, span: float) -> dict:
    """throughput and goodput (per second of `span`), SLO attainment (met / offered), p50 / p99 latency, the
    503 count, the mean dFID served (over requests whose plan's dFID is known) and how many were moved."""
    span = max(float(span), 1e-9)
    lat = [s.latency for s in served]
    met = sum(1 for s in served if s.met)
    known = [s.dfid for s in served if s.dfid is not None]
    out = {"offered": offered, "answered": len(served), "rejected_503": rejected, "throughput": len(served) / span,
           "goodput": met / span, "slo_met": met, "slo_attainment": met / offered if offered else None,
           "p50": _pct(lat, 50), "p99": _pct(lat, 99),
           "mean_dfid_served": float(np.mean(known)) if known else None, "degraded": sum(s.degraded for s in served)}
    for name, group in (("adaptive", [s for s in served if s.adaptive]), ("exact", [s for s in served if not
                                                                                  s.adaptive])):
        if group:
            out[f"slo_met_{name}"] = sum(1 for s in group if s.met)
            out[f"answered_{name}"] = len(group)
    return out


def compare(simulated: dict, measured: dict, keys: Sequence[str] = COMPARED) -> dict[str, float | None]:
    """|simulated - measured| / measured for each number both have (None where the measured one is 0 or absent)."""
    out: dict[str, float | None] = {}
    for k in keys:
        s, m = simulated.get(k), measured.get(k)
        out[k] = abs(s - m) / abs(m) if s is not None and m else None
    return out
