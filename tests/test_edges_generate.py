"""Where `generate` meets the filesystem and the user's keyboard (issue 24): a read-only or full disk, --out
folders that are not a run's, the lock file, a run too big for the disk, memory before the first chunk, the ETA
past a day, Ctrl-C and --resume, what a resumed run reports, Ray's error line, calibrate's hint. CLI tests run
`python -m cli` in a subprocess (cwd the repository, a timeout); the disk tests mount a real tmpfs in a private
mount namespace (`unshare`), and skip where the system does not allow one."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import cli
from conftest import CHILD_TIMEOUT
from ddt_export.core.artifacts import LOCK_FILE, folder_lock
from ddt_export.core.errors import ArtifactError
from ddt_export.runtime.generate import run_folder
from ddt_export.runtime.generate.run_folder import PARTS, RUN_RECORD
from runs import run_generate

ROOT = Path(cli.__file__).parent
pytestmark = pytest.mark.timeout(CHILD_TIMEOUT + 60)


def ddt(*argv, prefix=(), env=None, **kw) -> subprocess.CompletedProcess:
    """`python -m cli ARGV` (after `prefix`, e.g. an unshare command), cwd the repository, bounded."""
    return subprocess.run([*prefix, sys.executable, "-m", "cli", *map(str, argv)], cwd=kw.pop("cwd", ROOT),
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env, **kw)


def one_line_error(r: subprocess.CompletedProcess, start: str, only: bool = True) -> str:
    """The run failed the project's way: exit 2, one line on stderr starting with `start` (the only one, or with
    `only=False` the last, after the progress lines of a run that had started), no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (len(lines) == 1 or not only) and lines[-1].startswith(start), r.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def engines(tiny_engines) -> Path:
    return tiny_engines[0]


# ------------------------------------------------------------------------------------ 1: a read-only, a full disk


def _unshare() -> list[str]:
    """A private user + mount namespace in which this process may mount a tmpfs, or a skip."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare (a private mount namespace for a real tmpfs)")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged mount namespaces are not allowed here: {probe.stderr.decode().strip()}")
    return ["unshare", "--user", "--map-root-user", "--mount"]


def in_tmpfs(mnt: Path, options: str, script: str) -> list[str]:
    """A command prefix: mount a tmpfs (`options`) on `mnt` in a private namespace, run `script`, then argv."""
    return [*_unshare(), "sh", "-c", f'mount -t tmpfs -o {options} tmpfs "{mnt}" && {script} "$@"', "sh"]


def test_read_only_filesystem_is_one_line(engines, tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = ddt("generate", "--engines", engines, "--num", 2, "--steps", 2, "--out", mnt / "run",
            prefix=in_tmpfs(mnt, "ro,size=1m", "true &&"))
    one_line_error(r, f"error: ArtifactError: writing {mnt / 'run'}: expected a writable folder, got a read-only "
                      "file system")


def test_full_disk_mid_run_is_one_line_and_resumes(engines, tmp_path):
    """A tmpfs whose free pages pass the room check's lower bound (a page per PNG) but not what the run takes
    (shards, record, preview): ENOSPC mid-run is one line naming the file and --resume; after space is freed,
    --resume finishes the run."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    pages = 64 + 6  # room for the 64 PNGs, not for them plus 16 shards, the record, the preview
    fill = f'dd if=/dev/zero of="{mnt}/filler" bs=4096 count=$(( $(stat -f -c %a "{mnt}") - {pages} )) ' \
           '2>/dev/null &&'
    args = ["generate", "--engines", engines, "--num", 64, "--chunk", 4, "--steps", 2, "--out", mnt / "run"]
    keep = f'cp -r "{mnt}/run" "{tmp_path}/kept"'  # what the failed run left, out of the namespace
    r = ddt(*args, prefix=[*_unshare(), "sh", "-c", f'mount -t tmpfs -o size=2m tmpfs "{mnt}" && {fill} '
                                                    f'"$@"; rc=$?; {keep}; exit $rc', "sh"])
    line = one_line_error(r, f"error: ArtifactError: writing {mnt / 'run'}", only=False)
    assert ("expected a writable folder with room for the run, got no space left on the device (free space, then "
            "the same command with --resume keeps the finished chunks)") in line
    kept = tmp_path / "kept"
    assert not json.loads((kept / RUN_RECORD).read_text())["complete"]
    assert not list(kept.rglob("*.partial")), "a temporary file was left under the folder"
    # the same run on a disk with room, resumed from what the full one left: it finishes
    r = ddt(*args[:-1], kept, "--resume")
    assert r.returncode == 0, r.stderr
    assert len(list(kept.glob("*.png"))) == 64 and json.loads((kept / RUN_RECORD).read_text())["complete"]


def test_other_filesystem_errors_stay_one_line(tmp_path, monkeypatch, capsys):
    """The CLI's boundary: an OSError of the filesystem from any command is one line, exit 2."""
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(cli, "app", full)  # stand-in: a command whose write hit a full disk
    with pytest.raises(SystemExit) as e:
        cli.main(["fid", "a", "b"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == (f"error: OSError: {tmp_path / 'x'}: expected a writable file "
                                                 "system with room, got No space left on device")


# ------------------------------------------------------------------------------------ 2: --out that is not a run's


@pytest.mark.parametrize("out", ["", ".", "/"])
def test_out_must_be_a_run_folder(engines, tmp_path, out):
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir("/"))
    r = ddt("generate", "--engines", engines, "--num", 1, "--steps", 2, "--out", out, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out == "":
        one_line_error(r, "error: InputError: --out: expected a folder path for the run, got ''")
    else:
        where = tmp_path if out == "." else Path("/")
        one_line_error(r, "error: ArtifactError: --out: expected a new or empty folder, or one an earlier generate "
                          f"run wrote (run.json), got {where} holding ")
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir("/"))) == before  # nothing written


def test_fresh_run_never_removes_files_of_a_folder_it_did_not_write(engines, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    files = {"run.json": '{"mine": true}\n', "samples.npz": "not ours", "00000-class0.png": "my picture"}
    for name, text in files.items():
        (out / name).write_text(text)
    r = ddt("generate", "--engines", engines, "--num", 1, "--steps", 2, "--out", out)
    one_line_error(r, "error: ArtifactError: --out: expected a new or empty folder, or one an earlier generate run "
                      f"wrote (run.json), got {out} holding 3 other entries (00000-class0.png, run.json, "
                      "samples.npz)")
    assert {p.name: p.read_text() for p in out.iterdir()} == files


# ------------------------------------------------------------------------------------ 3: the lock leaves nothing


def test_a_run_leaves_no_lock_file(engines, tmp_path):
    r = ddt("generate", "--engines", engines, "--num", 2, "--steps", 2, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing beside the folder (was .out.lock)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-class0.png", "00001-class1.png",
                                                                   "preview", RUN_RECORD]


def test_a_second_writer_is_refused_naming_the_holder(engines, tmp_path):
    out = tmp_path / "out"
    with folder_lock(out):
        assert (out / LOCK_FILE).read_text() == f"pid {os.getpid()}\n"
        r = ddt("generate", "--engines", engines, "--num", 2, "--steps", 2, "--out", out)
        one_line_error(r, f"error: ArtifactError: output folder {out}: expected no other ddt-export run writing it, "
                          f"got locked by pid {os.getpid()}")
    assert not (out / LOCK_FILE).exists()


def _count_under_lock(folder: str, times: int, out) -> None:
    """A worker: `times` increments of a counter file, each a read-sleep-write that only a lock makes safe."""
    done = 0
    while done < times:
        try:
            with folder_lock(Path(folder)):
                path = Path(folder) / "count"
                n = int(path.read_text()) if path.exists() else 0
                time.sleep(0.0005)
                path.write_text(str(n + 1))
            done += 1
        except ArtifactError:
            time.sleep(0.0002)
    out.put(done)


def test_lock_removed_when_free_is_still_exclusive(tmp_path):
    """Four processes, 100 locked increments each, the lock file created and removed around every one: no
    increment lost (two holders at once would lose some), and no lock file left."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_count_under_lock, args=(str(tmp_path), 100, q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(q.get(timeout=5) for _ in procs) == [100] * 4
    assert (tmp_path / "count").read_text() == "400"
    assert sorted(os.listdir(tmp_path)) == ["count"]


# ------------------------------------------------------------------------------------ 4: too big, and flat memory


def test_a_run_that_cannot_fit_is_refused_before_it_starts(engines, tmp_path):
    """1e8 PNGs take at least a filesystem block each: refused with the numbers, nothing written."""
    st = os.statvfs(tmp_path)
    need = 10 ** 8 * st.f_frsize
    if need <= st.f_bavail * st.f_frsize:
        pytest.skip(f"this filesystem has room for 1e8 blocks of {st.f_frsize} B")
    r = ddt("generate", "--engines", engines, "--num", 10 ** 8, "--out", tmp_path / "big")
    line = one_line_error(r, f"error: ArtifactError: --out {tmp_path / 'big'}: expected room for 100000000 samples "
                             "(png): at least ")
    assert f"GiB free on {tmp_path}" in line and not (tmp_path / "big").exists()


def test_room_check_bounds(tmp_path):
    """check_room by hand: the npz's exact bytes twice is refused when it exceeds the free space; PNGs at their
    raw size beyond it only warn."""
    st = os.statvfs(tmp_path)
    free, block = st.f_bavail * st.f_frsize, st.f_frsize
    size = run_folder.SampleSize(image=free // 1000, latent=0, side=1)  # 1000 npz images fill the disk once
    with pytest.raises(ArtifactError, match="expected room for 600 samples \\(npz\\)"):
        run_folder.check_room(tmp_path, 600, ("npz",), size, False, print)  # 2 x 600 > 1000
    said = []
    count = free // (2 * block)  # a block each: fits; at 1000 x the raw size each: might not
    run_folder.check_room(tmp_path, count, ("png",), run_folder.SampleSize(1000 * block, 0, 1), False, said.append)
    assert len(said) == 1 and said[0].startswith(f"warning: {count} samples (png) may not fit"), said
    if free > 2 * 2 ** 30:  # a run that fits but is large says so before it starts
        said.clear()
        big = run_folder.SampleSize(image=2 ** 20 - 200, latent=0, side=1)  # at most 1 MiB a PNG
        run_folder.check_room(tmp_path, 1024, ("png",), big, False, said.append)
        assert len(said) == 1 and said[0].startswith(f"1024 samples (png): up to 1.0 GiB in {tmp_path}, "), said


class _FirstChunk(Exception):
    pass


def _traced_peak(engines: Path, out: Path, num: int) -> int:
    def stop(done: int, total: int) -> None:
        if done:
            raise _FirstChunk

    tracemalloc.start()
    try:
        run_generate(engines, num=num, steps=1, formats="npz", out_dir=out, progress=stop)
    except _FirstChunk:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_before_the_first_chunk_is_flat_in_num(engines, tmp_path, monkeypatch):
    """Python-allocated memory (tracemalloc: numpy arrays included) up to the first written chunk, 1e3 vs 1e8
    samples: within 16 MiB (what grows is one byte per chunk of 8 images). Before: labels, their hash's copy and a
    Chunk per chunk took ~2 GB at 1e8. The room check is replaced by a no-op stand-in here (1e8 samples do not
    fit this disk; test_a_run_that_cannot_fit_... tests it)."""
    from ddt_export.runtime.generate import generate as generate_module

    for module in (run_folder, generate_module):
        monkeypatch.setattr(module, "check_room", lambda *a, **k: None)
    small = _traced_peak(engines, tmp_path / "small", 10 ** 3)
    big = _traced_peak(engines, tmp_path / "big", 10 ** 8)
    print(f"traced peak before the first chunk: 1e3 {small / 2 ** 20:.1f} MiB, 1e8 {big / 2 ** 20:.1f} MiB")
    assert big - small < 16 * 2 ** 20


# ------------------------------------------------------------------------------------ 5: the ETA past a day


def test_eta_does_not_wrap_at_a_day(monkeypatch):
    from ddt_export.commands import common

    assert common.duration(59) == "00:00:59" and common.duration(86399) == "23:59:59"
    assert common.duration(86400) == "1d 00:00:00" and common.duration(400 * 86400 + 3723) == "400d 01:02:03"
    assert common.duration(float("inf")) == "-:--:--"
    ticks = [0.0, 10.0]  # 1 image in 10 s, 10**6 to go: 115 days

    def clock() -> float:
        return ticks.pop(0) if len(ticks) > 1 else ticks[0]

    monkeypatch.setattr(time, "perf_counter", clock)
    said = []
    monkeypatch.setattr(common, "say", said.append)
    monkeypatch.setattr(type(common.console), "is_terminal", property(lambda self: False))
    _, update = common.image_progress("sampling")
    update(0, 10 ** 6 + 1)
    update(1, 10 ** 6 + 1)
    assert said == ["sampling: 1/1000001 images, 0.10 images/s, ETA 115d 17:46:40"]


# ------------------------------------------------------------------------------------ 6, 11: Ctrl-C, --resume


def test_ctrl_c_says_what_is_there_and_resume_reports_what_it_did(engines, tmp_path):
    out = tmp_path / "run"
    args = ["generate", "--engines", engines, "--num", 200, "--chunk", 4, "--steps", 200, "--out", out]
    p = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not (out / PARTS / "chunk-000001.npz").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=CHILD_TIMEOUT)
    assert p.returncode == 130 and "Traceback" not in err, err
    done = len(list((out / PARTS).glob("chunk-*.npz"))) * 4  # the finished chunks
    assert err.strip().splitlines()[-1] == (
        f"interrupted: {done} of 200 samples are in {out} (whole chunks; nothing half-written under a final name); "
        f"the same command with --resume samples the other {200 - done}")
    assert 8 <= done < 200 and len(list(out.glob("*.png"))) >= done
    r = ddt(*args, "--resume")
    assert r.returncode == 0, r.stderr
    left = (200 - done) // 4
    assert f"sampled {200 - done} in {left} of the run's 50 chunks of 4" in r.stdout, r.stdout
    assert f"; {done} were already there" in r.stdout
    r = ddt(*args, "--resume")  # complete: nothing sampled, nothing written, and it says so
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["nothing to sample: the run is complete (200 samples, all files there)",
                                     f"kept {out / 'preview' / 'grid.png'}", f"kept {out} (200 PNGs)"]


# ------------------------------------------------------------------------------------ 10: no Ray error line


def test_stderr_filter_drops_the_one_line_and_keeps_the_rest(tmp_path):
    code = ("import os, re\nfrom ddt_export.scale.ray_data import RESTART_WARNING, dropping_lines\n"
            "with dropping_lines(RESTART_WARNING):\n"
            "    os.write(2, b\"[2026 E 1 1] core_worker.cc:2465: Actor with class name: "
            "'MapWorker(MapBatches(ChunkActor))' and ID: 'ab' has constructor arguments in the object store and "
            "max_restarts > 0. If ...\\n\")\n"
            "    os.write(2, b'[2026 E 1 1] core_worker.cc:99: a real error\\n')\n"
            "    os.write(2, b'no newline at the end')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "[2026 E 1 1] core_worker.cc:99: a real error\nno newline at the end"


@pytest.mark.timeout(CHILD_TIMEOUT + 120)
def test_ray_run_prints_no_error_line(engines, tmp_path):
    pytest.importorskip("ray.data", reason="generate --ray needs the [ray] extra")
    r = ddt("generate", "--ray", "--workers", 1, "--engines", engines, "--num", 4, "--steps", 2, "--out",
            tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "core_worker" not in r.stderr and " E " not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 4


# ------------------------------------------------------------------------------------ 18: calibrate's hint


def test_calibrate_without_fp32_says_how_to_make_it(tmp_path):
    r = ddt("calibrate", "--engines", tmp_path / "engines" / "fp32", "--num", 2)
    one_line_error(r, f"error: ArtifactError: --engines: expected an fp32 export folder (calibration runs the fp32 "
                      f"graphs), got {tmp_path / 'engines' / 'fp32'} does not exist (make it first: ddt-export "
                      f"export --out {tmp_path / 'engines' / 'fp32'})")


# ------------------------------------------------------------------------------------ 19: FID of a few samples


def _images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


@pytest.mark.parametrize("n, warned", [(8, True), (319, True), (320, False)])
def test_fid_says_what_it_compares_and_warns_below_five_samples_per_dimension(tmp_path, n, warned):
    stats = ROOT / "ddt_export" / "assets" / "digits_stats.npz"
    r = ddt("fid", _images(tmp_path / "imgs", n), stats)
    assert r.returncode == 0, r.stderr
    float(r.stdout.strip().splitlines()[-1])  # the distance alone is still the last line
    assert "FID compares Gaussian fits (mean and covariance of 64-d digits features)" in r.stderr
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert bool(warning) == warned, r.stderr
    if warned:
        assert warning[0].startswith(f"warning: FID of {n} samples") and "below 320 (5 per feature dimension)" in \
            warning[0]
        assert ("the covariance is singular" in warning[0]) == (n <= 64)


def test_fid_of_stored_statistics_does_not_warn():
    stats = ROOT / "ddt_export" / "assets" / "digits_stats.npz"
    r = ddt("fid", stats, stats)
    assert r.returncode == 0 and r.stdout.strip() == "0.000000" and "warning" not in r.stderr, r.stderr
