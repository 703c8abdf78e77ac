"""Benchmark plumbing: the FLOP model against PyTorch's own FLOP counter, the PyTorch baseline computing the
same samples as the engines, and the bench report's structure. No timing assertions (those live in
benchmarks/results.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ddt_export.bench import TimedEngines, _torch_runner, bench, write_outputs  # noqa: E402
from ddt_export.config import PRESETS  # noqa: E402
from ddt_export.export import export_model, load_checkpoint_model  # noqa: E402
from ddt_export.flops import step_flops  # noqa: E402
from ddt_export.model import DDT  # noqa: E402
from ddt_export.runtime import load_engines, sample  # noqa: E402

from conftest import TINY  # noqa: E402


@pytest.mark.parametrize("name", ["tiny", "ddt-xl-256"])
def test_flop_model_matches_torch_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = TINY.model if name == "tiny" else PRESETS[name].model
    with torch.device("meta"):
        m = DDT(cfg)
        x = torch.randn(1, *cfg.latent_shape)
        t, y = torch.rand(1), torch.zeros(1, dtype=torch.long)
        s = torch.randn(1, cfg.num_tokens, cfg.hidden_size)
        counts = []
        for fn in (lambda: m.encode(x, t, y), lambda: m.decode(x, s)):
            with FlopCounterMode(display=False) as fc:
                fn()
            counts.append(fc.get_total_flops())
    f = step_flops(cfg)
    assert f.encoder == pytest.approx(counts[0], rel=1e-9)
    assert f.decoder == pytest.approx(counts[1], rel=1e-9)
    if name == "ddt-xl-256":  # DESIGN: the encoder is about 71% of a step; r = 0.5 predicts 1.55x
        assert f.encoder_fraction == pytest.approx(0.71, abs=0.01)
        assert f.predicted_speedup(0.5) == pytest.approx(1.55, abs=0.01)


@pytest.fixture(scope="module")
def seeded_engines(tmp_path_factory):
    model, src = load_checkpoint_model(None, TINY, random_weights=True, seed=3)
    out = tmp_path_factory.mktemp("bench") / "fp32"
    export_model(model, TINY, out, source=src)
    return out


def test_torch_baseline_computes_the_same_samples(seeded_engines):
    engines = load_engines(seeded_engines)
    run, _ = _torch_runner(engines, "torch-eager-fp32")
    noise = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    labels = np.array([1, 7])
    for sched in (list(range(20)), list(range(0, 20, 2))):
        ref = run(noise, labels, sched, TINY.sampler)
        out = sample(engines, noise, labels, TINY.sampler, sched)
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


def test_timed_engines_count_only_graph_time(seeded_engines):
    engines = load_engines(seeded_engines)
    timed = TimedEngines(engines)
    noise = np.zeros((1, 4, 8, 8), np.float32)
    a = sample(timed, noise, np.array([2]), TINY.sampler, [0, 10])
    assert timed.spent["encoder"] > 0 and timed.spent["decoder"] > 0
    assert np.array_equal(a, sample(engines, noise, np.array([2]), TINY.sampler, [0, 10]))


def test_bench_report(seeded_engines, tmp_path):
    res = bench(seeded_engines, batches=[1, 2], steps=6, schedules=["uniform:2", "dp:3"], repeats=1,
                torch_variants=("torch-eager-fp32", "torch-compile-bf16"), say=lambda m: None)
    assert {(s["graph"], s["rows"]) for s in res.stages if s["backend"] == res.backend} == {
        ("encoder", 2), ("decoder", 2), ("encoder", 4), ("decoder", 4)}
    runs = {(r["backend"], r["batch"], r["schedule"]): r for r in res.runs}
    assert runs[(res.backend, 2, "uniform:2")]["encoder_calls"] == 3
    assert ("torch-eager-fp32", 1, "dp:3") in runs
    if not torch.cuda.is_available():
        assert not any(r["backend"] == "torch-compile-bf16" for r in res.runs)
    sh = {(s["batch"], s["schedule"]): s for s in res.sharing}
    assert sh[(1, "all")]["measured"] == 1.0 and sh[(1, "uniform:2")]["predicted"] == pytest.approx(
        step_flops(TINY.model).predicted_speedup(0.5))
    write_outputs(res, tmp_path / "b.json", tmp_path / "b.png")
    assert json.loads((tmp_path / "b.json").read_text())["steps"] == 6
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
