"""Benchmark plumbing: the FLOP model against PyTorch's own FLOP counter, the PyTorch baseline computing the
same samples as the engines, and the bench report's structure. No timing assertions (those live in
benchmarks/, one folder per study)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ddt_export.evaluate.bench import TimedEngines, write_outputs  # noqa: E402
from ddt_export.export.reference import TorchReference  # noqa: E402
from ddt_export.core.config import PRESETS  # noqa: E402
from ddt_export.export.exporter import load_checkpoint_model  # noqa: E402
from runs import run_bench as bench, run_export_model as export_model  # noqa: E402
from ddt_export.core.flops import GEMM_ROLES, block_gemm_flops, fp8_share, fp8_speedup, step_flops  # noqa: E402
from ddt_export.export.model import DDT  # noqa: E402
from ddt_export.runtime import load_engines, sample  # noqa: E402
from ddt_export.runtime.sampling.host import sample_host  # noqa: E402

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


@pytest.mark.parametrize("name", ["tiny", "ddt-xl-256"])
def test_block_gemm_breakdown_matches_torch_per_role(name):
    """The (block, role) breakdown an FP8 recipe is costed with, summed per role and graph, against PyTorch's
    FLOP counter per module (it aggregates the blocks of one call under DDTBlock.<role>)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = TINY.model if name == "tiny" else PRESETS[name].model
    per = block_gemm_flops(cfg)
    with torch.device("meta"):
        m = DDT(cfg)
        x = torch.randn(1, *cfg.latent_shape)
        t, y = torch.rand(1), torch.zeros(1, dtype=torch.long)
        s = torch.randn(1, cfg.num_tokens, cfg.hidden_size)
        for blocks, fn in ((range(cfg.num_encoder_blocks), lambda: m.encode(x, t, y)),
                           (range(cfg.num_encoder_blocks, cfg.num_blocks), lambda: m.decode(x, s))):
            with FlopCounterMode(display=False) as fc:
                fn()
            counts = fc.get_flop_counts()
            for role in GEMM_ROLES:
                want = sum(v for k, v in counts[f"DDTBlock.{role}"].items() if "mm" in str(k))
                assert sum(per[b, role] for b in blocks) == want, role


def test_fp8_shares_hand_derived():
    """TINY: D = 64, L = 16, SwiGLU hidden int(2 * 256 / 3) = 170, 3 encoder blocks + 1 decoder block."""
    per = block_gemm_flops(TINY.model)
    assert per[0, "attn.qkv"] == 2 * 16 * 64 * 192 == 393216
    assert per[2, "attn.proj"] == 2 * 16 * 64 * 64 == 131072
    assert per[1, "mlp.w1"] == per[3, "mlp.w2"] == 2 * 16 * 64 * 170 == 348160
    assert per[0, "adaLN_modulation"] == 2 * 1 * 64 * 384 == 49152  # encoder: one condition row
    assert per[3, "adaLN_modulation"] == 2 * 16 * 64 * 384 == 786432  # decoder: every token
    block_total = 3 * (393216 + 131072 + 3 * 348160 + 49152) + (393216 + 131072 + 3 * 348160 + 786432)
    assert sum(per.values()) == block_total == 7208960
    share = fp8_share(TINY.model, [(3, "adaLN_modulation")])
    assert share.of_block_gemms == pytest.approx(786432 / 7208960)
    f = step_flops(TINY.model)
    assert share.of_step == pytest.approx(786432 / (f.encoder + f.decoder))
    assert fp8_speedup(0.5) == pytest.approx(1 / (0.5 + 0.25))  # half the work at 2x: 1.33x
    assert fp8_speedup(1.0) == 2.0 and fp8_speedup(0.0) == 1.0
    assert share.predicted_speedup == pytest.approx(1 / (1 - share.of_step / 2))


@pytest.fixture(scope="module")
def seeded_engines(tmp_path_factory):
    model, src = load_checkpoint_model(None, TINY, random_weights=True, seed=3)
    out = tmp_path_factory.mktemp("bench") / "fp32"
    export_model(model, TINY, out, weights=src)
    return out


@pytest.mark.parametrize("step_fn, shift", [("ode", 1.0), ("sde", 1.0), ("ode", 3.0)])
def test_torch_reference_is_the_official_sampler(seeded_engines, step_fn, shift):
    """The PyTorch reference loop (validate's and bench's) against the independent restatement of the official
    sampler (tests/official_reference.py), on the same rebuilt model: it shares no timesteps with the host loop."""
    import dataclasses

    from references.official import official_sampler

    engines = load_engines(seeded_engines)
    ref = TorchReference(engines.manifest, "torch-eager-fp32")
    sampler = dataclasses.replace(TINY.sampler, step_fn=step_fn, timeshift=shift)
    noise = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    labels = np.array([1, 7])

    def net(x, t, y, state):
        s = ref.model.encode(x, t, y) if state is None else state
        return ref.model.decode(x, s), s

    for sched in (list(range(20)), list(range(0, 20, 2))):
        got = ref.sample(noise, labels, sampler, sched, np.random.default_rng(4))
        draws = np.random.default_rng(4)
        with torch.no_grad():
            want = official_sampler(net, torch.from_numpy(noise), torch.from_numpy(labels), num_steps=20,
                                    guidance=3.0, interval=(0.3, 1.0), last_step=0.04, recompute=sched, null=10,
                                    shift=shift, step_fn=step_fn,
                                    step_noise=lambda i: torch.from_numpy(draws.standard_normal((2, 4, 8, 8),
                                                                                                dtype=np.float32)))
        assert np.abs(got - want.numpy()).max() / np.abs(want.numpy()).max() < 1e-5
        out = sample(engines, noise, labels, sampler, sched, rng=np.random.default_rng(4))  # and the engines agree
        assert np.abs(out - got).max() / np.abs(got).max() < 1e-4


def test_timed_engines_count_only_graph_time(seeded_engines):
    engines = load_engines(seeded_engines)
    timed = TimedEngines(engines)
    noise = np.zeros((1, 4, 8, 8), np.float32)
    a = sample_host(timed, noise, np.array([2]), TINY.sampler, [0, 10])
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
    # by hand for TINY (L 16, D 64, P 16, FFN 170, 3 + 1 blocks): encoder 5,124,096 FLOPs, decoder 2,748,416;
    # half the encoder calls: 1 / (1 - 0.6509 / 2) = 1.4825
    assert sh[(1, "all")]["measured"] == 1.0 and sh[(1, "uniform:2")]["predicted"] == pytest.approx(1.48245, abs=1e-4)
    write_outputs(res, tmp_path / "b.json", tmp_path / "b.png")
    assert json.loads((tmp_path / "b.json").read_text())["steps"] == 6
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
