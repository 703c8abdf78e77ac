"""--no-device-loop on generate, validate and bench, and what they report about the loop that ran (an ONNX
Runtime folder has the host loop only; the device loop itself is tested on a GPU in test_trt.py)."""
from __future__ import annotations

from runs import run_bench as bench
from runs import run_generate as generate
from engines_cache import run_cli


def test_generate_says_which_loop(tiny_engines, tmp_path):
    folder, _ = tiny_engines
    for flag in ("--no-device-loop", "--device-loop"):
        code, text = run_cli(["generate", "--engines", folder, "--num", "2", "--steps", "3", "--out", tmp_path / "o",
                              flag])
        assert code == 0 and "(host loop)" in text, text
    assert generate(folder, num=1, steps=2, device_loop=False, say=lambda m: None).loop == "host"


def test_bench_times_the_loops_the_folder_has(tiny_engines):
    folder, _ = tiny_engines
    res = bench(folder, batches=(1,), steps=2, schedules=("all",), repeats=1, torch_variants=(), say=lambda m: None)
    assert [r["loop"] for r in res.runs] == ["host"] and "host_fraction" in res.runs[0]
    code, text = run_cli(["bench", "--engines", folder, "--batch", "1", "--steps", "2", "--schedule", "all",
                          "--repeats", "1", "--no-torch-baseline", "--no-device-loop"])
    assert code == 0, text


def test_validate_accepts_no_device_loop(tiny_engines, tmp_path):
    from conftest import need_torch

    need_torch("validate's PyTorch reference")
    folder, _ = tiny_engines
    code, text = run_cli(["validate", "--engines", folder, "--num", "2", "--schedule", "all", "--out", tmp_path / "v",
                          "--no-device-loop"])
    assert code == 0 and "(host loop) vs torch" in text, text
