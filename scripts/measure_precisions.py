"""Measure every precision against fp32 for one checkpoint, on CPU (onnxruntime), and print a markdown table.

    python scripts/measure_precisions.py --ckpt CKPT --config CONFIG --out DIR [--num 4]

Builds fp8 (which leaves the fp32 and fp16 exports and the calibration in DIR/fp8/stages and DIR/fp8/calibration)
and bf16 with `ddt_export.builder`, then measures per graph (max |out - ref| / max |ref| and relative L2; fp16 on
random inputs, fp8 on calibration rows) and per sample (final latents of the host loop, same noise, relative L2).
bf16 graphs cannot run in onnxruntime on CPU; their row shows the PyTorch CPU bf16 error recorded by the build.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ddt_export.builder.engine import BuildOptions, build
from ddt_export.builder.parity import graph_errors, sample_error


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--num", type=int, default=4)
    a = ap.parse_args()
    opts = BuildOptions(ckpt=a.ckpt, config=a.config, backend="onnxruntime")
    fp8 = build("fp8", opts, out=a.out / "fp8").folder
    bf16 = build("bf16", opts, out=a.out / "bf16").manifest
    stages = fp8 / "stages"
    rows = {"fp16": graph_errors(stages / "fp16", stages / "fp32"),
            "fp8": graph_errors(fp8, stages / "fp32", calibration=fp8 / "calibration")}
    samples = {p: sample_error(f, stages / "fp32", num=a.num) for p, f in (("fp16", stages / "fp16"), ("fp8", fp8))}
    print("| precision | encoder max rel / rel L2 | decoder max rel / rel L2 | final latents rel L2 |")
    print("| --- | --- | --- | --- |")
    for p in ("fp16", "fp8"):
        e, d = rows[p]["encoder"], rows[p]["decoder"]
        print(f"| {p} | {e['max_rel_err']:.2e} / {e['rel_l2']:.2e} | {d['max_rel_err']:.2e} / {d['rel_l2']:.2e} | "
              f"{samples[p]['final_latent_rel_l2']:.2e} |")
    tb = {g: bf16.graphs[g].parity["torch_bf16"]["max_rel_err"] for g in ("encoder", "decoder")}
    print(f"| bf16 (PyTorch CPU) | {tb['encoder']:.2e} | {tb['decoder']:.2e} | not run (no bf16 MatMul on CPU) |")
    record = {"graphs": rows, "samples": samples, "bf16_torch": tb}
    (a.out / "measurements.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
