"""The step-level batching scheduler (runtime.batching) alone: admission, rows, retirement, policies, driven by a
virtual clock. No engines: the rows and times are derived by hand from the plans written out below."""
from __future__ import annotations

import dataclasses

import pytest

from ddt_export.core.config import SamplerConfig
from ddt_export.core.errors import InputError
from ddt_export.runtime.batching.scheduler import (CANCELLED, FAILED, RUNNING, SAMPLED, WAITING, QueueFull, RequestSpec,
                                         Scheduler, peak_rows, step_rows)
from ddt_export.runtime.sampling.host import plan_steps

# N = 10, last_step 0.04: t_i = 0.10667 i, so the guidance interval 0.3 < t < 1 holds steps 3..9.
SAMPLER = SamplerConfig(num_steps=10, guidance=1.5, guidance_interval=(0.3, 1.0), last_step=0.04)


def spec(num=1, steps=10, schedule=None, cfg=1.5, label=0):
    """A request; the default schedule is uniform:3 (0, 3, 6, 9 for 10 steps)."""
    s = dataclasses.replace(SAMPLER, num_steps=steps, guidance=cfg)
    return RequestSpec(label, num, 0, s, tuple(range(0, steps, 3) if schedule is None else schedule), "test")


def test_rows_per_step_by_hand():
    # schedule 0, 2, 5: the state of step 2 serves steps 2-4, of which 3 and 4 are guided, so the encoder runs
    # both halves at step 2 (4 rows for num 2) while the decoder there still needs the conditional half only
    plan = plan_steps(SAMPLER, [0, 2, 5])
    rows = [step_rows(st, 2) for st in plan]
    assert rows == [(2, 2), (0, 2), (4, 2), (0, 4), (0, 4), (4, 4), (0, 4), (0, 4), (0, 4), (0, 4)]
    assert peak_rows(plan, 2) == 4
    assert peak_rows(plan_steps(dataclasses.replace(SAMPLER, guidance=1.0), [0, 2, 5]), 3) == 3  # no CFG rows


def test_step_policy_admits_at_every_boundary_within_the_budget():
    sch = Scheduler(row_budget=6, policy="step")
    a = sch.submit(spec(num=2), now=0.0)  # 4 rows
    assert sch.admit(0.0) == [a] and a.status == RUNNING and a.admitted == 0.0
    b = sch.batch()
    assert b.jobs == [a] and (b.encoder_rows, b.decoder_rows) == (2, 2)  # step 0: outside the interval
    sch.advance(b, 0.1)
    c = sch.submit(spec(num=1), now=0.15)  # 2 rows: fits next to a (4 + 2 = 6)
    d = sch.submit(spec(num=1), now=0.16)  # no room left: waits, and so would anything behind it (FIFO)
    e = sch.submit(spec(num=1, cfg=1.0), now=0.17)  # 1 row would fit, but comes after d
    assert sch.admit(0.2) == [c] and [j.status for j in (d, e)] == [WAITING, WAITING]
    b = sch.batch()
    assert b.jobs == [a, c] and [st.i for st in b.steps] == [1, 0]  # two requests at different steps
    assert (b.encoder_rows, b.decoder_rows) == (1, 2 + 1)
    sch.advance(b, 0.3)
    assert sch.retire(0.3) == [] and sch.used_rows == 6


def test_retirement_frees_rows_and_the_next_request_joins():
    sch = Scheduler(row_budget=4)
    short = sch.submit(spec(num=2, steps=2, schedule=(0,), cfg=1.0), 0.0)  # no CFG rows: 2 rows
    long = sch.submit(spec(num=1, steps=10), 0.0)  # 2 rows
    late = sch.submit(spec(num=1, steps=10), 0.0)
    assert sch.admit(0.0) == [short, long]
    for now in (1.0, 2.0):
        sch.advance(sch.batch(), now)
    assert short.status == SAMPLED and short.sampled == 2.0 and long.step == 2
    assert sch.retire(2.0) == [short] and sch.running == [long]
    assert sch.admit(2.0) == [late]


def test_failed_and_cancelled_requests_leave_at_the_boundary():
    sch = Scheduler(row_budget=8)
    a, b, c = (sch.submit(spec(), 0.0) for _ in range(3))
    sch.admit(0.0)
    batch = sch.batch()
    sch.cancel(b)  # during the step: b still computes this step, then leaves
    assert b.status == RUNNING
    sch.advance(batch, 1.0, failed={c.id: RuntimeError("nan")})
    assert a.step == b.step == 1 and c.step == 0 and c.status == FAILED
    assert sch.retire(1.0) == [b, c] and b.status == CANCELLED and sch.running == [a]
    w = sch.submit(spec(num=4), 1.0)  # 8 rows: waits for a
    assert sch.admit(1.0) == []
    sch.cancel(w)  # a waiting request leaves the queue at once
    assert w.status == CANCELLED and not sch.waiting


def test_request_policy_groups_within_the_delay_and_runs_to_completion():
    sch = Scheduler(row_budget=6, policy="request", max_delay=0.05)
    a = sch.submit(spec(steps=2, schedule=(0,)), 0.0)
    assert sch.admit(0.01) == [] and sch.wakeup() == pytest.approx(0.05)
    b = sch.submit(spec(steps=4), 0.03)
    assert sch.admit(0.05) == [a, b]  # the window of the oldest closed
    c = sch.submit(spec(), 0.06)
    for now in (0.1, 0.2):
        assert sch.admit(now) == []  # the group runs alone ...
        sch.advance(sch.batch(), now)
    assert sch.retire(0.2) == [a]  # ... a member that finishes answers at once ...
    assert sch.admit(0.2) == []  # ... but nobody joins until the group is done
    for now in (0.3, 0.4):
        sch.advance(sch.batch(), now)
    assert sch.retire(0.4) == [b] and sch.admit(0.4) == [c]


def test_request_policy_does_not_wait_when_the_group_is_full():
    sch = Scheduler(row_budget=4, policy="request", max_delay=10.0)
    a, b = sch.submit(spec(), 0.0), sch.submit(spec(), 0.0)
    assert sch.admit(0.0) == [a, b]  # 2 + 2 rows = the budget
    sch2 = Scheduler(row_budget=4, policy="request", max_delay=10.0)
    a, b = sch2.submit(spec(num=1), 0.0), sch2.submit(spec(num=2), 0.0)
    assert sch2.admit(0.0) == [a]  # b does not fit beside a: the group is as full as it gets


def test_single_policy_one_at_a_time():
    sch = Scheduler(row_budget=64, policy="single")
    a, b = sch.submit(spec(steps=1, schedule=(0,)), 0.0), sch.submit(spec(steps=1, schedule=(0,)), 0.0)
    assert sch.admit(0.0) == [a] and sch.admit(0.0) == []
    sch.advance(sch.batch(), 0.5)
    assert sch.retire(0.5) == [a] and sch.admit(0.5) == [b]


def test_fair_policy_steps_each_request_in_proportion_to_one_over_its_rows():
    sch = Scheduler(row_budget=16, policy="fair")
    small = sch.submit(spec(num=1, steps=10, cfg=1.0, schedule=range(10)), 0.0)  # 1 row
    big = sch.submit(spec(num=2, steps=10, schedule=range(10)), 0.0)  # 4 rows (CFG)
    assert sch.admit(0.0) == [small, big]
    seen = []
    for it in range(8):
        b = sch.batch()
        seen.append([j is big for j in b.jobs])
        sch.advance(b, float(it))
    assert seen == [[False]] * 3 + [[False, True]] + [[False]] * 3 + [[False, True]]  # big: every 4th
    assert (small.step, big.step) == (8, 2)
    alone = Scheduler(row_budget=16, policy="fair")
    j = alone.submit(spec(num=2), 0.0)
    alone.admit(0.0)
    assert alone.batch().jobs == [j]  # alone, a request steps every iteration (work-conserving)


def test_queue_limit_and_requests_that_never_fit():
    sch = Scheduler(row_budget=8, max_queue=2)
    sch.submit(spec(), 0.0)
    sch.submit(spec(), 0.0)
    with pytest.raises(QueueFull, match="fewer than 2 waiting"):
        sch.submit(spec(), 0.0)
    with pytest.raises(InputError, match=r"num: expected <= 4 images .* got 5"):
        Scheduler(row_budget=8).submit(spec(num=5), 0.0)
    for kw, match in [({"policy": "fifo"}, "--batching"), ({"max_queue": 0}, "--max-queue"),
                      ({"max_delay": -1.0}, "--max-delay-ms"), ({"row_budget": 0}, "row budget")]:
        with pytest.raises(InputError, match=match):
            Scheduler(**{"row_budget": 8, **kw})
    with pytest.raises(InputError, match=r"--batching: expected step \| fair \| request \| single, got fifo"):
        Scheduler(8, "fifo")


def drive(policy, arrivals, cost_per_row=0.01, budget=8, max_delay=0.0):
    """Run the scheduler on a virtual clock: an iteration costs cost_per_row x (encoder + decoder rows).
    arrivals: [(time, spec)]. Returns each request's latency, in arrival order."""
    sch = Scheduler(budget, policy, max_delay)
    pending, jobs, now = sorted(arrivals, key=lambda a: a[0]), [], 0.0
    while pending or not sch.idle:
        while pending and pending[0][0] <= now:
            t, s = pending.pop(0)
            jobs.append(sch.submit(s, t))
        sch.admit(now)
        batch = sch.batch()
        if not batch.jobs:
            nxt = [t for t in (pending[0][0] if pending else None, sch.wakeup()) if t is not None]
            now = max(now, min(nxt))
            continue
        now += cost_per_row * (batch.encoder_rows + batch.decoder_rows)
        sch.advance(batch, now)
        sch.retire(now)
    return [j.sampled - j.arrival for j in jobs]


def test_virtual_clock_short_request_stops_waiting_behind_a_long_one():
    # cfg 1.0 and schedule `all`: every step costs 2 rows (1 encoder + 1 decoder) per image, 0.02 s per image
    long, short = spec(num=1, steps=10, schedule=range(10), cfg=1.0), spec(num=1, steps=2, schedule=(0, 1), cfg=1.0)
    arrivals = [(0.0, long), (0.001, short)]
    # step level: the short one joins at the first boundary (0.02) and shares 2 iterations of 0.04 s
    lat_step = drive("step", arrivals)
    assert lat_step == pytest.approx([0.02 + 0.04 * 2 + 0.02 * 7, 0.02 + 0.04 * 2 - 0.001])
    # request level: the long one started alone (no delay), the short one waits for all its 10 steps
    lat_req = drive("request", arrivals)
    assert lat_req == pytest.approx([0.2, 0.2 + 0.04 - 0.001])


def test_simulator_is_the_scheduler_on_a_virtual_clock():
    """runtime.batching.simulate against this file's own driver (above) on a linear cost curve, for every policy, on a
    random mixed trace; then the per-request and VAE costs it adds, by hand."""
    import numpy as np

    from ddt_export.runtime.batching.simulate import Arrival, CostCurve, simulate

    rng = np.random.default_rng(3)
    specs = [spec(num=int(rng.integers(1, 4)), steps=int(s), cfg=float(rng.choice([1.0, 1.5])))
             for s in rng.integers(1, 12, 30)]
    times = np.cumsum(rng.exponential(0.05, len(specs)))
    linear = CostCurve(encoder=((1, 0.01), (64, 0.64)), decoder=((1, 0.01), (64, 0.64)))
    for policy, delay in (("step", 0.0), ("fair", 0.0), ("request", 0.03), ("single", 0.0)):
        want = drive(policy, list(zip(times, specs)), budget=8, max_delay=delay)
        res = simulate([Arrival(float(t), s, 0) for t, s in zip(times, specs)], linear, 8, policy, delay)
        assert [res.latency[i] for i in range(len(specs))] == pytest.approx(want), policy
    curve = CostCurve(encoder=((1, 0.01), (2, 0.02)), decoder=((1, 0.01), (2, 0.02)),
                      vae_decoder=((1, 0.5), (2, 0.5)), iteration_s=0.1, request_step_s=0.01, request_s=1.0)
    one = spec(num=1, steps=2, schedule=(0, 1), cfg=1.0)  # 2 iterations of 1 encoder + 1 decoder row
    res = simulate([Arrival(0.0, one, 0)], curve, 8)
    assert res.latency[0] == pytest.approx(2 * (0.02 + 0.1 + 0.01) + 0.5 + 1.0)
    assert curve.call("encoder", 4) == pytest.approx(0.04)  # extrapolated from the last two points
    assert res.iterations == 2 and res.requests_per_iteration == 1
