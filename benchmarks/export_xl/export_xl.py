"""Export DDT-XL/2 (22en6de, 256 px, random weights) to ONNX on this machine: time and peak memory.

    python benchmarks/export_xl.py [--preset ddt-xl-256] [--out /tmp/ddt-xl] [--results benchmarks/results.md]

Appends a dated row to the results file. Random weights are fine: graph size, shapes and export cost do not
depend on the values; the parity check against PyTorch runs as in every export.
"""
from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

from ddt_export.core.config import load_config
from ddt_export.export.exporter import load_checkpoint_model, export_model
from ddt_export.core.artifacts import library_versions


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ddt-xl-256")
    ap.add_argument("--out", default="/tmp/ddt-xl")
    ap.add_argument("--results", default=str(Path(__file__).with_name("results.md")))
    a = ap.parse_args(argv)
    cfg = load_config(a.preset)
    t0 = time.time()
    model, source = load_checkpoint_model(None, cfg, random_weights=True)
    man = export_model(model, cfg, Path(a.out), weights=source, force=True, progress=lambda m: print(m, flush=True))
    dt = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    sizes = {n: sum(f.stat().st_size for f in Path(a.out).glob(g["file"] + "*")) / 2**30 for n, g in man.graphs.items()}
    errs = {n: g.parity["vs_pytorch"]["max_rel_err"] for n, g in man.graphs.items()}
    v = library_versions()
    row = (f"| {time.strftime('%Y-%m-%d')} | export {a.preset} fp32 (random weights) | {dt:.0f} s | {peak:.1f} GiB | "
           + ", ".join(f"{n} {sizes[n]:.2f} GiB rel err {errs[n]:.1e}" for n in sizes)
           + f" | {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; torch {v.get('torch')}, "
             f"onnx {v.get('onnx')}, onnxruntime {v.get('onnxruntime')} |")
    print(row)
    with open(a.results, "a") as f:
        f.write(row + "\n")


if __name__ == "__main__":
    main()
