"""The model runner of step-level batching (runtime.batching.runner) on real tiny engines, driven by the one
serving engine on a virtual clock: requests batched together, joining at different iterations, equal the host loop
run on each alone (itself checked against the official sampler in test_generate.py); per-row t; one call per graph
per iteration; a NaN fails its request only."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ddt_export.core.errors import InputError, NumericsError
from ddt_export.core.images import images_from_samples
from ddt_export.core.noise import StepNoise, sample_noise
from ddt_export.runtime import load_engines, sample
from ddt_export.runtime.batching.costs import CostCurve
from ddt_export.runtime.batching.engine import Engine
from ddt_export.runtime.batching.runner import ModelRunner
from ddt_export.runtime.batching.scheduler import Scheduler, SloModel, Status
from ddt_export.runtime.batching.simulate import VirtualClock
from ddt_export.runtime.batching.slo import Option, Terms
from ddt_export.runtime.sampling.plan import plan_steps
from ddt_export.runtime.sampling.request import API, RequestInput, SampleRequest, resolve
from ddt_export.runtime.sampling.schedules import resolve_schedule
from ddt_export.runtime.sampling.step import switch_point


@pytest.fixture(scope="module")
def engines(tiny_engines):
    with load_engines(tiny_engines[0]) as e:
        yield e


class CallLog:
    """Calls through to the real graphs (a `Graphs`), recording what each call got."""

    def __init__(self, engines):
        self.engines, self.calls = engines, []
        self.config, self.max_batch, self.min_batch = engines.config, engines.max_batch, engines.min_batch
        self.vae_decoder = engines.vae_decoder

    def run(self, graph, feeds):
        self.calls.append((graph, len(next(iter(feeds.values()))), feeds["t"].copy() if graph == "encoder" else None))
        return self.engines.run(graph, feeds)


def solo(engines, spec: SampleRequest) -> np.ndarray:
    """What `generate` computes for the request: the host loop on its own noise."""
    idx = range(spec.num)
    return sample(engines, sample_noise(spec.seed, idx, engines.config.model.latent_shape), spec.labels,
                  spec.sampler, spec.recompute, rng=StepNoise(spec.seed, idx))


def run(engines, arrivals: dict[int, list[SampleRequest]], budget=None, policy="step"):
    """Drive the serving engine (real runner, virtual clock: one unit per iteration); arrivals[k] are submitted
    before iteration k. Returns (requests, iterations)."""
    clock = VirtualClock()
    eng = Engine(Scheduler(budget or engines.max_batch, policy), ModelRunner(engines), clock)
    reqs, its = [], []
    while clock() <= max(arrivals) or not eng.idle:
        reqs += [eng.submit(s) for s in arrivals.get(int(clock()), [])]
        it = eng.step()
        if it is not None:
            its.append(it)
        clock.advance(1.0)
    return reqs, its


def req(engines, **kw) -> SampleRequest:
    """A request through the one resolver, as the API resolves a body."""
    label = kw.pop("label")
    return resolve_schedule(resolve(engines.config, RequestInput(classes=(label,), **kw), API), engines,
                            lambda m: None)


def mixed(engines):
    """Requests that differ in everything a request can set (and an SDE sampler, for the step noise)."""
    def r(**kw):
        return req(engines, **kw)

    sde_req = r(label=2, num=2, seed=5, steps=9, schedule="uniform:3")
    sde = dataclasses.replace(sde_req, sampler=dataclasses.replace(sde_req.sampler, step_fn="sde"))
    return {0: [r(label=1, num=2, seed=3, steps=20, schedule="all"),
                r(label=5, num=1, seed=0, steps=7, cfg=4.0, schedule="uniform:2")],
            2: [r(label=9, num=3, seed=11, steps=12, cfg=2.0, schedule="uniform:4", interval=(0.1, 0.6),
                  timeshift=2.0),
                sde],
            5: [r(label=0, num=1, seed=7, steps=3, cfg=1.0, schedule="all"),
                r(label=6, num=2, seed=2, steps=10, schedule="uniform:3", solver="adams:3", forecast=1)],
            6: [r(label=8, num=1, seed=9, steps=8, schedule="uniform:2", solver="adams:2", forecast=2, cfg=3.0)]}


def test_batched_requests_equal_each_run_alone(engines):
    reqs, its = run(engines, mixed(engines))
    assert max(len(it.stepped) for it in its) == 7  # all seven shared iterations (four plans: solvers, forecasts)
    assert any(len({st.i for _, st in it.out.batch}) > 2 for it in its)  # ... at different steps
    for r in reqs:
        want = solo(engines, r.sample)
        assert r.status is Status.DONE
        assert np.array_equal(r.images, images_from_samples(want)), r.sample  # to the uint8 pixel


def test_the_runner_equals_the_host_loop_in_float32(engines):
    """The runner's final latents (before the VAE) for one request equal the host loop's, bit for bit: one
    request alone takes exactly the host loop's graph calls."""
    spec = req(engines, label=3, num=2, seed=4, steps=12, cfg=2.5, schedule="uniform:2")
    runner = ModelRunner(engines)
    eng = Engine(Scheduler(engines.max_batch), runner, VirtualClock())
    r = eng.submit(spec)
    final = None
    while not eng.idle:
        if r.done_steps == spec.sampler.num_steps - 1:
            final = runner.rows[r.id]
        eng.step()
    assert np.array_equal(final.x, solo(engines, spec))


def test_one_call_per_graph_per_iteration_with_per_row_t(engines):
    log = CallLog(engines)
    _, its = run(log, mixed(engines))
    enc = [c for c in log.calls if c[0] == "encoder"]
    dec = [c for c in log.calls if c[0] == "decoder"]
    assert len(dec) == len(its) and [c[1] for c in dec] == [it.out.decoder_rows for it in its]
    with_enc = [it for it in its if it.out.encoder_rows]
    assert [c[1] for c in enc] == [it.out.encoder_rows for it in with_enc]
    for (_, _, t), it in zip(enc, with_enc):  # each row carries its own request's t, both halves where planned
        want = [st.t for r, (_, st) in zip(it.stepped, it.out.batch) if st.recompute
                for _ in range((2 if st.enc_uncond else 1) * r.num)]
        assert np.array_equal(t, np.array(want, np.float32))
    assert len({float(v) for _, _, t in enc for v in t}) > 10


@pytest.mark.parametrize("policy", ["step", "fair"])
def test_rows_stay_within_the_budget(engines, policy):
    reqs, its = run(engines, mixed(engines), budget=8, policy=policy)
    assert max(it.out.decoder_rows for it in its) <= 8 and max(it.out.encoder_rows for it in its) <= 8
    for r in reqs:
        assert np.array_equal(r.images, images_from_samples(solo(engines, r.sample)))


def test_nan_fails_that_request_only(engines):
    arrivals = mixed(engines)
    # CFG 1e30 (beyond what a request may ask: built here by hand) blows x up inside the interval: the graphs then
    # return NaN/Inf for that request's rows only
    ok = req(engines, label=4, num=2, seed=1, steps=20, cfg=2.0, schedule="all")
    arrivals[0].append(dataclasses.replace(ok, sampler=dataclasses.replace(ok.sampler, guidance=1e30)))
    reqs, its = run(engines, arrivals)
    bad = [r for r in reqs if r.sample.sampler.guidance == 1e30][0]
    assert bad.status is Status.FAILED and isinstance(bad.error, NumericsError)
    assert bad.done_steps < 20
    assert str(bad.error).startswith(f"step {bad.done_steps}: ")
    assert any(t in str(bad.error) for t in ("encoder output s", "decoder output v", "latents x"))
    failing = [it for it in its if bad in it.finished][0]
    assert len(failing.stepped) > 1  # it failed in an iteration it shared with other requests ...
    for r in reqs:
        if r is not bad:  # ... and they are untouched
            assert r.status is Status.DONE
            assert np.array_equal(r.images, images_from_samples(solo(engines, r.sample)))


def test_an_engine_error_fails_the_iteration_and_the_runner_goes_on(engines):
    class Broken(CallLog):
        def run(self, graph, feeds):
            if graph == "decoder" and len(self.calls) == 3:
                self.calls.append(("boom", 0, None))
                raise RuntimeError("device lost")
            return super().run(graph, feeds)

    reqs, its = run(Broken(engines), {0: [req(engines, label=1, num=1, steps=4), req(engines, label=2, num=1, steps=4)],
                                      3: [req(engines, label=3, num=1, steps=2)]})
    a, b, c = reqs
    assert a.status is b.status is Status.FAILED and "engine call (encoder/decoder)" in str(a.error)
    assert "RuntimeError: device lost" in str(b.error)
    assert c.status is Status.DONE and np.array_equal(c.images, images_from_samples(solo(engines, c.sample)))


def test_requests_name_their_fields_the_way_the_api_does(engines):
    with pytest.raises(InputError, match=r"^interval: expected \[lo, hi\] with 0 <= lo <= hi <= 1"):
        req(engines, label=0, num=1, interval=(0.8, 0.2))
    with pytest.raises(InputError, match=r"^timeshift: expected a finite number in \(0, 100\]"):
        req(engines, label=0, num=1, timeshift=0.0)
    with pytest.raises(InputError, match=r"^schedule: expected dp:K with K <= 5 \(the steps\), got dp:9"):
        req(engines, label=0, num=1, steps=5, schedule="dp:9")
    with pytest.raises(InputError, match=r"^class: expected a class id in \[0, 10\), got 10"):
        req(engines, label=10, num=1)
    with pytest.raises(InputError, match=r"^schedule: expected all \| uniform:R \| dp:K, got x.json"):
        req(engines, label=0, num=1, schedule="x.json")  # no file names over HTTP
    s = req(engines, label=3, num=2)
    assert s.sampler == engines.config.sampler and str(s.schedule) == "all" and s.recompute == tuple(range(20))


def test_a_request_moved_mid_trajectory_equals_the_plan_it_ran(engines):
    """A request that allows a quality trade, moved at a sound step boundary to a cheaper plan (the guidance
    interval (0.9, 1) instead of (0.3, 1): the two share steps 0-2), returns exactly what `generate` computes for
    that plan: its images are the new plan's, to the uint8 pixel, and not the old one's. The scheduler's clock
    stands still at 0 and its cost curve is 0.01 s per row (its decisions only: the graphs are real)."""
    rows = (1, 2, 4, 8, 16, 32, 64)
    curve = CostCurve(tuple((r, 0.01 * r) for r in rows), tuple((r, 0.01 * r) for r in rows))
    a = req(engines, label=4, num=1, seed=6, steps=10, cfg=2.0, schedule="all")
    b = dataclasses.replace(req(engines, label=4, num=1, seed=6, steps=10, cfg=2.0, schedule="all",
                                interval=(0.9, 1.0)), plan="b")
    assert switch_point(plan_steps(a.sampler, a.recompute), a.sampler, plan_steps(b.sampler, b.recompute),
                        b.sampler) == 3
    sch = Scheduler(engines.max_batch, "step", slo=SloModel(curve))
    eng = Engine(sch, ModelRunner(engines), VirtualClock())
    q = eng.submit(a, terms=Terms(deadline_s=0.36, options=(Option("b", b, 0.7),), adaptive=True, dfid=0.0))
    assert q.plan is None and sch.project(0.0, q) == pytest.approx(0.34)  # alone, its own plan meets 0.36
    eng.step()
    eng.step()
    other = eng.submit(req(engines, label=1, num=1, seed=2, steps=10, cfg=1.0, schedule="all"))
    it = eng.step()  # with `other` beside it, plan a would end at 0.46; b at 0.34: moved at boundary 2
    assert it.out.switched == ((q.id, b),) and (q.plan, q.switched_at) == ("b", 2)
    while not eng.idle:
        eng.step()
    assert q.status is Status.DONE and other.status is Status.DONE
    assert np.array_equal(q.images, images_from_samples(solo(engines, b)))  # what generate makes for plan b
    assert not np.array_equal(q.images, images_from_samples(solo(engines, a)))
    assert np.array_equal(other.images, images_from_samples(solo(engines, other.sample)))


def test_the_start_up_measurement_times_every_graph_at_every_row_count(engines):
    """`measure_curve`'s plumbing with a stand-in clock (each reading one second later than the last, so every
    timed call takes 1 s): each graph is called at 1, 2, 4, ..., batch.max rows, largest first after a 1-row
    warm-up, twice per point (the first call of a shape is not counted; 1 s is over the 0.2 s a point may
    spend); a step's host time is its 5 clock readings' span less its two graph calls (1 s each): 3 s."""
    from ddt_export.runtime.batching.costs import curve_rows, measure_curve

    log = CallLog(engines)
    ticks = iter(range(10 ** 6))
    curve = measure_curve(log, clock=lambda: float(next(ticks)))
    rows = curve_rows(engines.max_batch)
    assert rows[0] == 1 and rows[-1] == engines.max_batch and all(b == 2 * a for a, b in zip(rows, rows[1:-1]))
    assert curve.encoder == tuple((r, 1.0) for r in [*rows, 2 * rows[-1]])  # the line, to twice batch.max
    assert curve.decoder == curve.encoder
    assert curve.vae_decoder == ((1, 0.0), (2, 0.0)) and curve.request_step_s == 3.0  # no VAE graph here
    calls = [(g, n) for g, n, _ in log.calls]
    want = [(g, r) for r in [1, *sorted(rows, reverse=True)] for g in ("encoder", "encoder", "decoder", "decoder")]
    assert calls[:len(want)] == want and calls[len(want):] == [("encoder", 1), ("decoder", 1)] * 4  # + 4 steps
