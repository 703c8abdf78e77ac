"""CPU speed of the engines against PyTorch: an XL-shaped model end to end, and DDT-XL/2 per call.

    python benchmarks/xl_cpu/run_cpu.py --steps 10 --batches 1 2 --repeats 3   # the measurement in README.md
    python benchmarks/xl_cpu/run_cpu.py --steps 2 --batches 1 --repeats 1 --xl /nonexistent --no-write  # smoke

1. `ddt-xl-cpu` (28 blocks, 22 encoder, hidden 256, 256 tokens; random weights): exported to ONNX, then
   `ddt_export.evaluate.bench.bench` with schedules all, uniform:2, uniform:4 and dp:K at the same step counts K,
   engines (onnxruntime CPU) and the PyTorch eager fp32 reference in the same run.
2. DDT-XL/2 256 (random weights, exported by benchmarks/export_xl/export_xl.py to --xl if that folder exists):
   one encoder and one decoder call at 2 rows (one image with CFG), onnxruntime vs PyTorch eager fp32.
Writes xl-cpu.json, xl-cpu.png (and xl-256.json) in this folder and the dated sections between the markers of
its README.md (`--no-write`: print them only, write nothing here).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]  # run as a script: this checkout's ddt_export and benchmarks.common

from benchmarks.common.doc_blocks import update_block  # noqa: E402
from ddt_export.core.config import load_config  # noqa: E402
from ddt_export.core.flops import step_flops  # noqa: E402
from ddt_export.evaluate.bench import BenchOptions, bench, write_outputs  # noqa: E402
from ddt_export.export.exporter import ExportOptions, export_model, load_checkpoint_model  # noqa: E402

HERE = Path(__file__).resolve().parent


def section(res, title: str, cmd: str) -> str:
    m = res.machine
    v = m["versions"]
    lines = [f"\n### {title} ({m['date']})\n", f"Command: `{cmd}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; onnxruntime {v.get('onnxruntime')} "
             f"({', '.join(m.get('onnxruntime_providers', []))}), torch {v.get('torch')}, numpy {v.get('numpy')}.\n",
             "| backend | graph | rows | median ms | min..max ms |", "| --- | --- | --- | --- | --- |"]
    for s in res.stages:
        lines.append(f"| {s['backend']} | {s['graph']} | {s['rows']} | {1e3 * s['s']['median']:.1f} | "
                     f"{1e3 * s['s']['lo']:.1f}..{1e3 * s['s']['hi']:.1f} |")
    if res.runs:
        lines += ["", f"Trajectories, {res.steps} steps:", "",
                  "| backend | batch | schedule | encoder calls | median s | min..max s | images/s | host share |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in res.runs:
            hs = f"{r['host_fraction']:.1%}" if "host_fraction" in r else "-"
            lines.append(f"| {r['backend']} | {r['batch']} | {r['schedule']} | {r['encoder_calls']} | "
                         f"{r['s']['median']:.2f} | {r['s']['lo']:.2f}..{r['s']['hi']:.2f} | {r['images_per_s']:.3f} | {hs} |")
    if res.sharing:
        lines += ["", "Encoder sharing, speed-up over `all` (same run):", "",
                  "| batch | schedule | recompute fraction | predicted (FLOPs) | measured |", "| --- | --- | --- | --- | --- |"]
        for s in res.sharing:
            lines.append(f"| {s['batch']} | {s['schedule']} | {s['recompute_fraction']:.2f} | {s['predicted']:.2f}x | "
                         f"{s['measured']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--xl", default="/tmp/ddt-xl")
    ap.add_argument("--work", default="/tmp/ddt-bench")
    ap.add_argument("--no-write", action="store_true", help="print only: no JSON, PNG or README section")
    a = ap.parse_args(argv)
    cmd = "python benchmarks/xl_cpu/run_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg = load_config("ddt-xl-cpu")
    folder = Path(a.work) / "xl-cpu-fp32"
    model, src = load_checkpoint_model(None, cfg, random_weights=True, seed=0)
    export_model(model, cfg, folder, src, ExportOptions(force=True))
    n = a.steps
    f = step_flops(cfg.model)
    schedules = ["all", "uniform:2", f"dp:{-(-n // 2)}", "uniform:4", f"dp:{-(-n // 4)}"]  # dp at uniform's counts
    res = bench(folder, BenchOptions(batches=a.batches, steps=n, schedules=schedules, repeats=a.repeats,
                                     torch_variants=("torch-eager-fp32",)))
    out = None if a.no_write else HERE
    write_outputs(res, out and out / "xl-cpu.json", out and out / "xl-cpu.png")
    text = section(res, f"ddt-xl-cpu end to end (encoder share of step FLOPs {f.encoder_fraction:.1%})", cmd)
    if (Path(a.xl) / "manifest.json").is_file():
        xl = bench(Path(a.xl), BenchOptions(batches=[1], steps=1, schedules=["all"], repeats=a.repeats,
                                            torch_variants=("torch-eager-fp32",)), say=print)
        xl.runs, xl.sharing = [], []  # one call per graph only: a whole XL trajectory is minutes per image here
        write_outputs(xl, out and out / "xl-256.json", None)
        text += section(xl, "DDT-XL/2 256, one call per graph (random weights)", cmd)
    print(text)
    if not a.no_write:
        update_block(HERE / "README.md", text.strip())


if __name__ == "__main__":
    main()
