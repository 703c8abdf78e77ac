"""The model step of step-level batching (runtime.batching.runner) on real tiny engines: requests batched together,
joining at different iterations, equal the host loop run on each alone (itself checked against the official
sampler in test_generate.py); per-row t; one call per graph per iteration; a NaN fails its request only."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ddt_export.core.errors import InputError, NumericsError
from ddt_export.core.images import images_from_samples
from ddt_export.core.noise import StepNoise, sample_noise
from ddt_export.runtime import load_engines, sample
from ddt_export.runtime.batching.runner import finish, resolve_request, run_iteration, start
from ddt_export.runtime.batching.scheduler import DONE, FAILED, RequestSpec, Scheduler


@pytest.fixture(scope="module")
def engines(tiny_engines):
    with load_engines(tiny_engines[0]) as e:
        yield e


class CallLog:
    """Calls through to the real graphs, recording what each call got."""

    def __init__(self, engines):
        self.engines, self.calls = engines, []

    def __getattr__(self, name):
        return getattr(self.engines, name)

    def encoder(self, x, t, y):
        self.calls.append(("encoder", len(x), t.copy()))
        return self.engines.encoder(x, t, y)

    def decoder(self, x, s):
        self.calls.append(("decoder", len(x), None))
        return self.engines.decoder(x, s)


def solo(engines, spec: RequestSpec) -> np.ndarray:
    """What `generate` computes for the request: the host loop on its own noise."""
    idx = range(spec.num)
    return sample(engines, sample_noise(spec.seed, idx, engines.config.model.latent_shape),
                  np.full(spec.num, spec.label), spec.sampler, spec.schedule, rng=StepNoise(spec.seed, idx))


def run(engines, arrivals: dict[int, list[RequestSpec]], budget=None, policy="step"):
    """Drive scheduler + model step; arrivals[k] are submitted before iteration k. Returns (jobs, batches)."""
    sch = Scheduler(budget or engines.max_batch, policy)
    jobs, batches, it = [], [], 0
    while it <= max(arrivals) or not sch.idle:
        jobs += [sch.submit(s, float(it)) for s in arrivals.get(it, [])]
        for job in sch.admit(float(it)):
            start(engines, job)
        batch = sch.batch()
        if batch.jobs:
            batches.append(batch)
            sch.advance(batch, float(it), run_iteration(engines, batch))
            done = [j for j in sch.retire(float(it)) if j.status != FAILED]
            images, failed = finish(engines, done)
            assert not failed
            for j in done:
                j.status, j.context = DONE, images[j.id]
        it += 1
    return jobs, batches


def mixed(engines):
    """Requests that differ in everything a request can set (and an SDE sampler, for the step noise)."""
    def r(**kw):
        return resolve_request(engines, **kw)

    sde = dataclasses.replace(r(label=2, num=2, seed=5, steps=9, schedule="uniform:3").sampler, step_fn="sde")
    return {0: [r(label=1, num=2, seed=3, steps=20, schedule="all"),
                r(label=5, num=1, seed=0, steps=7, cfg=4.0, schedule="uniform:2")],
            2: [r(label=9, num=3, seed=11, steps=12, cfg=2.0, schedule="uniform:4", interval=(0.1, 0.6),
                  timeshift=2.0),
                RequestSpec(2, 2, 5, sde, (0, 3, 6), "uniform:3")],
            5: [r(label=0, num=1, seed=7, steps=3, cfg=1.0, schedule="all")]}


def test_batched_requests_equal_each_run_alone(engines):
    arrivals = mixed(engines)
    jobs, batches = run(engines, arrivals)
    assert max(len(b) for b in batches) == 5  # all five shared iterations
    assert any(len({st.i for st in b.steps}) > 2 for b in batches)  # ... at different steps
    for job in jobs:
        want = solo(engines, job.spec)
        np.testing.assert_allclose(job.state.x, want, rtol=1e-5, atol=1e-6)
        assert np.array_equal(job.context, images_from_samples(want)), job.spec  # to the uint8 pixel
        print(job.spec.schedule_spec, job.spec.sampler.num_steps, "max |diff|", np.abs(job.state.x - want).max())


def test_one_call_per_graph_per_iteration_with_per_row_t(engines):
    log = CallLog(engines)
    jobs, batches = run(log, mixed(engines))
    enc = [c for c in log.calls if c[0] == "encoder"]
    dec = [c for c in log.calls if c[0] == "decoder"]
    assert len(dec) == len(batches) and [c[1] for c in dec] == [b.decoder_rows for b in batches]
    with_enc = [b for b in batches if b.encoder_rows]
    assert [c[1] for c in enc] == [b.encoder_rows for b in with_enc]
    for (_, _, t), b in zip(enc, with_enc):  # each row carries its own request's t, both halves where planned
        want = [st.t for j, st in zip(b.jobs, b.steps) if st.recompute
                for _ in range((2 if st.enc_uncond else 1) * j.spec.num)]
        assert np.array_equal(t, np.array(want, np.float32))
    assert len({float(v) for _, _, t in enc for v in t}) > 10


@pytest.mark.parametrize("policy", ["step", "fair"])
def test_rows_stay_within_the_budget(engines, policy):
    jobs, batches = run(engines, mixed(engines), budget=8, policy=policy)
    assert max(b.decoder_rows for b in batches) <= 8 and max(b.encoder_rows for b in batches) <= 8
    for job in jobs:
        assert np.array_equal(job.context, images_from_samples(solo(engines, job.spec)))


def test_nan_fails_that_request_only(engines):
    arrivals = mixed(engines)
    # CFG 1e30 blows x up inside the interval: the graphs then return NaN/Inf for that request's rows only
    arrivals[0].append(resolve_request(engines, label=4, num=2, seed=1, steps=20, cfg=1e30, schedule="all"))
    jobs, _ = run(engines, arrivals)
    bad = [j for j in jobs if j.spec.sampler.guidance == 1e30][0]
    assert bad.status == FAILED and isinstance(bad.error, NumericsError)
    assert bad.step < 20
    assert str(bad.error).startswith(f"step {bad.step}: ")
    assert any(t in str(bad.error) for t in ("encoder output s", "decoder output v", "latents x"))
    for job in jobs:
        if job is not bad:
            assert job.status == DONE
            assert np.array_equal(job.context, images_from_samples(solo(engines, job.spec)))


def test_resolve_request_names_the_field(engines):
    with pytest.raises(InputError, match=r"^interval: expected \(lo, hi\) with lo <= hi"):
        resolve_request(engines, label=0, num=1, interval=(0.8, 0.2))
    with pytest.raises(InputError, match=r"^timeshift: expected > 0"):
        resolve_request(engines, label=0, num=1, timeshift=0.0)
    with pytest.raises(InputError, match=r"^schedule dp:K: expected K <= 5 steps, got 9"):
        resolve_request(engines, label=0, num=1, steps=5, schedule="dp:9")
    with pytest.raises(InputError, match=r"^class: expected a class id in \[0, 10\), got 10"):
        resolve_request(engines, label=10, num=1)
    s = resolve_request(engines, label=3, num=2)
    assert s.sampler == engines.config.sampler and s.schedule_spec == "all" and s.schedule == tuple(range(20))
