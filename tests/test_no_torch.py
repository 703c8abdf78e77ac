"""The runtime imports no torch: `generate` (with a DP schedule), `schedule`, `evaluate` and `fid` run with torch
unimportable.

(The import-linter contracts in pyproject.toml state the same boundary for every module; this runs it.)"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cli
from conftest import CHILD_TIMEOUT

BLOCK_TORCH = textwrap.dedent("""
    import sys

    class NoTorch:  # what an environment without torch looks like to `import torch`
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by test_no_torch)")
            return None

    sys.meta_path.insert(0, NoTorch())
""")

SCRIPT = BLOCK_TORCH + textwrap.dedent("""
    import cli
    for argv in ARGVS:
        try:
            cli.main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    import ddt_export.runtime, ddt_export.runtime.generate, ddt_export.core.sampling, ddt_export.runtime.sampling.schedules
    import ddt_export.evaluate.fid, ddt_export.evaluate.features, ddt_export.evaluate.adm, ddt_export.evaluate.suite
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print("TORCH_MODULES", loaded)
""")


@pytest.mark.timeout(CHILD_TIMEOUT + 60)
def test_generate_without_torch(tiny_engines, tmp_path):
    import numpy as np
    from PIL import Image

    from ddt_export.evaluate.features import DIGITS_STATS

    eng = tmp_path / "engines"
    shutil.copytree(tiny_engines[0], eng)
    digits = tmp_path / "digits"  # 16x16 grayscale images for the bundled digits feature extractor
    digits.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(digits / f"{i}.png")
    argvs = [["generate", "--engines", str(eng), "--num", "2", "--steps", "6", "--schedule", "dp:3",
              "--out", str(tmp_path / "png"), "--latents-out", str(tmp_path / "lat.npy")],
             ["schedule", "--engines", str(eng), "--steps", "6", "--recompute", "2"],
             ["schedule", "--from-similarity", str(eng / "similarity-6.npy"), "--recompute", "3",
              "--out", str(tmp_path / "s.json")],
             ["evaluate", str(digits), str(DIGITS_STATS), "--json", str(tmp_path / "adm.json")],
             ["fid", str(digits), str(DIGITS_STATS)]]
    code = f"ARGVS = {argvs!r}\n" + SCRIPT
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                       cwd=Path(cli.__file__).parent)
    assert r.returncode == 0, r.stderr
    assert "TORCH_MODULES []" in r.stdout, r.stdout
    assert float(r.stdout.strip().splitlines()[-2]) > 0  # fid's last line before ours: the distance
    assert (tmp_path / "lat.npy").is_file() and (tmp_path / "png" / "preview" / "grid.png").is_file()
    assert (eng / "schedule-6-3.json").is_file() and (tmp_path / "s.json").is_file()
    assert "Recall: " in r.stdout and (tmp_path / "adm.json").is_file()  # all five numbers, torch-free


@pytest.mark.timeout(CHILD_TIMEOUT + 60)
def test_blocker_blocks():
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import torch"], capture_output=True, text=True,
                       timeout=CHILD_TIMEOUT)
    assert r.returncode != 0 and "blocked by test_no_torch" in r.stderr
