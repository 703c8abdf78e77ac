"""The README's set-up and tour, run top to bottom on a fresh copy of the working tree, as a new user would: the
commands are read from README.md itself, so the tour cannot break unseen.

Every `ddt-export` line runs (as `python -m cli`, in the copy) unless a rule below says why it cannot here, and
the rule is printed with the reason: a GPU, the Hub, a checkpoint that is not in the repository, a Ray cluster,
or a run of many minutes on this CPU. A new tour line that matches no rule runs; one that cannot run here needs a
rule. `ddt-export serve` runs on a free port with --lifetime, and the tour's curl is sent to it.

After the set-up the copy's `git status` is clean (nothing but ignored outputs: no lock file beside `out/`), and
after the tour no lock file is left anywhere."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from conftest import CHILD_TIMEOUT

ROOT = Path(cli.__file__).parent
README = ROOT / "README.md"

SKIP = [  # (pattern in the command, why it cannot run here)
    (r"^scripts/gpu_check\.sh", "needs a CUDA GPU and TensorRT"),
    (r"hf://", "needs the Hugging Face Hub (the network)"),
    (r"--ckpt last\.ckpt", "needs a training checkpoint that is not in the repository"),
    (r"--weights pt_inception", "needs pytorch-fid's Inception weights (a download)"),
    (r"^ray start", "starts a Ray cluster daemon that would outlive the test"),
    (r"--ray\b", "a Ray cluster run (tests/test_ray_data.py and test_serve_ray.py run --ray on small jobs)"),
    (r"--num 50000", "a long run: 50000 samples"),
    (r"^ddt-export validate", "a long run: 500 samples per side (tests/test_validate.py runs validate small)"),
    (r"^ddt-export bench", "a long run: timed repeats of every stage, ~8 minutes here (tests/test_bench.py)"),
]
INSTALL = re.compile(r"(pip install|apt-get|command -v)")


def bash_block(after: str) -> list[str]:
    """The commands of the first ```bash block after the heading `after`: comment lines dropped, trailing
    comments cut, continued lines (`\\` at the end) joined, the set-up's `a && b` chain split."""
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(after):], re.S)
    assert block, f"no bash block after {after!r} in README.md"
    out = []
    for line in re.sub(r"\\\n\s*", " ", block.group(1)).splitlines():  # a line ending in \ goes on
        line = re.sub(r"\s{2,}#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        out += [c.strip() for c in re.split(r" && (?![^{]*\})", line)]  # not inside { ...; }
    return out


def why_not(cmd: str) -> str | None:
    if INSTALL.search(cmd):
        return "an install step: the environment running the tests has it"
    return next((why for pattern, why in SKIP if re.search(pattern, cmd)), None)


def fresh_copy(dest: Path) -> Path:
    """The working tree as a fresh clone would have it (tracked and not-ignored files), committed in a new repo."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git = ["git", "-c", "user.name=tour", "-c", "user.email=tour@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "fresh clone"], cwd=dest, check=True)
    return dest


def argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    assert words[0] == "ddt-export", cmd
    return [sys.executable, "-m", "cli", *words[1:]]


def run(cmd: str, clone: Path, log: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(argv(cmd), cwd=clone, capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                       env={**os.environ, "PYTHONPATH": str(clone)})
    log.append(f"$ {cmd}  -> exit {r.returncode}")
    assert r.returncode == 0, f"the README's `{cmd}` failed on a fresh clone:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def serve_and_curl(serve_cmd: str, curl_cmd: str, clone: Path, log: list[str]) -> None:
    """The tour's `ddt-export serve` on a free port (stopping itself), and its curl sent there."""
    from serve_helpers import free_port, wait_healthy

    if shutil.which("curl") is None:
        log.append(f"skipped `{curl_cmd}`: needs curl")
        return
    port = free_port()
    proc = subprocess.Popen(argv(serve_cmd) + ["--port", str(port), "--lifetime", "300"], cwd=clone,
                            env={**os.environ, "PYTHONPATH": str(clone)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=120)
        curl = curl_cmd.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        assert curl != curl_cmd, f"the tour's curl does not go to 127.0.0.1:8000: {curl_cmd}"
        r = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        import json

        body = json.loads(r.stdout)
        assert r.returncode == 0 and len(body["images"]) == body["settings"]["num"], r.stdout[:500]
        log.append(f"$ {serve_cmd} (--port {port} --lifetime 300) + `{curl_cmd}`  -> {len(body['images'])} images")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "stopped: every request held was answered" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_rules_cover_what_cannot_run():
    """The parser finds the set-up's and the tour's commands, and every skip rule still matches a tour line
    (a rule for a line that is gone would hide the next one it happens to match)."""
    setup, tour = bash_block("## Set-up"), bash_block("## A tour")
    assert setup[-2:] == ["ddt-export build --precision fp16", "ddt-export generate --class 3 --num 8 --out out/"]
    assert any(c.startswith("ddt-export calibrate") for c in tour) and any(c.startswith("curl") for c in tour)
    for pattern, why in SKIP:
        assert any(re.search(pattern, c) for c in tour), f"the rule {pattern!r} ({why}) matches no tour line"


@pytest.mark.timeout(2400)
def test_readme_setup_and_tour_on_a_fresh_clone(tmp_path):
    from conftest import need_torch

    need_torch("the set-up's build")  # the production install (no torch) runs the other tests
    clone = fresh_copy(tmp_path / "clone")
    log: list[str] = []
    for cmd in bash_block("## Set-up"):
        why = why_not(cmd)
        if why is None:
            run(cmd, clone, log)
        else:
            log.append(f"skipped `{cmd[:60]}...`: {why}")
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "", f"after the README's set-up, git status shows:\n{status}"

    tour = bash_block("## A tour")
    done = {}
    for i, cmd in enumerate(tour):
        why = why_not(cmd)
        if cmd.startswith("curl"):
            continue  # sent with the serve line before it
        if why is not None:
            log.append(f"skipped `{cmd}`: {why}")
            continue
        if shlex.split(cmd)[:2] == ["ddt-export", "serve"]:
            curl = next(c for c in tour[i + 1:] if c.startswith("curl"))
            serve_and_curl(cmd, curl, clone, log)
            continue
        done[cmd] = run(cmd, clone, log)
    print("\n".join(log))
    fid = next(r for c, r in done.items() if c.startswith("ddt-export fid "))
    assert "warning: FID of 8 samples" in fid.stderr and "FID compares Gaussian fits" in fid.stderr, fid.stderr
    locks = [str(p.relative_to(clone)) for p in clone.rglob("*.lock") if ".git" not in p.parts]
    assert locks == [], f"lock files left behind: {locks}"


def test_readme_says_what_a_new_user_needs():
    """No wave-by-wave notes; a virtual environment before the install; `ray start` before --ray-address auto;
    the fp32 graphs made before calibrate reads them; the FID of the set-up's 8 images flagged."""
    text = README.read_text()
    assert "this wave" not in text.lower()
    setup = text[text.index("## Set-up"):text.index("```bash", text.index("## Set-up"))]
    assert "python3.11 -m venv .venv && . .venv/bin/activate" in setup
    tour = bash_block("## A tour")
    first = {name: next(i for i, c in enumerate(tour) if re.search(pattern, c)) for name, pattern in (
        ("ray start", r"^ray start --head"), ("auto", r"--ray-address auto"), ("export", r"^ddt-export export$"),
        ("calibrate", r"^ddt-export calibrate --engines engines/fp32"))}
    assert first["ray start"] < first["auto"] and first["export"] < first["calibrate"], first
    assert re.search(r"ddt-export fid out/ .*\n", text) and "it warns" in text
