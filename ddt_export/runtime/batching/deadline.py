"""The `slo` policy's decisions: which running requests step in an iteration, most urgent first, and how many of
them are worth one call. Torch-free, no clock (the scheduler passes `now`).

Urgency is the request's SLO: earliest deadline first (EDF, at every step boundary, as GenServe and TetriServe
schedule diffusion steps), higher priority before lower, and a request that can no longer meet its SLO even
alone on the machine (`late`: now + what its remaining steps cost alone > its due) after every one that still
can: it no longer takes the machine from them; it runs in what they leave (oldest due first, so it is not
starved behind newer late ones).

How many step together is the cost curve's call (`pick`): going down the urgency order, a request joins the
iteration when the rows it adds cost at most JOIN x what its step costs on its own. On a curve linear in rows (a
CPU) its rows cost the same in or out, so the most urgent request runs alone, and the iteration is as short as
its own step: the urgent finish first instead of everyone advancing at the pace of the sum (`step`) or of an
equal share (`fair`). On a sublinear curve (a GPU) a call's fixed part dominates, so the batch fills up as
`step` fills it, but in deadline order where the row budget runs out.

    req.rest = costs.rest_seconds(curve, steps, num)  # rest[k]: steps k.. and the VAE call, alone on the machine
    order = sorted(running, key=lambda r: urgency(r, now))
    batch = pick(order, curve, row_budget)          # [(request, encoder rows, decoder rows)]
"""
from __future__ import annotations

from typing import Sequence

from ..sampling.plan import step_rows
from .costs import CostCurve

JOIN = 0.5  # a request joins an iteration when its rows add at most this fraction of its own step's cost
HOLD = 4  # `slo` holds up to HOLD x the row budget of started requests; each iteration's calls stay in the budget
CUMULATIVE = True  # `in_order`: late also when the requests before it leave it no time (where `serial`)


def late(req, now: float) -> bool:
    """It misses its SLO even if it runs alone from now on (nothing to gain by giving it the machine first)."""
    return req.due is not None and now + req.rest[req.done_steps] > req.due


def in_order(reqs: Sequence, now: float, cumulative: bool = True) -> list:
    """The `slo` order of reqs: higher priority first; within a priority, those that can still meet their SLO,
    earliest due first, then the others (`late`), earliest due first. `cumulative`: a request is late too when
    the ones before it in this order, run alone one after the other (a linear curve's EDF), leave it no time;
    it then takes none from those after it."""
    out, t = [], now
    for prio in sorted({r.priority for r in reqs}, reverse=True):
        edf = sorted((r for r in reqs if r.priority == prio),
                     key=lambda r: (float("inf") if r.due is None else r.due, r.arrival, r.id))
        keep, behind = [], []
        for r in edf:
            rest = r.rest[r.done_steps] if r.rest else 0.0
            if r.due is not None and (t if cumulative else now) + rest > r.due:
                behind.append(r)
            else:
                keep.append(r)
                t += rest
        t += sum(r.rest[r.done_steps] for r in behind if r.rest)
        out += keep + behind
    return out


def serial(curve: CostCurve) -> bool:
    """Whether the curve runs requests one after the other under `pick` (a one-row request does not join another:
    a linear CPU curve), so that the requests before one in the order delay it by their whole cost. Where they
    join (a GPU-like curve), they share the calls and only `late` alone applies."""
    return added(curve, 1, 1, 1, 1) > JOIN * curve.iteration(1, 1, 1)


def added(curve: CostCurve, enc: int, dec: int, enc_rows: int, dec_rows: int) -> float:
    """What (enc, dec) more rows add to an iteration that already carries (enc_rows, dec_rows)."""
    return (curve.call("encoder", enc_rows + enc) - curve.call("encoder", enc_rows)
            + curve.call("decoder", dec_rows + dec) - curve.call("decoder", dec_rows) + curve.request_step_s)


def pick(order: Sequence, curve: CostCurve, row_budget: int, join: float = JOIN) -> list[tuple[object, int, int]]:
    """The iteration's batch, from running requests in urgency order: the first always; each next one whose rows
    fit the budget and add at most `join` x its step's cost alone. [(request, encoder rows, decoder rows)]."""
    batch, enc_rows, dec_rows = [], 0, 0
    for req in order:
        enc, dec = step_rows(req.current, req.num)
        if max(enc_rows + enc, dec_rows + dec) > row_budget:
            continue
        if batch and added(curve, enc, dec, enc_rows, dec_rows) > join * curve.iteration(1, enc, dec):
            continue
        batch.append((req, enc, dec))
        enc_rows, dec_rows = enc_rows + enc, dec_rows + dec
    return batch
