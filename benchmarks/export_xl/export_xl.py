"""Export DDT-XL/2 (22en6de, 256 px, random weights) to ONNX on this machine: time and peak memory.

    python benchmarks/export_xl/export_xl.py [--preset ddt-xl-256] [--out /tmp/ddt-xl] [--no-write]
    python benchmarks/export_xl/export_xl.py --preset ddt-tiny-digits --out /tmp/ddt-tiny-export --no-write   # smoke

Writes the dated row between the markers of this folder's README.md (`--no-write`: print it only). Random
weights are fine: graph size, shapes and export cost do not depend on the values; the parity check against
PyTorch runs as in every export. The XL folder it leaves in --out is what benchmarks/xl_cpu/run_cpu.py --xl
times per call.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]  # run as a script: this checkout's ddt_export and benchmarks.common

from benchmarks.common.doc_blocks import update_block  # noqa: E402
from ddt_export.core.artifacts import library_versions  # noqa: E402
from ddt_export.core.config import load_config  # noqa: E402
from ddt_export.export.exporter import ExportOptions, export_model, load_checkpoint_model  # noqa: E402

HEAD = "| date | what | wall time | peak RSS | graphs | machine, versions |\n| --- | --- | --- | --- | --- | --- |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ddt-xl-256")
    ap.add_argument("--out", default="/tmp/ddt-xl")
    ap.add_argument("--no-write", action="store_true", help="print the row only; leave README.md alone")
    a = ap.parse_args(argv)
    cfg = load_config(a.preset)
    t0 = time.time()
    model, source = load_checkpoint_model(None, cfg, random_weights=True)
    man = export_model(model, cfg, Path(a.out), source, ExportOptions(force=True),
                       progress=lambda m: print(m, flush=True))
    dt = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    sizes = {n: sum(f.stat().st_size for f in Path(a.out).glob(g.file + "*")) / 2**30 for n, g in man.graphs.items()}
    errs = {n: g.parity["vs_pytorch"]["max_rel_err"] for n, g in man.graphs.items()}
    v = library_versions()
    row = (f"| {time.strftime('%Y-%m-%d')} | export {a.preset} fp32 (random weights) | {dt:.0f} s | {peak:.1f} GiB | "
           + ", ".join(f"{n} {sizes[n]:.2f} GiB rel err {errs[n]:.1e}" for n in sizes)
           + f" | {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {v.get('torch')}, "
             f"onnx {v.get('onnx')}, onnxruntime {v.get('onnxruntime')} |")
    print(row)
    if not a.no_write:
        update_block(Path(__file__).resolve().parent / "README.md", f"{HEAD}\n{row}")


if __name__ == "__main__":
    main()
