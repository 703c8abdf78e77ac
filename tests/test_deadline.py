"""The `slo` batching policy (`runtime/batching/deadline.py`): earliest deadline first at every step boundary, the
requests that can no longer meet their SLO behind the others, and as many requests per call as the cost curve
says are worth it. Timelines derived by hand on a virtual clock (the simulator's executor charges the curve), and
a brute-force check: on a linear curve, whenever some order of running the requests one after the other meets
every SLO, the policy meets every SLO (EDF's optimality, Jackson's rule), found by trying every order."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ddt_export.core.errors import ConfigError
from ddt_export.runtime.batching.costs import CostCurve
from ddt_export.runtime.batching.costs import rest_seconds
from ddt_export.runtime.batching.deadline import in_order, pick, serial
from ddt_export.runtime.batching.scheduler import Scheduler
from ddt_export.runtime.batching.simulate import Arrival, simulate
from ddt_export.runtime.batching.slo import Terms
from ddt_export.runtime.sampling.plan import plan_steps
from ddt_export.serve.settings import ServeSettings
from test_slo import LINEAR, adaptive, engine, run, spec

# a call's fixed part dominates (a GPU-like curve): 0.05 s + 0.001 s per row, for the encoder and the decoder
FLAT = CostCurve(tuple((r, 0.05 + 0.001 * r) for r in range(1, 9)), tuple((r, 0.05 + 0.001 * r) for r in range(1, 9)))


def test_edf_timeline_by_hand_and_the_hopeless_behind():
    # LINEAR, cfg 1: a step costs 0.02 s per image alone, and a second request adds its full cost, so one request
    # steps per iteration. a: 1 image x 8 steps (0.16 s alone, due 0.48), b: 2 x 5 (0.2 s, due 0.6), c: 1 x 10
    # (0.2 s) with its own deadline 0.25, d: 1 x 10 with deadline 0.05 (hopeless from the start).
    # By deadline: c, a, b each meet theirs run one after the other (0.2, 0.36, 0.56); d goes behind (0.76).
    # `step` (test_slo's timeline, without d) met only b; plain EDF would run d first and make c miss (0.4).
    eng, clock = engine("slo")
    reqs = [eng.submit(spec(1, 8), arrival=0.0), eng.submit(spec(2, 5), arrival=0.0),
            eng.submit(spec(1, 10), arrival=0.0, terms=Terms(deadline_s=0.25)),
            eng.submit(spec(1, 10), arrival=0.0, terms=Terms(deadline_s=0.05))]
    a, b, c, d = reqs
    assert [r.rest[0] for r in reqs] == pytest.approx([0.16, 0.2, 0.2, 0.2])
    assert in_order(reqs, 0.0) == [c, a, b, d]
    assert [eng.scheduler.project(0.0, r) for r in reqs] == pytest.approx([0.36, 0.56, 0.2, 0.76])
    first = eng.step()
    assert [rid for rid, _ in first.out.batch] == [c.id]  # the most urgent alone; only it has started
    assert (c.status.value, a.status.value) == ("running", "waiting")
    run(eng)
    assert [r.ended for r in reqs] == pytest.approx([0.36, 0.56, 0.2, 0.76])
    assert [r.slo_met for r in reqs] == [True, True, True, False]


def test_late_by_the_others_too():
    # x (due 0.3, 0.2 s) and y (due 0.35, 0.2 s): y alone would meet its due, but after x, which is more urgent,
    # it cannot (0.4): it goes behind z (due 0.5, 0.1 s), which then meets its own (x 0.2, z 0.3, y 0.5).
    eng, _ = engine("slo")
    x = eng.submit(spec(1, 10), arrival=0.0, terms=Terms(deadline_s=0.3))
    y = eng.submit(spec(1, 10), arrival=0.0, terms=Terms(deadline_s=0.35))
    z = eng.submit(spec(1, 5), arrival=0.0, terms=Terms(deadline_s=0.5))
    assert in_order([x, y, z], 0.0) == [x, z, y]
    assert in_order([x, y, z], 0.0, cumulative=False) == [x, y, z]  # each alone: none is hopeless
    run(eng)
    assert [r.ended for r in (x, y, z)] == pytest.approx([0.2, 0.5, 0.3])
    assert [r.slo_met for r in (x, y, z)] == [True, False, True]


def test_a_flat_curve_fills_the_batch_in_deadline_order():
    # FLAT, budget 4, three requests of 2 images (cfg 1: 2 rows each): two fit a call. A second request adds 0.004
    # s to a call of 0.104 s, well within JOIN, so the batch fills, in deadline order: the latest due waits.
    # p (4 steps, due 1.0), q (3 steps, due 0.5), r (3 steps, due 0.6): q and r step together (3 x 0.108 s =
    # 0.324), then p alone (4 x 0.104 = 0.416, done at 0.74).
    eng, _ = engine("slo", budget=4, curve=FLAT)
    p = eng.submit(spec(2, 4), arrival=0.0, terms=Terms(deadline_s=1.0))
    q = eng.submit(spec(2, 3), arrival=0.0, terms=Terms(deadline_s=0.5))
    r = eng.submit(spec(2, 3), arrival=0.0, terms=Terms(deadline_s=0.6))
    batch = pick([q, r, p], FLAT, 4)
    assert [(x is q, x is r, e, d) for x, e, d in batch] == [(True, False, 2, 2), (False, True, 2, 2)]
    assert [x is q for x, _, _ in pick([q, r, p], LINEAR, 4)] == [True]  # on a linear curve: q alone
    assert in_order([q, r, p], 0.0, serial(FLAT)) == [q, r, p]  # r after q is not late: they share the calls
    run(eng)
    assert [x.ended for x in (q, r, p)] == pytest.approx([0.324, 0.324, 0.74])


def test_serial_where_a_request_adds_its_whole_cost():
    assert serial(LINEAR) and not serial(FLAT)


def test_rest_seconds_by_hand():
    # 10 steps, cfg 1.5 guided on steps 3..9 (test_slo's sampler): steps 0-2 cost 2 rows (0.02 s), 3-9 cost 4
    # rows (encoder 2 + decoder 2: 0.04 s); from step k on: sum of those
    s = spec(1, 10, cfg=1.5)
    rest = rest_seconds(LINEAR, plan_steps(s.sampler, s.recompute), 1)
    expect = [sum(0.02 if i < 3 else 0.04 for i in range(k, 10)) for k in range(11)]
    assert rest == pytest.approx(expect)


@pytest.mark.parametrize("seed", range(40))
def test_brute_force_edf_meets_every_slo_whenever_some_order_does(seed):
    """Four requests at 0 with random steps, images and deadlines on LINEAR (one request per iteration): try every
    order of running them one after the other; when one meets every deadline, `slo` must too."""
    rng = np.random.default_rng([seed, 5])
    kinds = [(int(rng.integers(1, 3)), int(rng.integers(1, 7))) for _ in range(4)]  # (images, steps)
    solo = [0.02 * n * k for n, k in kinds]
    due = [float(rng.uniform(0.3, 1.6) * s * 2) for s in solo]
    feasible = any(all(sum(solo[j] for j in order[:i + 1]) <= due[order[i]] + 1e-9 for i in range(4))
                   for order in itertools.permutations(range(4)))
    arrivals = [Arrival(0.0, spec(n, k), i, Terms(deadline_s=due[i])) for i, (n, k) in enumerate(kinds)]
    res = simulate(arrivals, LINEAR, 8, "slo", max_queue=8)
    met = [res.served[i].met for i in range(4)]
    if feasible:
        assert all(met), (kinds, due, met)
    # whatever the instance: EDF's own order, run one after the other, is what happened to those it kept
    edf = sorted(range(4), key=lambda i: due[i])
    t, done = 0.0, {}
    for i in edf:
        if t + solo[i] <= due[i] + 1e-9:
            t += solo[i]
            done[i] = t
    for i in edf:
        if i not in done:
            t += solo[i]
            done[i] = t
    assert [res.latency[i] for i in range(4)] == pytest.approx([done[i] for i in range(4)])


def test_a_trade_is_taken_when_it_would_miss_behind_everything_held():
    # LINEAR, `slo`. h: 1 image x 30 steps (0.6 s alone, due 1.8). a asks 10 steps (0.2 s, due 0.6) and allows
    # `fast` (4 steps, 0.08 s). By deadline a runs first and would finish at 0.2; but behind h (0.6 + 0.2 = 0.8)
    # it would miss, and later arrivals can put it there: it takes fast (behind h: 0.68, still late, so the
    # cheapest), and the projection (0.08) accepts it. Timeline: a at 0.08, h at 0.68.
    fast = spec(1, 4, plan="fast")
    eng, _ = engine("slo")
    h = eng.submit(spec(1, 30), arrival=0.0)
    a = eng.submit(spec(1, 10), arrival=0.0, terms=adaptive((fast, 2.0)))
    assert (a.plan, a.degraded) == ("fast", True)
    run(eng)
    assert (a.ended, h.ended) == pytest.approx((0.08, 0.68))
    # a short backlog: h2 1 x 5 steps (0.1 s, due 0.3); behind it a finishes at 0.3 <= 0.6: a keeps its plan
    eng, _ = engine("slo")
    h2 = eng.submit(spec(1, 5), arrival=0.0)
    b = eng.submit(spec(1, 10), arrival=0.0, terms=adaptive((fast, 2.0)))
    assert (b.plan, b.degraded) == (None, False)
    run(eng)
    assert (h2.ended, b.ended) == pytest.approx((0.1, 0.3))
    # `step` keeps the first case's a on its plan: its projection (sharing every iteration with h) meets 0.6
    eng, _ = engine("step")
    eng.submit(spec(1, 30), arrival=0.0)
    assert eng.submit(spec(1, 10), arrival=0.0, terms=adaptive((fast, 2.0))).degraded is False


def test_slo_needs_its_model_and_is_a_server_policy():
    with pytest.raises(ConfigError, match=r"^--batching slo: expected a cost curve"):
        Scheduler(8, "slo")
    assert ServeSettings(batching="slo").batching == "slo"
