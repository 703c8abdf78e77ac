"""Streaming, resumable `generate` (runtime.generate.chunks, runtime.generate.run_folder): chunks, SIGKILL + --resume, the ADM npz,
flat memory in --num. References: an uninterrupted run's files byte for byte, the official sampler (through
test_generate), FID computed on the PNG folder."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cli
from ddt_export.core.config import Config, ModelConfig, SamplerConfig
from ddt_export.core.errors import ArtifactError, DDTExportError, InputError
from ddt_export.runtime.generate.chunks import plan_chunks, split_results
from ddt_export.runtime.generate.generate import parse_formats
from runs import run_generate as generate
from ddt_export.runtime.generate.run_folder import NPZ_FILE, PARTS, RUN_RECORD, RunFolder

ROOT = Path(cli.__file__).parent

# A model whose per-sample arrays are large next to its compute (4x32x32 latents, 64 tokens x 32 wide, 2 blocks):
# holding every sample in flight (what generate did before it streamed) grows RSS by ~100 KiB per sample.
WIDE = Config("wide-state-test",
              ModelConfig(in_channels=4, hidden_size=32, num_groups=2, num_blocks=2, num_encoder_blocks=1,
                          patch_size=4, num_classes=10, latent_size=32, latent_scale=None),
              SamplerConfig(num_steps=20, guidance=3.0, guidance_interval=(0.3, 1.0), last_step=0.04))


@pytest.fixture(scope="module")
def wide_engines(tmp_path_factory) -> Path:
    from conftest import need_torch, tiny_model

    need_torch("the wide test model's export")
    from ddt_export.export.exporter import random_weights_ref
    from runs import run_export_model as export_model

    out = tmp_path_factory.mktemp("wide") / "fp32"
    export_model(tiny_model(0, WIDE), WIDE, out, weights=random_weights_ref(0), check=False)  # parity: test_export
    return out


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def cli_run(argv, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


# `ddt-export ARGV` held at a known point, so a test kills it there rather than after a guessed delay: with
# AFTER < 0 before the run folder is touched, else right after the AFTER-th chunk of this call is written. It
# writes MARKER when held.
HELD = """
import pathlib, sys, time
import cli
from ddt_export.runtime.generate import run_folder
marker, after = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def hold():
    marker.write_text("held")
    time.sleep(3600)
if after < 0:
    run_folder.RunFolder.prepare = lambda self, *args: hold()
else:
    write, n = run_folder.RunFolder.write, [0]
    def gated(self, chunk, res):
        write(self, chunk, res)
        n[0] += 1
        if n[0] == after:
            hold()
    run_folder.RunFolder.write = gated
cli.main(sys.argv[3:])
"""


def held_run(argv, marker: Path, after: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HELD, str(marker), str(after), *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------------------------ pure logic


def test_chunks_cover_the_run_once():
    cs = plan_chunks(10, 4)
    assert [(c.number, c.start, c.stop) for c in cs] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert [c.size for c in plan_chunks(1, 32)] == [1]
    assert sum(c.size for c in plan_chunks(50_000, 32)) == 50_000 and len(plan_chunks(50_000, 32)) == 1563


def test_split_results_regroups_blocks():
    """Ray Data may hand over several chunks in one block, or a chunk in pieces: whole chunks come out."""
    def rows(k, lo, hi):
        return {"chunk": np.full(hi - lo, k), "index": np.arange(lo, hi), "image": np.arange(lo, hi) * 10}

    both = {n: np.concatenate([rows(1, 4, 8)[n], rows(0, 0, 2)[n]]) for n in ("chunk", "index", "image")}
    out = list(split_results([both, rows(0, 2, 4)], {0: 4, 1: 4}))
    assert [int(r["chunk"][0]) for r in out] == [1, 0]
    assert out[1]["index"].tolist() == [0, 1, 2, 3] and out[1]["image"].tolist() == [0, 10, 20, 30]


def test_formats_and_errors_pickle():
    import pickle

    assert parse_formats("npz,png") == ("png", "npz") and parse_formats("npz") == ("npz",)
    with pytest.raises(InputError, match="--format"):
        parse_formats("jpeg")
    e = pickle.loads(pickle.dumps(ArtifactError("thing", "x", "y", "hint")))  # how a Ray worker's error travels
    assert isinstance(e, DDTExportError) and (e.thing, e.expected, e.actual, e.hint) == ("thing", "x", "y", "hint")


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.timeout(300)
def test_resume_after_sigkill_equals_uninterrupted(wide_engines, tmp_path):
    """Killed (SIGKILL) three times at different points, resumed each time: the files of an uninterrupted run,
    byte for byte (PNGs, samples.npz, preview, run.json, the latents), with no shard or temporary file left."""
    args = ["generate", "--engines", wide_engines, "--num", 120, "--steps", 12, "--chunk", 4, "--seed", 5,
            "--format", "png,npz"]
    ref = tmp_path / "ref"
    p = cli_run(args + ["--out", ref, "--latents-out", tmp_path / "ref.npy"])
    assert p.wait(timeout=240) == 0, p.stderr.read()
    out = tmp_path / "run"

    def shards() -> int:
        return len(list((out / PARTS).glob("chunk-*.npz"))) if (out / PARTS).is_dir() else 0

    kills = []
    for k, more in enumerate((-1, 2, 4)):  # before the folder is touched; then after 2 and 4 more chunks
        marker = tmp_path / f"held-{k}"
        p = held_run(args + ["--out", out, "--latents-out", tmp_path / "run.npy"] + (["--resume"] if kills else []),
                     marker, more)
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "the run never reached the point it is killed at"
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        kills.append(shards())
    assert kills == [0, 2, 6]  # killed exactly where held: no shard before the folder, then 2 and 4 more
    (out / ".00001-class1.png.zzzz.partial").write_bytes(b"\x89PNG half")  # what a kill mid-write leaves
    assert not json.loads((out / RUN_RECORD).read_text())["complete"]
    p = cli_run(args + ["--out", out, "--latents-out", tmp_path / "run.npy", "--resume"])
    stdout, stderr = p.communicate(timeout=240)
    assert p.returncode == 0, stderr
    print(f"shards finished at each kill: {kills}; resumed run: {stdout.splitlines()[2]}")
    assert kills[-1] < 30 and "already there" in stdout
    assert tree(out) == tree(ref)
    assert (tmp_path / "run.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert not (out / PARTS).exists() and json.loads((out / RUN_RECORD).read_text())["complete"]


def test_crash_while_finishing_then_resume(wide_engines, tmp_path, monkeypatch):
    """A run that dies after assembling the npz but before its record says complete: --resume finishes it."""
    kw = dict(num=9, steps=3, chunk=4, seed=2, formats="png,npz", say=lambda m: None)
    generate(wide_engines, out_dir=tmp_path / "ref", **kw)

    def boom(self):
        raise KeyboardInterrupt("killed while writing the preview")

    monkeypatch.setattr(RunFolder, "_write_preview", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(wide_engines, out_dir=tmp_path / "run", **kw)
    assert (tmp_path / "run" / NPZ_FILE).is_file() and (tmp_path / "run" / PARTS).is_dir()
    monkeypatch.undo()
    res = generate(wide_engines, out_dir=tmp_path / "run", resume=True, **kw)
    assert res.new == 0 and res.resumed == 9
    assert tree(tmp_path / "run") == tree(tmp_path / "ref")
    again = generate(wide_engines, out_dir=tmp_path / "run", resume=True, **kw)  # complete: nothing to do
    assert again.new == 0 and tree(tmp_path / "run") == tree(tmp_path / "ref")


def test_resume_refuses_other_settings(wide_engines, tmp_path, capsys):
    base = ["generate", "--engines", wide_engines, "--num", 6, "--steps", 2, "--chunk", 4, "--out", tmp_path / "o"]
    with pytest.raises(SystemExit) as e:
        cli.main(list(map(str, base)))
    assert e.value.code in (0, None)
    for extra, named in ((["--seed", 3], "seed: built 0, asked 3"), (["--steps", 3], "sampler.num_steps"),
                         (["--chunk", 2], "chunk: built 4, asked 2"), (["--format", "npz"], "formats"),
                         (["--class", 4], "labels")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli.main(list(map(str, base + extra + ["--resume"])))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "ArtifactError: --resume" in err and named in err, (extra, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "00000-class0.png").write_bytes(b"")  # samples with no run record
    with pytest.raises(ArtifactError, match="no run record"):
        generate(wide_engines, num=2, steps=2, out_dir=tmp_path / "foreign", resume=True, say=lambda m: None)
    with pytest.raises(InputError, match="--chunk"):
        generate(wide_engines, num=2, steps=2, chunk=33, out_dir=tmp_path / "c", say=lambda m: None)


# ------------------------------------------------------------------------------------------ the ADM npz


def test_npz_scores_the_fid_of_the_png_folder(digits_engines, tmp_path, capsys):
    """One run, both formats: the npz (ADM layout) holds the PNGs' pixels, and `ddt-export fid` gives the same
    distance on either against the bundled digits statistics."""
    from ddt_export.evaluate.features import DIGITS_STATS
    from ddt_export.evaluate.fid import fid_from_paths
    from PIL import Image

    res = generate(digits_engines, num=40, steps=4, chunk=16, formats="png,npz", out_dir=tmp_path / "o",
                   say=lambda m: None)
    with np.load(tmp_path / "o" / NPZ_FILE) as z:
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (40, 16, 16, 1) and labels.tolist() == res.labels.tolist()
    pngs = np.stack([np.asarray(Image.open(tmp_path / "o" / f"{i:05d}-class{y}.png")) for i, y in enumerate(labels)])
    np.testing.assert_array_equal(arr[..., 0], pngs)
    a = fid_from_paths(tmp_path / "o", DIGITS_STATS).value
    b = fid_from_paths(tmp_path / "o" / NPZ_FILE, DIGITS_STATS).value
    print(f"FID vs digits data: PNG folder {a:.6f}, npz {b:.6f}")
    assert a > 0 and a == pytest.approx(b, rel=1e-12, abs=1e-12)
    with pytest.raises(SystemExit):
        cli.main(["fid", str(tmp_path / "o" / NPZ_FILE), str(DIGITS_STATS)])
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(b, abs=1e-6)


def test_validate_reads_the_npz_as_data_statistics(digits_engines, tmp_path):
    """`validate --stats samples.npz`: the npz's arr_0 is featurized as the data side; the engines' FID against it
    equals the FID of the same samples (same seed, labels, batch) computed here from the generate run."""
    from ddt_export.evaluate.features import make_extractor
    from ddt_export.evaluate.fid import fid, load_stats, stats_from_features
    from runs import run_validate as validate

    generate(digits_engines, num=30, steps=3, seed=4, formats="npz", out_dir=tmp_path / "data", say=lambda m: None)
    npz = tmp_path / "data" / NPZ_FILE
    rep = validate(digits_engines, reference=digits_engines, num=4, seed=0, stats=npz, say=lambda m: None)
    mine = generate(digits_engines, num=4, seed=0, formats="npz", out_dir=tmp_path / "mine", say=lambda m: None)
    ext = make_extractor("digits")
    with np.load(tmp_path / "mine" / NPZ_FILE) as z:
        feats = ext.extract(z["arr_0"])
    want = fid(stats_from_features(feats), load_stats(npz, lambda: ext))
    assert mine.sampler.num_steps == rep["sampler"]["num_steps"]
    assert rep["fid"]["stats"].startswith(str(npz)) and rep["fid"]["engine_vs_data"] == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------------------------------ memory


# Runs the CLI in-process and prints its peak RSS from /proc (VmHWM: this process image only; a forked child's
# rusage would count the pytest parent it was forked from).
RSS_WRAPPER = """
import sys, cli
try:
    cli.main(sys.argv[1:])
except SystemExit as e:
    assert e.code in (0, None), e.code
print("VmHWM", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def peak_rss_kib(argv) -> int:
    r = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip().splitlines()[-1].split()[1])


@pytest.mark.timeout(400)
def test_memory_is_flat_in_num(wide_engines, tmp_path):
    """Peak RSS at --num 4000 below 1.5x that at --num 500. Measured with generate as it was before streaming
    (every sample in one batch), --steps 1 on this model: 171 MiB at 500, 530 MiB at 4000 (3.1x); on the digits
    model at --steps 2: 384 MiB and 803 MiB (2.1x)."""
    base = ["generate", "--engines", wide_engines, "--steps", 1, "--format", "png,npz"]
    small = peak_rss_kib(base + ["--num", 500, "--out", tmp_path / "500"])
    big = peak_rss_kib(base + ["--num", 4000, "--out", tmp_path / "4000"])
    print(f"peak RSS: --num 500 {small / 1024:.0f} MiB, --num 4000 {big / 1024:.0f} MiB ({big / small:.2f}x)")
    assert len(list((tmp_path / "4000").glob("*.png"))) == 4000
    with np.load(tmp_path / "4000" / NPZ_FILE) as z:
        assert z["arr_0"].shape == (4000, 32, 32, 4)
    assert big < 1.5 * small


def test_run_folder_keeps_other_files(wide_engines, tmp_path):
    """A fresh run removes an earlier run's outputs (samples, npz, shards, record) and nothing else."""
    out = tmp_path / "o"
    generate(wide_engines, num=5, steps=2, chunk=2, formats="png,npz", out_dir=out, say=lambda m: None)
    (out / "notes.txt").write_text("mine")
    (out / PARTS).mkdir()
    (out / PARTS / "chunk-000009.npz").write_bytes(b"stale")
    said = []
    generate(wide_engines, num=2, steps=2, formats="png", out_dir=out, say=said.append)
    assert sorted(p.name for p in out.iterdir()) == ["00000-class0.png", "00001-class1.png", "notes.txt",
                                                     "preview", RUN_RECORD]
    assert any("removed 5 samples of an earlier run" in s for s in said)
