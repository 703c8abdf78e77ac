"""One FP8 build of the official-format tiny checkpoint, shared by the engines tests (built once per session).

`ddt-export build --precision fp8` leaves everything the precision, calibration, quantization and build tests
look at: stages/fp32 (fp32 export), stages/fp16 (fp16 export), calibration/, the FP8 graphs and manifest.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import cli

_CACHE: dict[str, tuple[Path, str]] = {}


def run_cli(argv) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `ddt-export ARGV` run in-process."""
    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = int(e.code or 0)
    return code, buf.getvalue()


def fp8_build(tmp_path_factory, official_ckpt) -> tuple[Path, str]:
    """(folder, CLI output) of `ddt-export build --precision fp8 --ckpt last.ckpt --config tiny.yaml --out DIR`."""
    if "fp8" not in _CACHE:
        ckpt, yaml, _ = official_ckpt
        out = tmp_path_factory.mktemp("build") / "fp8"
        code, text = run_cli(["build", "--precision", "fp8", "--ckpt", ckpt, "--config", yaml, "--out", out])
        assert code == 0, text
        _CACHE["fp8"] = (out, text)
    return _CACHE["fp8"]
