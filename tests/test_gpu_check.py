"""scripts/gpu_check.sh --dry-run on CPU: it runs, writes its JSON and log, and lists every step with a status
and, for each skip, the reason. (The real run needs a GPU: docs/gpu.md.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "nvrtc-kernel", "gpu-tests", "cost-curve", "torch-eager", "ort-cuda", "tensorrt",
         "torch-compile"]


@pytest.mark.timeout(180)
def test_dry_run_lists_every_step(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["dry_run"] and [s["name"] for s in doc["steps"]] == STEPS and doc["failed"] == []
    assert doc["steps"][0]["status"] == "ran" and "tensorrt_status" in doc["environment"]
    for s in doc["steps"][1:]:
        assert s["status"] in ("would run", "skipped") and s["what"], s
        assert s["status"] != "skipped" or s["reason"], s  # every skip says why
    log = (out / "gpu_check.log").read_text()
    assert all(f"[gpu_check] {name}:" in log for name in STEPS)


def test_usage_without_a_folder():
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


def _path_with(tmp_path: Path, pythons: dict[str, str]) -> str:
    """A PATH holding only the tools gpu_check.sh calls, and `pythons` ({name: interpreter})."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "mkdir", "dirname", "timeout", "tee"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, target in pythons.items():
        (bin_dir / name).symlink_to(target)
    return str(bin_dir)


def test_runs_where_only_python3_exists(tmp_path):  # issue 22, defect 11: `python` alone exited 127
    env = dict(os.environ, PATH=_path_with(tmp_path, {"python3": sys.executable}))
    env.pop("PYTHON", None)
    r = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out"), "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "usage: gpu_check.py" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_says_so_where_no_python_exists(tmp_path):
    env = dict(os.environ, PATH=_path_with(tmp_path, {}))
    env.pop("PYTHON", None)
    r = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 127 and "no python3 or python on PATH" in r.stderr
    assert "no python3 or python" in (tmp_path / "out" / "gpu_check.log").read_text()
