"""Service levels in the scheduler, without engines: SLO accounting, the projection, load-adaptive plans (by
budget, by priority, never for a request that allows no trade, 503 only when no plan fits), the frontier, the
sound switch points, the cost curve's fit and `--batching auto`'s choice. Every timeline below is derived by
hand on a virtual clock from the curve LINEAR (0.01 s per encoder row and per decoder row, nothing else), the
executor the simulator's (`SimulatedRunner`: it charges the curve), never graphs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ddt_export.core.config import SamplerConfig, load_config
from ddt_export.core.errors import ConfigError, InputError
from ddt_export.core.flops import step_flops
from ddt_export.runtime.batching.auto import choose_policy, policy_workload
from ddt_export.runtime.batching.calibrate import Calibration
from ddt_export.runtime.batching.costs import CostCurve, fit_curve, linearity, solo_seconds
from ddt_export.runtime.batching.engine import Engine
from ddt_export.runtime.batching.report import Served, compare, summarize
from ddt_export.runtime.batching.scheduler import Scheduler, SloModel, SloUnreachable, Status
from ddt_export.runtime.batching.simulate import (Arrival, SimulatedRunner, VirtualClock, gpu_like_curve,
                                                  simulate)
from ddt_export.runtime.batching.slo import PRIORITY, Option, Terms, check_terms, frontier
from ddt_export.runtime.sampling.grammar import ScheduleSpec
from ddt_export.runtime.sampling.plan import plan_steps
from ddt_export.runtime.sampling.request import SampleRequest
from ddt_export.runtime.sampling.step import switch_point

# N = 10, last_step 0.04: t_i = 0.10667 i, so the guidance interval 0.3 < t < 1 holds steps 3..9
SAMPLER = SamplerConfig(num_steps=10, guidance=1.5, guidance_interval=(0.3, 1.0), last_step=0.04)
ROWS = (1, 2, 4, 8, 16, 32, 64)
LINEAR = CostCurve(tuple((r, 0.01 * r) for r in ROWS), tuple((r, 0.01 * r) for r in ROWS))
LOW, NORMAL, HIGH = PRIORITY["low"], PRIORITY["normal"], PRIORITY["high"]


def spec(num=1, steps=10, cfg=1.0, interval=(0.3, 1.0), plan=None) -> SampleRequest:
    """A resolved request, every step recomputing the encoder. cfg 1.0: no CFG rows, so each step costs
    num encoder rows + num decoder rows = 0.02 s per image on LINEAR."""
    s = dataclasses.replace(SAMPLER, num_steps=steps, guidance=cfg, guidance_interval=interval)
    return SampleRequest(np.zeros(num, np.int64), 0, s, ScheduleSpec("all"), tuple(range(steps)), plan)


def engine(policy="step", budget=8, curve=LINEAR, scale=3.0, adapt="cheapest", machine=None, calibration=None):
    """(engine, clock): a scheduler believing `curve` on a simulated machine running `machine` (default: curve)."""
    clock = VirtualClock()
    return Engine(Scheduler(budget, policy, slo=SloModel(curve, scale, adapt)),
                  SimulatedRunner(machine or curve, clock), clock, calibration), clock


def run(eng):
    while not eng.idle:
        eng.step()


def adaptive(*options, priority=NORMAL, deadline=None):
    return Terms(priority, deadline, tuple(Option(s.plan, s, d) for s, d in options), adaptive=True, dfid=0.0)


# ------------------------------------------------------------------------------------------------ accounting


def test_slo_accounting_timeline_by_hand():
    # a: 1 image x 8 steps = 0.16 s alone, due 0.48; b: 2 images x 5 steps = 0.2 s, due 0.6; c: 1 x 10 = 0.2 s,
    # its own deadline 0.25. All arrive at 0 and share every iteration (step policy, 4 rows of 8):
    # 5 iterations of 0.08 s (b done at 0.4), then a and c at 0.04 s (a done at 0.52), then c alone at 0.02 s
    # (done at 0.56).
    arrivals = [Arrival(0.0, spec(1, 8), 0), Arrival(0.0, spec(2, 5), 1), Arrival(0.0, spec(1, 10), 2,
                                                                                   Terms(deadline_s=0.25))]
    eng, clock = engine()
    reqs = [eng.submit(a.spec, arrival=a.t, terms=a.terms) for a in arrivals]
    assert [r.solo_s for r in reqs] == pytest.approx([0.16, 0.2, 0.2])
    assert [r.due for r in reqs] == pytest.approx([0.48, 0.6, 0.25])
    assert [eng.scheduler.project(0.0, r) for r in reqs] == pytest.approx([0.52, 0.4, 0.56])  # the projection ...
    run(eng)
    assert [r.ended for r in reqs] == pytest.approx([0.52, 0.4, 0.56])  # ... is what happens with no arrivals
    assert [r.slo_met for r in reqs] == [False, True, False]
    s = simulate(arrivals, LINEAR, 8, "step").summary()  # the simulator reports the same run
    assert (s["offered"], s["answered"], s["slo_met"], s["rejected_503"]) == (3, 3, 1, 0)
    assert s["slo_attainment"] == pytest.approx(1 / 3) and s["goodput"] == pytest.approx(1 / 0.56)
    assert s["throughput"] == pytest.approx(3 / 0.56) and s["p50"] == pytest.approx(0.52)
    assert s["mean_dfid_served"] is None  # no plan with a known dFID ran


def test_a_failed_request_misses_and_a_cancelled_one_is_not_counted():
    eng, _ = engine()
    a, b = eng.submit(spec()), eng.submit(spec())
    eng.step()
    eng.cancel(b)
    eng.step()
    eng.scheduler.abort(RuntimeError("x"), 1.0)
    assert (a.status, a.slo_met) == (Status.FAILED, False) and (b.status, b.slo_met) == (Status.CANCELLED, None)


def test_summary_counts_refusals_as_misses():
    served = [Served(1.0, True, 0.0), Served(3.0, False, 2.0, "fast", True, True), Served(2.0, True, None)]
    s = summarize(served, offered=4, rejected=1, span=10.0)
    assert s["slo_attainment"] == pytest.approx(2 / 4) and s["goodput"] == pytest.approx(0.2)
    assert s["mean_dfid_served"] == pytest.approx(1.0) and s["degraded"] == 1 and s["p50"] == pytest.approx(2.0)
    errs = compare({"p50": 2.2, "goodput": 0.2}, s, ("p50", "goodput", "p99"))
    assert errs["p50"] == pytest.approx(0.1) and errs["goodput"] == 0.0 and errs["p99"] is None


# ------------------------------------------------------------------------------------------------ adaptive plans


def heavy_then(q_terms, q=None, adapt="cheapest"):
    """r0 (4 images x 10 steps, 0.08 s a step, allows no trade) and then q: 1 image x 10 steps (own plan: 0.2 s
    alone, due 0.6), with the options p5 (5 steps, dFID 1.0) and p2 (2 steps, dFID 3.0)."""
    eng, clock = engine(adapt=adapt)
    r0 = eng.submit(spec(4))
    q = eng.submit(q or spec(1), terms=q_terms)
    return eng, r0, q


P5, P2 = spec(1, 5, plan="p5"), spec(1, 2, plan="p2")


def test_a_late_request_moves_to_its_cheapest_plan_or_the_least_dfid_that_meets_its_slo():
    # with r0 each iteration costs 0.08 + 0.02: its own plan ends at 1.0 > 0.6; p5 at 0.5 (meets); p2 at 0.2
    eng, r0, q = heavy_then(adaptive((P5, 1.0), (P2, 3.0)))  # cheapest (the default): p2
    assert (q.plan, q.dfid, q.degraded, q.switched_at, q.total_steps) == ("p2", 3.0, True, 0, 2)
    run(eng)
    assert q.ended == pytest.approx(0.2) and q.slo_met and r0.plan is None and not r0.degraded
    eng, r0, q = heavy_then(adaptive((P5, 1.0), (P2, 3.0)), adapt="least-dfid")  # the least dFID that meets: p5
    assert (q.plan, q.dfid, q.degraded, q.switched_at, q.total_steps) == ("p5", 1.0, True, 0, 5)
    run(eng)
    assert q.ended == pytest.approx(0.5) and q.slo_met
    # a tighter deadline (0.3) needs p2 (2 x 0.1 = 0.2) under either rule; with room to spare, its own plan
    eng, r0, q = heavy_then(adaptive((P5, 1.0), (P2, 3.0), deadline=0.3), adapt="least-dfid")
    assert q.plan == "p2" and q.dfid == 3.0
    eng, r0, q = heavy_then(adaptive((P5, 1.0), (P2, 3.0), deadline=1.5))
    assert q.plan is None and not q.degraded


def test_the_budget_bounds_the_move_and_the_frontier_drops_what_is_not_worth_it():
    # a budget of 1.0 (only p5 offered): deadline 0.3 is out of reach (p5 ends at 0.5): 503
    with pytest.raises(SloUnreachable, match=r"latency: expected <= 0.300 s .* got 0.500 s projected on the "
                                             r"fastest \(p5\)"):
        heavy_then(adaptive((P5, 1.0), deadline=0.3))
    # a plan costlier than the one asked for, one with no dFID, and a dominated one are never options
    cost = [0.1, 0.3, 0.05, 0.12, 0.05]
    opts = [Option("a", P5, 1.0), Option("dear", P5, 0.5), Option("b", P2, 3.0), Option("worse", P5, 2.0),
            Option("unknown", P2, None)]
    assert frontier(opts, cost, asked_cost=0.2) == [0, 2]  # least dFID first, cost falling


def test_a_request_that_allows_no_trade_is_never_moved_nor_refused():
    eng, r0, q = heavy_then(Terms(deadline_s=0.01))  # no budget: it misses, as asked
    assert not q.adaptive and q.plan is None and q.total_steps == 10
    run(eng)
    assert q.ended == pytest.approx(1.0) and q.slo_met is False and not q.degraded
    # an adaptive request whose options are none cheaper is refused only when its own plan misses
    eng, r0, q = heavy_then(adaptive(deadline=1.5))
    assert q.adaptive and q.options[1:] == () and q.plan is None


def test_503_only_when_no_plan_within_budget_fits_and_nothing_is_left_behind():
    eng, r0, _ = heavy_then(Terms())
    waiting = list(eng.scheduler.waiting)
    with pytest.raises(SloUnreachable):
        eng.submit(spec(1), terms=adaptive((P5, 1.0), (P2, 3.0), deadline=0.1))  # p2 ends at 0.2 + ...
    assert list(eng.scheduler.waiting) == waiting  # the refused request is not held
    ok = eng.submit(spec(1), terms=adaptive((P5, 1.0), (P2, 3.0), deadline=10.0))
    assert ok.plan is None  # with room to spare, its own plan


def test_priorities_order_admission():
    eng, _ = engine(budget=2)
    x = eng.submit(spec(2, 1))  # fills the budget for one iteration
    eng.step()
    a, b, c, d = (eng.submit(spec(2, 1), terms=Terms(priority=p)) for p in (LOW, NORMAL, HIGH, NORMAL))
    assert x.status is Status.DONE and list(eng.scheduler.waiting) == [c, b, d, a]
    assert [eng.step().admitted for _ in range(4)] == [[c], [b], [d], [a]]


def test_low_priority_degrades_first():
    # r0 (2 images, 0.04 s a step) runs; L (low, 2 images x 10 steps, due 1.2) meets its SLO beside it (0.8) on its
    # own plan; H (high, 1 image x 10, deadline 0.7) then misses on its own (1.0): L moves to its fastest plan
    # (2 steps), and H meets on its own: 2 iterations of 0.1 s, then 8 of r0 + H at 0.06 s = 0.68 <= 0.7
    lo2 = spec(2, 2, plan="l2")
    for h_priority, h_moves in ((HIGH, False), (LOW, True)):
        eng, _ = engine()
        eng.submit(spec(2))
        low = eng.submit(spec(2), terms=adaptive((lo2, 2.0), priority=LOW))
        assert low.plan is None
        h = eng.submit(spec(1), terms=adaptive((P5, 1.0), priority=h_priority, deadline=0.7))
        if not h_moves:  # H outranks L: L is moved, H keeps its plan
            assert (low.plan, h.plan) == ("l2", None)
            run(eng)
            assert h.ended == pytest.approx(0.68) and h.slo_met and low.slo_met
        else:  # equal priorities: H is not worth more than L, so H moves itself (its cheapest: p5, 0.5)
            assert (low.plan, h.plan) == (None, "p5")


# ------------------------------------------------------------------------------------------------ switch points


def test_switch_points_by_hand():
    a, b = plan_steps(SAMPLER, range(10)), plan_steps(dataclasses.replace(SAMPLER, guidance_interval=(0.9, 1.0)),
                                                      range(10))
    # a is guided from step 3 (t = 0.32), b only at step 9: steps 0-2 are the same in both, so a request on a can
    # move to b at boundaries 0..3
    assert switch_point(a, SAMPLER, b, b_s := dataclasses.replace(SAMPLER, guidance_interval=(0.9, 1.0))) == 3
    five = dataclasses.replace(SAMPLER, num_steps=5)
    assert switch_point(a, SAMPLER, plan_steps(five, range(5)), five) == 0  # another grid: from step 0's dt on
    adams = dataclasses.replace(b_s, solver="adams:2")
    assert switch_point(a, SAMPLER, plan_steps(adams, range(10)), adams) == 0  # Euler kept no velocities
    sde = dataclasses.replace(b_s, step_fn="sde")
    assert switch_point(a, SAMPLER, plan_steps(sde, range(10)), sde) == 0  # other noise draws
    assert switch_point(a, SAMPLER, a, SAMPLER) == 9  # itself: up to its last step


def test_a_running_request_moves_only_at_a_sound_boundary():
    # q runs plan A (guided from step 3: 3 steps of 0.02 s, 7 of 0.04 s = 0.34 s alone), deadline 0.36; B is
    # guided at step 9 only (0.22 s). The clock stands still at 0 (projections from 0): after 2 steps h (1 image,
    # 10 steps, no trade) arrives; A would then end at 0.30 + 8 x 0.02 = 0.46 > 0.36, B at 0.18 + 0.16 = 0.34.
    # Boundary 2 <= 3 is sound: q moves there.
    a = spec(1, 10, cfg=1.5)
    b = spec(1, 10, cfg=1.5, interval=(0.9, 1.0), plan="b")
    eng, clock = engine()
    sch = eng.scheduler
    q = eng.submit(a, terms=adaptive((b, 0.7), deadline=0.36))
    assert q.plan is None and sch.project(0.0, q) == pytest.approx(0.34)
    for _ in range(2):
        eng.step()
        clock.t = 0.0
    eng.submit(spec(1))
    it = eng.step()
    assert it.out.switched == ((q.id, b),) and (q.plan, q.switched_at, q.done_steps) == ("b", 2, 3)
    assert [st for _, st in it.out.batch][0] == plan_steps(b.sampler, b.recompute)[2]
    # past boundary 3 no move is sound: the same arrival after 4 steps leaves q on A
    eng, clock = engine()
    sch = eng.scheduler
    q = eng.submit(a, terms=adaptive((b, 0.7), deadline=0.36))
    for _ in range(4):
        eng.step()
        clock.t = 0.0
    eng.submit(spec(1))
    assert eng.step().out.switched == () and q.plan is None


def test_the_calibration_rescales_the_curve_to_the_measured_iterations():
    # every iteration measures 1.5x its prediction: the ratio of the decayed sums is 1.5 whatever the decay; the
    # curve changes only after WARMUP (32) iterations, then every 32
    cal = Calibration(LINEAR)
    assert not any(cal.observe(0.02, 0.03) for _ in range(31)) and cal.k == 1.0 and cal.curve is LINEAR
    assert cal.observe(0.02, 0.03) and cal.k == pytest.approx(1.5)
    assert cal.curve.call("encoder", 4) == pytest.approx(0.06) and cal.curve.iteration(2, 1, 1) == pytest.approx(0.03)
    assert cal.to_dict() == {"k": pytest.approx(1.5), "iterations": 32, "half_life": 200}
    assert not cal.observe(0.0, 1.0) and cal.iterations == 32  # nothing predicted: nothing learned


def test_the_engine_calibrates_the_scheduler_to_a_slower_machine():
    # the machine runs LINEAR x 2 (0.04 s per 1-image step at cfg 1), the scheduler believes LINEAR (0.02 s):
    # a 1-image 10-step request alone predicts 0.2 s solo. Four of them one after the other: 40 iterations, the
    # curve corrected at the 32nd to k = 2, so the next request's solo latency is 0.4 s and its due 3 x 0.4 s
    eng, clock = engine("slo", machine=LINEAR.scaled(2.0), calibration=Calibration(LINEAR))
    sch = eng.scheduler
    first = eng.submit(spec(1))
    assert first.solo_s == pytest.approx(0.2)
    run(eng)
    assert first.ended == pytest.approx(0.4) and first.slo_met  # 0.4 <= 3 x 0.2
    for _ in range(3):
        eng.submit(spec(1))
        run(eng)
    assert eng.calibration.k == pytest.approx(2.0) and sch.slo.curve.call("decoder", 1) == pytest.approx(0.02)
    t = clock()
    late = eng.submit(spec(1))
    assert late.solo_s == pytest.approx(0.4) and late.due == pytest.approx(t + 1.2)
    run(eng)
    assert late.ended - t == pytest.approx(0.4)


# ------------------------------------------------------------------------------------------------ terms


@pytest.mark.parametrize("kw, message", [
    ({"deadline_ms": 0}, "deadline_ms: expected a finite number > 0"),
    ({"deadline_ms": "100"}, "deadline_ms: expected a finite number > 0"),
    ({"deadline_ms": float("nan")}, "deadline_ms: expected a finite number > 0"),
    ({"max_fid_delta": -0.5}, "max_fid_delta: expected a finite number >= 0"),
    ({"max_fid_delta": float("nan")}, "max_fid_delta: expected a finite number >= 0"),
    ({"priority": "urgent"}, "priority: expected low | normal | high, got 'urgent'"),
    ({"quality": "best"}, "quality: expected exact | adaptive"),
    ({"quality": "adaptive", "max_fid_delta": 1.0}, "max_fid_delta: expected either max_fid_delta or quality"),
])
def test_terms_refused_naming_the_field(kw, message):
    with pytest.raises(InputError) as e:
        check_terms(**kw)
    assert str(e.value).startswith(message)


def test_terms_accepted():
    assert check_terms("low", 250, None, "adaptive") == {"priority": LOW, "deadline_s": 0.25, "budget": "fast"}
    assert check_terms(max_fid_delta=0) == {"priority": NORMAL, "deadline_s": None, "budget": 0.0}


# ------------------------------------------------------------------------------------------------ curve and auto


def test_solo_latency_by_hand():
    # 2 images, cfg 1.5, every step recomputing: steps 0-2 cost 2 + 2 rows, steps 3-9 4 + 4 rows (both halves)
    steps = plan_steps(SAMPLER, range(10))
    assert solo_seconds(LINEAR, steps, 2) == pytest.approx(3 * 0.04 + 7 * 0.08)
    curve = dataclasses.replace(LINEAR, request_step_s=0.001, vae_decoder=((1, 0.5), (2, 0.6)))
    assert solo_seconds(curve, steps, 2) == pytest.approx(3 * 0.04 + 7 * 0.08 + 10 * 0.001 + 0.6)


def test_fit_curve_is_a_robust_line_through_the_medians():
    c = fit_curve({"encoder": {1: [0.03], 2: [0.05, 0.9, 0.05], 4: [0.09, 0.08, 0.1]},  # 0.9: a burst of other work
                   "decoder": {1: [0.01], 3: [0.01]},  # flat: a fixed cost per call
                   "vae_decoder": {1: [0.0], 2: [0.03]}}, request_step_s=-0.001)  # free line: 0.03 r - 0.03

    def flat(pts):
        return [v for p in pts for v in p]

    assert flat(c.encoder) == pytest.approx([1, 0.03, 2, 0.05, 4, 0.09, 8, 0.17])  # 0.01 + 0.02 r
    assert flat(c.decoder) == pytest.approx([1, 0.01, 3, 0.01, 6, 0.01])
    # a < 0: the line through 0, b = the median of 0 / 1 and 0.03 / 2 = 0.0075
    assert flat(c.vae_decoder) == pytest.approx([1, 0.0075, 2, 0.015, 4, 0.03]) and c.request_step_s == 0
    # one point spoiled by other work (8 rows: 0.5 s; the line says 0.17) moves nothing: 6 of the 10 slopes are
    # 0.02, the other four are split around it (-0.021 below, 0.067, 0.075, 0.1025 above)
    spoiled = fit_curve({"encoder": {1: [0.03], 2: [0.05], 4: [0.09], 8: [0.5], 16: [0.33]}, "decoder": {1: [0.01]}})
    assert flat(spoiled.encoder)[:4] == pytest.approx([1, 0.03, 2, 0.05])
    assert c.call("encoder", 3) == pytest.approx(0.07) and c.call("encoder", 16) == pytest.approx(0.33)
    with pytest.raises(ConfigError, match="timed calls of the decoder"):
        fit_curve({"encoder": {1: [0.1]}})


def test_auto_chooses_by_simulated_attainment_on_either_curve():
    # `slo` (deadline order) wins on both kinds of curve; among the processor-sharing policies the ranking
    # reverses with the curve: `fair` on a linear one, `step` on a sublinear one
    digits, xl = load_config("ddt-tiny-digits"), load_config("ddt-xl-256")
    f = step_flops(xl.model)
    gpu = gpu_like_curve(f.encoder, f.decoder, 0.31e12)
    assert linearity(LINEAR) == pytest.approx(1.0) and linearity(gpu) < 0.2
    cpu = choose_policy(LINEAR, 64, policy_workload(digits.sampler, 32))
    att = {p: s["slo_attainment"] for p, s in cpu.scores.items()}
    assert cpu.policy == "slo" and att["slo"] == max(att.values()), cpu.scores
    assert att["fair"] > att["step"] and cpu.scores["fair"]["p99_slowdown"] < cpu.scores["step"]["p99_slowdown"]
    on_gpu = choose_policy(gpu, 64, policy_workload(xl.sampler, 32))
    att = {p: s["slo_attainment"] for p, s in on_gpu.scores.items()}
    assert on_gpu.policy == "slo" and att["slo"] == max(att.values()), on_gpu.scores
    assert att["step"] > att["fair"]


def test_read_curve_takes_its_own_json_and_gpu_checks(tmp_path):
    import json

    from ddt_export.runtime.batching.costs import read_curve

    own = tmp_path / "curve.json"
    own.write_text(json.dumps({"curve": LINEAR.to_dict(), "budget": 64}))  # as the load benchmark nests it
    assert read_curve(own) == LINEAR
    check = tmp_path / "gpu_check.json"  # scripts/gpu_check.py's results.cost-curve: seconds by rows, as text keys
    check.write_text(json.dumps({"results": {"cost-curve": {"gpu": "H200", "encoder": {"1": 0.002, "8": 0.003},
                                                            "decoder": {"8": 0.004, "1": 0.003}}}}))
    c = read_curve(check)
    assert c.encoder == ((1, 0.002), (8, 0.003)) and c.decoder == ((1, 0.003), (8, 0.004)) and "H200" in c.note
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"^--cost-curve: expected a cost-curve JSON"):
        read_curve(bad)
