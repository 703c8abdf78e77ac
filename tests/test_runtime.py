"""Runtime: engine loading and checks, the host loop's call counts, cond-only rows, batch splitting, NaNs."""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter

import numpy as np
import pytest

from ddt_export.core.config import SamplerConfig
from ddt_export.core.errors import ArtifactError, BackendError, InputError, NumericsError
from ddt_export.runtime import load_engines, plan_steps, record_states, sample, saved_fraction, work_rows
from ddt_export.core.specs import BatchProfile


@pytest.fixture(scope="module")
def engines(tiny_engines):
    return load_engines(tiny_engines[0])


def _inputs(cfg, b, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((b, *cfg.model.latent_shape), dtype=np.float32)
    return noise, rng.integers(0, cfg.model.num_classes, b)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_load_engines(engines, tiny_cfg):
    assert engines.config == tiny_cfg
    assert engines.backend_name.startswith("onnxruntime") and engines.vae_decoder is None
    assert engines.max_batch == engines.manifest.batch.max
    x, y = _inputs(tiny_cfg, 3)
    s = engines.encoder(x, np.full(3, 0.5, np.float32), y)
    assert s.shape == (3, tiny_cfg.model.num_tokens, tiny_cfg.model.hidden_size) and s.dtype == np.float32
    assert engines.decoder(x, s).shape == x.shape
    with pytest.raises(InputError, match="encoder input t"):
        engines.encoder(x, np.full(3, 0.5), y)  # float64 t
    with pytest.raises(InputError, match="decoder input s"):
        engines.decoder(x, s[:, :-1])
    with pytest.raises(InputError, match="batch"):
        engines.decoder(np.zeros((0, *x.shape[1:]), np.float32), s[:0])


def test_bad_folders(tiny_engines, tmp_path):
    with pytest.raises(ArtifactError, match="engine folder"):
        load_engines(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest"):
        load_engines(tmp_path / "empty")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"name": "something else"}))
    with pytest.raises(ArtifactError, match="format_version"):
        load_engines(foreign)
    stale = tmp_path / "stale"
    shutil.copytree(tiny_engines[0], stale)
    with open(stale / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        load_engines(stale)
    with pytest.raises(BackendError):
        load_engines(tiny_engines[0], backend="tensorrt")  # an onnxruntime folder
    with pytest.raises(BackendError):
        load_engines(tiny_engines[0], providers=["NoSuchExecutionProvider"])
    # a TensorRT folder where TensorRT cannot run: a BackendError with the reason
    trt_dir = tmp_path / "trt"
    shutil.copytree(tiny_engines[0], trt_dir)
    man = json.loads((trt_dir / "manifest.json").read_text())
    man["backend"] = "tensorrt"
    (trt_dir / "manifest.json").write_text(json.dumps(man))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError):
            load_engines(trt_dir)


@pytest.mark.parametrize("schedule, calls", [("all", 20), ("uniform:2", 10), ("uniform:3", 7), ([0, 5, 11], 3)])
def test_encoder_calls_per_schedule(engines, tiny_cfg, schedule, calls):
    from ddt_export.runtime.sampling.grammar import parse_schedule, steps_for

    steps = steps_for(parse_schedule(schedule), 20) if isinstance(schedule, str) else schedule
    seen = Counter()
    enc_steps = []

    def observer(graph, step, inputs):
        seen[graph] += 1
        if graph == "encoder":
            enc_steps.append(step)

    x, y = _inputs(tiny_cfg, 2)
    sample(engines, x, y, tiny_cfg.sampler, steps, observer=observer)
    assert seen["encoder"] == calls and enc_steps == list(steps)
    assert seen["decoder"] == tiny_cfg.sampler.num_steps


# Rows for B = 3 on the tiny sampler (20 steps, t_i = 0.96 i / 19): steps 0..5 are outside the guidance interval
# (3 cond rows), 6..19 inside (6 rows). A recompute step computes both halves iff one of the steps its state
# serves is inside. Derived by hand: e.g. [0, 3, 9, 17]: step 0 serves 0..2 (3 rows), 3 serves 3..8 (6), 9 and
# 17 (6 each) = 21 encoder rows; the decoder always 6 * 3 + 14 * 6 = 102.
HAND_ROWS = [(list(range(20)), 6 * 3 + 14 * 6), ([0, 2, 4, 6, 8, 10, 12, 14, 16, 18], 3 * 3 + 7 * 6), ([0, 5], 3 + 6),
             ([0, 3, 9, 17], 3 + 6 + 6 + 6)]


@pytest.mark.parametrize("schedule, encoder_rows", HAND_ROWS)
def test_cond_only_equals_full_batch(engines, tiny_cfg, schedule, encoder_rows):
    x, y = _inputs(tiny_cfg, 3, seed=1)
    rows = Counter()
    full = sample(engines, x, y, tiny_cfg.sampler, schedule, cond_only_outside=False)
    fast = sample(engines, x, y, tiny_cfg.sampler, schedule, cond_only_outside=True,
                  observer=lambda g, i, inp: rows.update({g: len(inp["x"])}))
    assert _rel(fast, full) < 1e-5
    assert rows["encoder"] == encoder_rows and rows["decoder"] == 102
    want = work_rows(plan_steps(tiny_cfg.sampler, schedule), 3)  # the counter the CLI prints says the same
    assert (want["encoder_rows"], want["decoder_rows"]) == (encoder_rows, 102)
    assert (want["encoder_rows_full"], want["decoder_rows_full"]) == (6 * len(schedule), 6 * 20)


def test_plan_keeps_both_halves_for_guided_reuse(tiny_cfg):
    s = tiny_cfg.sampler  # t_i = 0.96 i / 19: steps 0..5 are outside (0.3, 1), 6..19 inside
    plan = plan_steps(s, [0, 5])
    assert [p.dec_uncond for p in plan] == [False] * 6 + [True] * 14
    assert not plan[0].enc_uncond and plan[5].enc_uncond  # step 5's state serves guided steps 6..19
    early = plan_steps(dataclasses.replace(s, guidance_interval=(0.0, 0.3)), [0, 10])  # guided first, then not
    assert early[0].enc_uncond and not early[10].enc_uncond
    assert not any(p.dec_uncond for p in plan_steps(dataclasses.replace(s, guidance=1.0), [0, 5]))
    official = plan_steps(s, [0, 5], cond_only_outside=False)
    assert all(p.dec_uncond for p in official) and official[0].enc_uncond


def test_saved_fraction_ddt_xl_defaults():
    """DDT-XL, 250 steps, interval (0.3, 1): the numbers the README quotes."""
    plan = plan_steps(SamplerConfig(), range(250))
    rows = work_rows(plan, 1)
    assert rows["decoder_rows"] == 2 * 250 - 78  # steps 0..77 have t <= 0.3
    assert saved_fraction(rows, 22, 6) == pytest.approx(78 / 500)


def test_batches_split_to_max_batch(tiny_engines, tiny_cfg):
    small = load_engines(tiny_engines[0])
    small.manifest.provenance = small.manifest.provenance.replace(batch=BatchProfile(1, 2, 3))
    big = load_engines(tiny_engines[0])
    x, y = _inputs(tiny_cfg, 4, seed=2)
    sizes = []
    got = sample(small, x, y, tiny_cfg.sampler, [0, 4, 8, 12, 16],
                 observer=lambda g, i, inp: sizes.append(len(inp["x"])))
    # B = 4: outside steps 0..5 are 4 cond rows (calls of 3 + 1), inside 8 rows (3 + 3 + 2); the encoder at 0
    # serves 0..3 (outside: 4 rows), at 4 serves 4..7 (6, 7 inside: 8 rows), 8, 12, 16 (8 rows): 4 + 4 * 8 = 36;
    # the decoder 6 * 4 + 14 * 8 = 136
    assert max(sizes) == 3 and sum(sizes) == 36 + 136
    assert _rel(got, sample(big, x, y, tiny_cfg.sampler, [0, 4, 8, 12, 16])) < 1e-5


class _NanAt:
    """Engines (a `Graphs`) whose decoder output turns NaN at one step."""

    def __init__(self, engines, step):
        self.e, self.step, self.calls = engines, step, 0
        self.config, self.max_batch, self.min_batch = engines.config, engines.max_batch, engines.min_batch

    def run(self, graph, feeds):
        out = self.e.run(graph, feeds)
        if graph == "decoder":
            self.calls += 1
            if self.calls == self.step + 1:
                out = {"v": out["v"] * np.nan}
        return out


def test_nan_names_step_and_tensor(engines, tiny_cfg):
    from ddt_export.runtime.sampling.host import sample_host

    x, y = _inputs(tiny_cfg, 2)
    with pytest.raises(NumericsError, match=r"step 4: decoder output v"):
        sample_host(_NanAt(engines, 4), x, y, tiny_cfg.sampler, range(20))


def test_bad_inputs(engines, tiny_cfg):
    x, y = _inputs(tiny_cfg, 2)
    with pytest.raises(InputError, match="noise"):
        sample(engines, x[:, :2], y, tiny_cfg.sampler, range(20))
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match="NaN/Inf"):
        sample(engines, bad, y, tiny_cfg.sampler, range(20))
    with pytest.raises(InputError, match="class"):
        sample(engines, x, np.array([0, 10]), tiny_cfg.sampler, range(20))
    with pytest.raises(InputError, match="labels"):
        sample(engines, x, y[:1], tiny_cfg.sampler, range(20))
    with pytest.raises(InputError, match="steps in"):
        sample(engines, x, y, tiny_cfg.sampler, [0, 20])


def test_record_states(engines, tiny_cfg):
    """Every recorded state equals an independent statement of the official full-batch loop: timesteps from
    linspace, [uncond; cond] through both graphs every step, CFG only where 0.3 < t < 1, Euler."""
    sampler = dataclasses.replace(tiny_cfg.sampler, num_steps=6)
    x, y = _inputs(tiny_cfg, 2)
    states = record_states(engines, x, y, sampler)
    m = tiny_cfg.model
    assert states.shape == (6, 4, m.num_tokens, m.hidden_size) and states.dtype == np.float32
    y_cfg = np.concatenate([np.full(2, m.null_class), y])
    t = np.append(np.linspace(0.0, 1.0 - sampler.last_step, 6), 1.0)
    xi = x.copy()
    for i in range(6):
        x2 = np.concatenate([xi, xi])
        s = engines.encoder(x2, np.full(4, t[i], np.float32), y_cfg)
        np.testing.assert_allclose(states[i], s, rtol=1e-5, atol=1e-5, err_msg=f"state {i}")
        v = engines.decoder(x2, s)
        scale = sampler.guidance if 0.3 < np.float32(t[i]) < 1.0 else 1.0
        xi = xi + (v[:2] + np.float32(scale) * (v[2:] - v[:2])) * np.float32(t[i + 1] - t[i])
