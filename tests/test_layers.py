"""The tree's contracts: the import-linter layers and torch boundary (pyproject.toml), and the line budget."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CHILD_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400  # STYLE: files stay small


@pytest.mark.timeout(CHILD_TIMEOUT + 60)
def test_import_contracts_hold():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: the [test] extra brings import-linter")
    r = subprocess.run([exe], capture_output=True, text=True, timeout=CHILD_TIMEOUT, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_line_budget():
    files = [ROOT / "cli.py", *sorted((ROOT / "ddt_export").rglob("*.py"))]
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
