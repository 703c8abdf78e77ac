"""The engine folders the test fixtures export, written once into DIR for a test run without torch (the production
install: base + [serve,test,cuda-check]), which reads them from $DDT_TEST_ARTIFACTS:

    python tests/make_artifacts.py DIR          # in an environment with torch ([export])
    DDT_TEST_ARTIFACTS=DIR python -m pytest     # in one without

tiny-fp32: the tiny test engines (conftest.export_tiny); digits-fp16: the bundled digits model, fp16
(`ddt-export build --precision fp16`).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from conftest import DIGITS_FOLDER, TINY_FOLDER, export_tiny  # noqa: E402
from engines_cache import run_cli  # noqa: E402


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    export_tiny(out / TINY_FOLDER)
    code, text = run_cli(["build", "--precision", "fp16", "--out", out / DIGITS_FOLDER])
    if code:
        raise SystemExit(text)
    print(f"wrote {out / TINY_FOLDER} and {out / DIGITS_FOLDER}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
