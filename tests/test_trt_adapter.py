"""The TensorRT adapter's own logic (runtime/graphs/trt.py, runtime/sampling/trt_loop.py) on CPU, over a STAND-IN
for TensorRT and the CUDA device (tests/trt_standin.py). None of this counts as TensorRT or CUDA tested: the
stand-in only reproduces what the adapter relies on (addresses, shapes, a stream that runs in order, graphs
that replay), so these tests check the adapter's decisions — issue 22's defects 2 (threads), 3 (close order),
4 (constructor cleanup), 5 (bounded keys, one sampler per engine set), 6 (device current), 7 (one engine run
per call) — and the device loop's bindings, offsets and copies against the host loop on the same stand-in.
"""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from ddt_export.core.config import SamplerConfig
from ddt_export.core.errors import ArtifactError, BackendError
from ddt_export.core.specs import DECODER, ENCODER
from ddt_export.runtime.graphs import gpu
from ddt_export.runtime.graphs.engines import Engines
from ddt_export.runtime.graphs.trt_plan import LoopLayout, graph_key, loop_calls, s_half, time_table
from ddt_export.runtime.sampling import trt_loop
from ddt_export.runtime.sampling.host import sample
from ddt_export.runtime.sampling.plan import plan_steps
from trt_standin import (BATCH, DIMS, EmulatedGPU, StandInEngine, decoder_ref, graph, standin_engines,
                         standin_tensorrt_singleton)

class NoLock:
    """The adapter before issue 22 (no lock): a stand-in lock that excludes nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def emu(monkeypatch) -> EmulatedGPU:
    monkeypatch.setitem(sys.modules, "tensorrt", standin_tensorrt_singleton)
    return EmulatedGPU().install(monkeypatch)


def dec_feeds(seed: int, rows: int = 3) -> dict[str, np.ndarray]:
    return DECODER.dummy_inputs(DIMS, rows, np.random.default_rng(seed))


def in_thread(fn, name: str = "") -> tuple[threading.Thread, dict]:
    """Start fn on a new thread; its result or its exception land in the returned dict (re-raised by `result`)."""
    box: dict = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=body, daemon=True, name=name or None)
    t.start()
    return t, box


def result(t: threading.Thread, box: dict, timeout: float = 30):
    t.join(timeout)
    assert not t.is_alive(), "thread did not finish"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ------------------------------------------------------------------------------------------ defect 2: threads


def _interleave(emu, runner, wait: float) -> tuple[dict, dict, bool]:
    """Thread A's run is held inside its engine run; thread B runs meanwhile; then A resumes. (A's outputs, B's
    outputs, whether B finished while A was held)."""
    a_in, b_in = dec_feeds(1), dec_feeds(2)
    started, resume = threading.Event(), threading.Event()
    emu.pause = ("A", started, resume)
    ta, box_a = in_thread(lambda: runner.run(a_in), "A")
    assert started.wait(10)
    tb, box_b = in_thread(lambda: runner.run(b_in))
    tb.join(wait)
    b_done_early = not tb.is_alive()
    resume.set()
    return result(ta, box_a), result(tb, box_b), b_done_early


def test_run_from_two_threads_is_serialized(emu):
    a_in, b_in = dec_feeds(1), dec_feeds(2)
    want_a, want_b = decoder_ref(a_in["x"], a_in["s"]), decoder_ref(b_in["x"], b_in["s"])
    got_a, got_b, b_early = _interleave(emu, graph(emu, DECODER), 0.3)
    assert not b_early  # B waited for A's whole call (copies in, engine, copies out)
    assert np.array_equal(got_a["v"], want_a) and np.array_equal(got_b["v"], want_b)


def test_without_the_lock_a_call_gets_another_calls_result(emu):
    """The control: the same interleaving without the lock returns B's result to A, with no error raised — the
    defect the lock fixes, reproduced on the stand-in (so the test above can fail)."""
    a_in, b_in = dec_feeds(1), dec_feeds(2)
    got_a, got_b, b_early = _interleave(emu, graph(emu, DECODER, lock=NoLock()), 10)
    assert b_early
    assert np.array_equal(got_a["v"], decoder_ref(b_in["x"], b_in["s"]))  # A read B's inputs
    assert not np.array_equal(got_a["v"], decoder_ref(a_in["x"], a_in["s"]))


def test_many_calls_from_two_threads(emu):
    runner = graph(emu, DECODER)

    def calls(seed):
        bad = 0
        for k in range(30):
            feeds = dec_feeds(1000 * seed + k, rows=1 + k % 4)
            bad += not np.array_equal(runner.run(feeds)["v"], decoder_ref(feeds["x"], feeds["s"]))
        return bad

    threads = [in_thread(lambda s=s: calls(s)) for s in (1, 2)]
    assert [result(t, box) for t, box in threads] == [0, 0]


def test_device_loop_excludes_runner_calls(emu, monkeypatch):
    """A runner call from another thread waits for the whole device-loop call (it writes the runners' buffers)."""
    engines = standin_engines(emu, monkeypatch)
    sampler = engines.config.sampler
    noise = np.random.default_rng(4).standard_normal((2, 2, 4, 4), dtype=np.float32)
    started, resume = threading.Event(), threading.Event()
    emu.pause = ("A", started, resume)
    ta, box_a = in_thread(lambda: sample(engines, noise, np.array([1, 2]), sampler, [0, 5]), "A")
    assert started.wait(10)  # the device loop is inside its first engine run
    feeds = dec_feeds(9)
    tb, box_b = in_thread(lambda: engines.decoder(feeds["x"], feeds["s"]))
    tb.join(0.3)
    blocked = tb.is_alive()
    emu.pause = None
    resume.set()
    assert result(ta, box_a).shape == (2, 2, 4, 4)
    assert blocked and np.array_equal(result(tb, box_b), decoder_ref(feeds["x"], feeds["s"]))
    engines.close()


# ------------------------------------------------------------------------------------------ defect 6: device


def test_run_makes_the_backends_device_current_on_a_fresh_thread(emu, monkeypatch):
    emu.set_device(1)  # the backend was opened on GPU 1
    runner = graph(emu, DECODER, device=1)
    feeds = dec_feeds(3)
    assert np.array_equal(result(*in_thread(lambda: runner.run(feeds)))["v"], decoder_ref(feeds["x"], feeds["s"]))
    monkeypatch.setattr(gpu, "set_device", lambda d: None)  # the control: without it the thread is on device 0
    with pytest.raises(BackendError, match="device 1 current"):
        result(*in_thread(lambda: runner.run(feeds)))


# ------------------------------------------------------------------------------------------ defect 4: constructor


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])  # scratch, then x, s, v
def test_constructor_frees_what_it_made_when_a_later_allocation_fails(emu, fail_at):
    emu.fail_malloc_at = fail_at
    with pytest.raises(BackendError, match="cudaErrorMemoryAllocation"):
        graph(emu, DECODER)
    assert emu.mallocs == fail_at and emu.allocs == {}


def test_constructor_frees_when_the_context_or_the_spec_fails(emu):
    engine = StandInEngine(emu, DECODER, DIMS, BATCH.min, BATCH.max)
    engine.fail_context = True
    with pytest.raises(BackendError, match="create_execution_context"):
        graph(emu, DECODER, engine=engine)
    assert emu.allocs == {} and emu.mallocs == 1
    with pytest.raises(ArtifactError, match="missing tensor v"):  # an encoder plan where the decoder belongs
        graph(emu, DECODER, engine=StandInEngine(emu, ENCODER, DIMS, BATCH.min, BATCH.max))
    assert emu.allocs == {}


# ------------------------------------------------------------------------------------------ defect 3: close order


def test_close_drains_the_stream_before_freeing(emu):
    runner = graph(emu, DECODER)
    runner.run(dec_feeds(1))
    runner.enqueue(2, graphs=True)  # a captured key: a graph exec and its own context
    before = len(emu.events)
    runner.close()
    closing = emu.events[before:]
    assert closing[0] == "sync", closing
    assert {"graph exec destroyed", "context destroyed"} <= set(closing)
    assert sum(e.startswith("free") for e in closing) == 4 and emu.allocs == {}
    runner.close()  # idempotent
    assert len(emu.events) == before + len(closing)
    with pytest.raises(BackendError, match="closed"):
        runner.run(dec_feeds(1))


def test_a_failed_run_waits_for_its_queued_copies(emu, monkeypatch):
    runner = graph(emu, DECODER)
    monkeypatch.setattr(runner, "_execute", lambda ctx: (_ for _ in ()).throw(BackendError("x", "y", "z")))
    before = len(emu.events)
    with pytest.raises(BackendError):
        runner.run(dec_feeds(1))
    assert emu.events[before:] == ["sync"]  # the host inputs outlived the copies that read them


def test_device_sampler_close_drains_first(emu, monkeypatch):
    engines = standin_engines(emu, monkeypatch)
    loop = trt_loop.device_sampler(engines)
    before = len(emu.events)
    engines.close()
    closing = emu.events[before:]
    assert closing[0] == "sync" and emu.allocs == {} and loop.enc is None


# ------------------------------------------------------------------------------------------ defect 7: one run per call


def test_each_enqueue_runs_the_engine_once(emu):
    runner = graph(emu, DECODER)
    for k in range(3):  # capture (warm-up = the run), then two replays
        runner.enqueue(2, graphs=True)
        assert emu.engine_runs == k + 1
    runner.enqueue(2)  # plain
    assert emu.engine_runs == 4 and len(runner.plan.captured) == 1
    emu.fail_capture = "cudaErrorStreamCaptureInvalidated"
    runner.enqueue(3, graphs=True)  # the capture fails: the warm-up was still this call's one run
    runner.enqueue(3, graphs=True)  # the key is not capturable: plain
    assert emu.engine_runs == 6 and runner.plan.failed
    runner.close()


# ------------------------------------------------------------------------------------------ the device loop


@pytest.mark.parametrize("b", [1, 16])  # 1: the cond half of s is copied (unaligned); 16: bound by offset
def test_device_loop_equals_host_loop_on_the_standin(emu, monkeypatch, b):
    engines = standin_engines(emu, monkeypatch)
    runners = {g: engines.runner(g) for g in ("encoder", "decoder")}
    host = Engines(engines.folder, engines.manifest, engines.backend, runners, device_loop=False)
    sampler = engines.config.sampler
    noise = np.random.default_rng(b).standard_normal((b, 2, 4, 4), dtype=np.float32)
    labels = np.arange(b) % 10
    for schedule in ([0, 3, 6, 9], list(range(12))):
        want = sample(host, noise, labels, sampler, schedule)
        assert np.array_equal(trt_loop.sample_on_device(engines, noise, labels, sampler, schedule, cuda_graphs=False),
                              want)
        assert np.array_equal(sample(engines, noise, labels, sampler, schedule), want)  # CUDA graphs: replays
    loop = trt_loop.device_sampler(engines)
    steps = plan_steps(sampler, [0, 3, 6, 9])
    calls = [c for cs in loop_calls(steps, loop.layout(b, time_table([0.0], 2 * b)[1])) for c in cs]
    s_base = engines.runner("encoder").buffers["s"].ptr
    offset = [c for c in calls if c.graph == "decoder" and c.bind.get("s", (s_base,))[0] != s_base]
    copied = [c for c in calls if c.graph == "decoder" and c.copies and "s" not in c.bind]
    assert (bool(offset), bool(copied)) == ((False, True) if b == 1 else (True, False))  # both paths ran
    engines.close()
    assert emu.allocs == {}


def test_one_device_sampler_per_engine_set_and_bounded_keys(emu, monkeypatch):
    """Defect 5: `sample` uses the sampler attached to the engines (made once, its memory allocated once), so a
    second call binds the same addresses and adds no CUDA-graph key or context."""
    engines = standin_engines(emu, monkeypatch)
    sampler = engines.config.sampler
    noise = np.random.default_rng(0).standard_normal((3, 2, 4, 4), dtype=np.float32)
    first = sample(engines, noise, np.array([1, 2, 3]), sampler, [0, 3, 6, 9])
    loop, mallocs = trt_loop.device_sampler(engines), emu.mallocs
    keys = {g: set(engines.runner(g).plan.captured) for g in ("encoder", "decoder")}
    for _ in range(3):
        assert np.array_equal(sample(engines, noise, np.array([1, 2, 3]), sampler, [0, 3, 6, 9]), first)
    assert trt_loop.device_sampler(engines) is loop and emu.mallocs == mallocs
    assert {g: set(engines.runner(g).plan.captured) for g in keys} == keys
    assert all(len(engines.runner(g)._keyed) == len(keys[g]) for g in keys)  # no context per call either
    engines.close()


def test_device_sampler_made_once_when_two_threads_ask(emu, monkeypatch):
    engines = standin_engines(emu, monkeypatch)
    made = []
    real = trt_loop.DeviceSampler

    def slow(e):
        made.append(1)
        threading.Event().wait(0.05)
        return real(e)

    monkeypatch.setattr(trt_loop, "DeviceSampler", slow)
    threads = [in_thread(lambda: trt_loop.device_sampler(engines)) for _ in range(2)]
    got = [result(t, box) for t, box in threads]
    assert got[0] is got[1] and made == [1]
    engines.close()


def test_graph_keys_from_fixed_buffers_are_bounded():
    """Over the plain functions (no stand-in): every batch size and schedule of one engine set gives keys from a
    fixed set; a new allocation per call (the old temporary sampler) would add new ones every call."""
    sampler = SamplerConfig(num_steps=12, guidance=3.0, guidance_interval=(0.3, 1.0))
    enc = {"x": (0x1000, 8192), "t": (0x4000, 256), "y": (0x5000, 512), "s": (0x6000, 65536)}
    dec = {"x": (0x20000, 8192), "s": (0x30000, 65536), "v": (0x40000, 8192)}

    def keys(base: int, b: int, schedule) -> set:
        lay = LoopLayout(b, 128, base, base + 4096, base + 8192, base + 12288, 256, enc, dec, s_half(b, 5, 12))
        out = set()
        for calls in loop_calls(plan_steps(sampler, schedule), lay):
            for c in calls:
                out.add((c.graph, graph_key(c.rows, {**(enc if c.graph == "encoder" else dec), **c.bind})))
        return out

    schedules = ([0, 3, 6, 9], list(range(12)), [0, 6], [0])
    once = set().union(*(keys(0x100000, b, s) for b in range(1, 17) for s in schedules))
    again = set().union(*(keys(0x100000, b, s) for b in range(1, 17) for s in schedules for _ in range(3)))
    assert again == once and len(once) <= 5 * 16  # at most 2 encoder and 3 decoder bindings per batch size
    fresh = keys(0x900000, 3, [0, 3, 6, 9])  # another allocation for the same call
    assert fresh - once  # its addresses are in the keys: a sampler per call would grow them without bound
