"""Step-level batching without engines: the scheduler (admission, rows, statuses, policies) and the serving engine
on a virtual clock (runtime.batching.simulate), against timelines derived by hand from the plans written out
below. The model step is a stand-in executor (`Scripted`: it fails the requests it is told to), never graphs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ddt_export.core.config import SamplerConfig
from ddt_export.core.errors import InputError
from ddt_export.runtime.batching.engine import Engine
from ddt_export.runtime.batching.scheduler import (TRANSITIONS, QueueFull, RunnerOutput, Scheduler, Status,
                                                   check_policy)
from ddt_export.runtime.batching.simulate import Arrival, CostCurve, SimulatedRunner, VirtualClock, simulate
from ddt_export.runtime.sampling.grammar import ScheduleSpec
from ddt_export.runtime.sampling.plan import peak_rows, plan_steps, step_rows
from ddt_export.runtime.sampling.request import SampleRequest

# N = 10, last_step 0.04: t_i = 0.10667 i, so the guidance interval 0.3 < t < 1 holds steps 3..9.
SAMPLER = SamplerConfig(num_steps=10, guidance=1.5, guidance_interval=(0.3, 1.0), last_step=0.04)
W, R, D, F, C = Status.WAITING, Status.RUNNING, Status.DONE, Status.FAILED, Status.CANCELLED


def spec(num=1, steps=10, schedule=None, cfg=1.5, label=0) -> SampleRequest:
    """A resolved request; the default schedule is uniform:3 (0, 3, 6, 9 for 10 steps)."""
    s = dataclasses.replace(SAMPLER, num_steps=steps, guidance=cfg)
    steps_ = tuple(range(0, steps, 3) if schedule is None else schedule)
    return SampleRequest(np.full(num, label, np.int64), 0, s, ScheduleSpec("file", text="test"), steps_)


class Scripted:
    """A stand-in executor (no graphs): `fail[k]` = {request id: error} for the k-th iteration."""

    def __init__(self, fail=None):
        self.fail, self.outs = fail or {}, []

    def execute(self, out):
        self.outs.append(out)
        failed = self.fail.get(len(self.outs) - 1, {})
        return RunnerOutput(failed, {rid: f"images {rid}" for rid, st in out.batch if st.last and rid not in failed})

    def reset(self):
        pass


def engine(budget=8, policy="step", fail=None, max_delay=0.0, max_queue=64):
    clock = VirtualClock()
    return Engine(Scheduler(budget, policy, max_delay, max_queue), Scripted(fail), clock), clock


def test_rows_per_step_by_hand():
    # schedule 0, 2, 5: the state of step 2 serves steps 2-4, of which 3 and 4 are guided, so the encoder runs
    # both halves at step 2 (4 rows for num 2) while the decoder there still needs the conditional half only
    plan = plan_steps(SAMPLER, [0, 2, 5])
    rows = [step_rows(st, 2) for st in plan]
    assert rows == [(2, 2), (0, 2), (4, 2), (0, 4), (0, 4), (4, 4), (0, 4), (0, 4), (0, 4), (0, 4)]
    assert peak_rows(plan, 2) == 4
    assert peak_rows(plan_steps(dataclasses.replace(SAMPLER, guidance=1.0), [0, 2, 5]), 3) == 3  # no CFG rows
    assert [st.last for st in plan] == [False] * 9 + [True]


def test_step_policy_admits_at_every_boundary_within_the_budget():
    eng, clock = engine(budget=6)
    a = eng.submit(spec(num=2))  # 4 rows
    it = eng.step()
    assert it.admitted == [a] and a.status is R and a.admitted == 0.0
    assert it.out.new == ((a.id, a.sample),) and [rid for rid, _ in it.out.batch] == [a.id]
    assert (it.out.encoder_rows, it.out.decoder_rows) == (2, 2)  # step 0: outside the interval
    c = eng.submit(spec(num=1))  # 2 rows: fits next to a (4 + 2 = 6)
    d = eng.submit(spec(num=1))  # no room left: waits, and so would anything behind it (FIFO)
    e = eng.submit(spec(num=1, cfg=1.0))  # 1 row would fit, but comes after d
    it = eng.step()
    assert it.admitted == [c] and [r.status for r in (d, e)] == [W, W]
    assert it.stepped == [a, c] and [st.i for _, st in it.out.batch] == [1, 0]  # two requests at different steps
    assert (it.out.encoder_rows, it.out.decoder_rows) == (1, 2 + 1)
    assert it.finished == [] and eng.scheduler.used_rows == 6


def test_the_row_budget_is_inclusive():
    # 3 requests of 2 CFG rows fill a budget of 6 exactly; the fourth waits; with a budget of 5 the third waits
    for budget, admitted in ((6, 3), (5, 2)):
        eng, _ = engine(budget=budget)
        reqs = [eng.submit(spec(num=1)) for _ in range(4)]
        assert eng.step().admitted == reqs[:admitted], budget
        assert eng.scheduler.used_rows == 2 * admitted


def test_finishing_frees_rows_and_the_next_request_joins():
    eng, clock = engine(budget=4)
    short = eng.submit(spec(num=2, steps=2, schedule=(0,), cfg=1.0))  # no CFG rows: 2 rows
    long = eng.submit(spec(num=1, steps=10))  # 2 rows
    late = eng.submit(spec(num=1, steps=10))
    assert eng.step().admitted == [short, long]
    clock.advance(1.0)
    it = eng.step()
    assert it.finished == [short] and short.status is D and short.images == f"images {short.id}"
    assert short.sampled == short.ended == 1.0 and long.done_steps == 2
    assert list(eng.scheduler.running.values()) == [long]
    assert eng.step().admitted == [late]


def test_failed_and_cancelled_requests_leave_at_the_boundary():
    eng, clock = engine(budget=8, fail={0: {2: RuntimeError("nan")}})
    a, b, c = (eng.submit(spec()) for _ in range(3))
    it = eng.step()
    assert it.finished == [c] and c.status is F and str(c.error) == "nan" and c.done_steps == 0
    assert eng.scheduler.used_rows == 4  # c's rows are free at once
    assert not eng.cancel(b) and b.status is R  # running: b leaves at the next boundary ...
    it = eng.step()
    assert it.out.freed == (b.id,) and it.finished == [b] and b.status is C and b.done_steps == 1
    assert [rid for rid, _ in it.out.batch] == [a.id] and a.done_steps == 2
    w = eng.submit(spec(num=4))  # 8 rows: waits for a
    assert eng.step().admitted == []
    assert eng.cancel(w) and w.status is C and not eng.scheduler.waiting  # a waiting one leaves at once


def test_every_status_change_is_a_transition_of_the_table():
    assert TRANSITIONS == {W: {R, C}, R: {D, F, C}}  # finished is final
    eng, _ = engine()
    a = eng.submit(spec(steps=1, schedule=(0,)))
    eng.step()
    assert a.status is D
    with pytest.raises(AssertionError, match="done -> cancelled is not a transition"):
        eng.scheduler._move(a, C, 0.0)
    assert not eng.cancel(a) and a.status is D  # a finished request ignores a late cancel


def test_abort_fails_everything_running():
    eng, _ = engine()
    a, b = eng.submit(spec()), eng.submit(spec(num=4))  # b waits (2 + 8 rows > 8)
    eng.step()
    boom = RuntimeError("loop bug")
    assert eng.abort(boom) == [a] and a.status is F and a.error is boom and b.status is W
    assert eng.step().admitted == [b]


def test_request_policy_groups_within_the_delay_and_runs_to_completion():
    eng, clock = engine(budget=6, policy="request", max_delay=0.05)
    a = eng.submit(spec(steps=2, schedule=(0,)))
    clock.advance(0.01)
    assert eng.step() is None and eng.wakeup() == pytest.approx(0.05)
    clock.advance(0.02)
    b = eng.submit(spec(steps=4))
    clock.advance(0.02)
    assert eng.step().admitted == [a, b]  # the window of the oldest closed at 0.05
    c = eng.submit(spec())
    it = eng.step()
    assert it.admitted == [] and it.finished == [a]  # a member that finishes answers at once ...
    assert eng.step().admitted == []  # ... but nobody joins until the group is done
    it = eng.step()
    assert it.finished == [b] and eng.step() is None  # c waits for company until its own window closes ...
    clock.advance(0.05)
    assert eng.step().admitted == [c]  # ... at its arrival + 0.05


def test_request_policy_does_not_wait_when_the_group_is_full():
    eng, _ = engine(budget=4, policy="request", max_delay=10.0)
    a, b = eng.submit(spec()), eng.submit(spec())
    assert eng.step().admitted == [a, b]  # 2 + 2 rows = the budget
    eng, _ = engine(budget=4, policy="request", max_delay=10.0)
    a, b = eng.submit(spec(num=1)), eng.submit(spec(num=2))
    assert eng.step().admitted == [a]  # b does not fit beside a: the group is as full as it gets


def test_single_policy_one_at_a_time():
    eng, _ = engine(budget=64, policy="single")
    a, b = eng.submit(spec(steps=1, schedule=(0,))), eng.submit(spec(steps=1, schedule=(0,)))
    it = eng.step()
    assert it.admitted == [a] and it.finished == [a]
    assert eng.step().admitted == [b]


def test_fair_policy_steps_each_request_in_proportion_to_one_over_its_rows():
    eng, _ = engine(budget=16, policy="fair")
    small = eng.submit(spec(num=1, steps=10, cfg=1.0, schedule=range(10)))  # 1 row
    big = eng.submit(spec(num=2, steps=10, schedule=range(10)))  # 4 rows (CFG)
    seen = [[r is big for r in eng.step().stepped] for _ in range(8)]
    assert seen == [[False]] * 3 + [[False, True]] + [[False]] * 3 + [[False, True]]  # big: every 4th
    assert (small.done_steps, big.done_steps) == (8, 2)
    eng, _ = engine(budget=16, policy="fair")
    j = eng.submit(spec(num=2))
    assert eng.step().stepped == [j]  # alone, a request steps every iteration (work-conserving)


def test_queue_limit_and_requests_that_never_fit():
    eng, _ = engine(max_queue=2)
    eng.submit(spec())
    eng.submit(spec())
    with pytest.raises(QueueFull, match="fewer than 2 waiting"):
        eng.submit(spec())
    with pytest.raises(InputError, match=r"num: expected <= 4 images .* got 5"):
        engine()[0].submit(spec(num=5))
    with pytest.raises(InputError, match=r"--batching: expected step \| fair \| slo \| request \| single, got fifo"):
        check_policy("fifo")


def sim(policy, arrivals, budget=8, max_delay=0.0, curve=None):
    curve = curve or CostCurve(encoder=((1, 0.01), (64, 0.64)), decoder=((1, 0.01), (64, 0.64)))  # 0.01 s per row
    return simulate([Arrival(t, s, k) for k, (t, s) in enumerate(arrivals)], curve, budget, policy, max_delay)


def test_simulator_timeline_short_request_stops_waiting_behind_a_long_one():
    # cfg 1.0 and schedule `all`: every step costs 2 rows (1 encoder + 1 decoder) per image, 0.02 s per image
    long, short = spec(num=1, steps=10, schedule=range(10), cfg=1.0), spec(num=1, steps=2, schedule=(0, 1), cfg=1.0)
    arrivals = [(0.0, long), (0.001, short)]
    # step level: the short one joins at the first boundary (0.02) and shares 2 iterations of 0.04 s
    res = sim("step", arrivals)
    assert [res.latency[0], res.latency[1]] == pytest.approx([0.02 + 0.04 * 2 + 0.02 * 7, 0.02 + 0.04 * 2 - 0.001])
    assert [res.queue[0], res.queue[1]] == pytest.approx([0.0, 0.02 - 0.001])
    assert res.iterations == 10 and res.requests_per_iteration == pytest.approx(12 / 10)
    assert res.rows_per_iteration == pytest.approx({"encoder": 1.2, "decoder": 1.2})
    # request level: the long one started alone (no delay), the short one waits for all its 10 steps
    res = sim("request", arrivals)
    assert [res.latency[0], res.latency[1]] == pytest.approx([0.2, 0.2 + 0.04 - 0.001])
    assert res.queue[1] == pytest.approx(0.2 - 0.001) and res.iterations == 12


def test_simulator_queue_full_rejections_and_idle_gaps():
    one = spec(num=1, steps=2, schedule=(0, 1), cfg=1.0)  # 2 iterations of 0.02 s
    # budget 1 row: one at a time; max_queue 2: the third arrival at 0.0 finds two waiting and is refused
    res = simulate([Arrival(0.0, one, 0), Arrival(0.0, one, 0), Arrival(0.0, one, 0), Arrival(1.0, one, 0)],
                   CostCurve(encoder=((1, 0.01), (2, 0.02)), decoder=((1, 0.01), (2, 0.02))), 1, "step", 0.0, 2)
    assert res.rejected == [2]
    assert [res.latency[k] for k in (0, 1, 3)] == pytest.approx([0.04, 0.08, 0.04])  # the last after an idle gap
    assert res.queue[1] == pytest.approx(0.04) and res.end == pytest.approx(1.04)


def test_simulator_adds_the_per_request_and_vae_costs():
    curve = CostCurve(encoder=((1, 0.01), (2, 0.02)), decoder=((1, 0.01), (2, 0.02)),
                      vae_decoder=((1, 0.5), (2, 0.5)), iteration_s=0.1, request_step_s=0.01, request_s=1.0)
    one = spec(num=1, steps=2, schedule=(0, 1), cfg=1.0)  # 2 iterations of 1 encoder + 1 decoder row
    res = simulate([Arrival(0.0, one, 0)], curve, 8)
    assert res.latency[0] == pytest.approx(2 * (0.02 + 0.1 + 0.01) + 0.5 + 1.0)
    assert curve.call("encoder", 4) == pytest.approx(0.04)  # extrapolated from the last two points
    assert res.iterations == 2 and res.requests_per_iteration == 1
    # the encoder on every other step: 0.5 encoder rows and 1 decoder row per iteration
    res = simulate([Arrival(0.0, spec(num=1, steps=4, schedule=(0, 2), cfg=1.0), 0)], curve, 8)
    assert res.rows_per_iteration == {"encoder": 0.5, "decoder": 1.0}


def test_simulated_runner_reports_what_it_charged():
    clock = VirtualClock()
    curve = CostCurve(encoder=((1, 1.0), (4, 4.0)), decoder=((1, 10.0), (4, 40.0)), vae_decoder=((1, 100.0), (4, 400.0)))
    eng = Engine(Scheduler(8), SimulatedRunner(curve, clock), clock)
    a = eng.submit(spec(num=2, steps=1, schedule=(0,), cfg=1.0))  # one step: 2 encoder + 2 decoder rows, VAE 2
    it = eng.step()
    assert (it.res.step_s, it.res.vae_s, it.res.vae_rows) == (2.0 + 20.0, 200.0, 2)
    assert a.sampled == pytest.approx(22.0) and a.ended == pytest.approx(222.0) and clock() == 222.0
