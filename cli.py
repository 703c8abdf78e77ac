"""`ddt-export`: the command line. Thin: parse, build a config, call one library function, print.

Errors a user can cause are `DDTExportError`s: printed on one line, no traceback, exit code 2.
Heavy libraries (torch, onnx) are imported inside the commands that need them, so the production commands
(generate, schedule, fid) run on the base install with no PyTorch.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ddt_export.errors import DDTExportError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Deploy DDT: ONNX export, TensorRT/ONNX Runtime engines, torch-free sampling, FID gating.")
console = Console(stderr=True)
DEFAULT_ENGINES = Path("engines/default")  # where `build` writes and `generate`/`validate`/`bench` read by default


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: run the app, turning typed errors into one line and a non-zero exit."""
    try:
        app(args=argv, prog_name="ddt-export")
    except DDTExportError as e:
        console.print(f"[bold red]error:[/] {type(e).__name__}: {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: nothing half-written was left under a final name")
        sys.exit(130)


def _say(message: str) -> None:
    """Progress messages of the library, on stderr (stdout keeps the results)."""
    console.print(message, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------- convert / export


@app.command()
def convert(
    ckpt: Path = typer.Option(..., help="official Lightning .ckpt, a plain state dict (.pt/.pth) or .safetensors"),
    config: Optional[str] = typer.Option(None, help="preset name, official DDT YAML, or config JSON"),
    out: Path = typer.Option(..., help="output .safetensors; the config JSON is written beside it"),
    weights: str = typer.Option("ema", help="ema | raw: which weights of a Lightning checkpoint"),
    trust_checkpoint: bool = typer.Option(False, help="allow pickle code in the checkpoint (executes it!)"),
):
    """Convert a checkpoint to safetensors + config JSON."""
    from ddt_export.checkpoint import convert_checkpoint
    from ddt_export.config import load_config

    st, js = convert_checkpoint(ckpt, load_config(config), out, weights=weights, trust=trust_checkpoint)
    print(f"wrote {st} and {js}")


@app.command()
def export(
    ckpt: Optional[Path] = typer.Option(None, help="checkpoint; default: the bundled model's weights"),
    config: Optional[str] = typer.Option(None, help="preset name, official DDT YAML, or config JSON"),
    out: Path = typer.Option(Path("engines/fp32"), help="output folder"),
    weights: str = typer.Option("ema", help="ema | raw: which weights of a Lightning checkpoint"),
    vae: Optional[Path] = typer.Option(None, help="local diffusers AutoencoderKL folder (latent models); no downloads"),
    random_weights: bool = typer.Option(False, help="random weights (shape checks, benchmarks); no --ckpt"),
    trust_checkpoint: bool = typer.Option(False, help="allow pickle code in the checkpoint (executes it!)"),
    force: bool = typer.Option(False, help="overwrite a folder holding another model's artifacts"),
):
    """Export encoder.onnx (x,t,y -> s), decoder.onnx (x,s -> v) and vae_decoder.onnx, checked against PyTorch."""
    from ddt_export.export import export_checkpoint

    man = export_checkpoint(ckpt, config, out, weights=weights, vae_dir=vae, random_weights=random_weights,
                            trust=trust_checkpoint, force=force)
    for name, g in man.graphs.items():
        print(f"{name}: {out / g['file']}  max rel err vs PyTorch {g['parity']['max_rel_err']:.2e}")
    print(f"wrote {out / 'manifest.json'}")


# --------------------------------------------------------------------------------------- generate / schedule


def _step_progress(label: str):
    """A rich progress bar over sampling steps; returns (context manager, callback(done, total))."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                   transient=True, disable=not console.is_terminal)
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


@app.command()
def generate(
    engines: Path = typer.Option(DEFAULT_ENGINES, help="engine folder written by `export` or `build`"),
    class_: Optional[List[int]] = typer.Option(None, "--class", help="class id; repeat for several (cycled to --num)"),
    labels: Optional[Path] = typer.Option(None, help="class ids as a 1-D integer .npy (instead of --class)"),
    num: Optional[int] = typer.Option(None, help="number of images (default: the classes given, or 8)"),
    seed: int = typer.Option(0, help="noise seed: numpy default_rng(seed).standard_normal"),
    steps: Optional[int] = typer.Option(None, help="sampling steps (default: the manifest's sampler)"),
    cfg: Optional[float] = typer.Option(None, help="CFG scale inside the guidance interval (default: manifest)"),
    schedule: Optional[str] = typer.Option(None, help="encoder schedule: all | uniform:R | dp:K | FILE.json"),
    noise: Optional[Path] = typer.Option(None, help="initial noise (B, C, H, W) .npy, for exact reproduction"),
    latents_out: Optional[Path] = typer.Option(None, help="write the final latents (before the VAE) as .npy"),
    out: Path = typer.Option(Path("samples"), help="folder for one PNG per sample (and preview/grid.png)"),
    backend: str = typer.Option("auto", help="auto | onnxruntime | tensorrt"),
):
    """Sample images with the engines: torch-free host loop, encoder only on the schedule's steps."""
    import time

    from ddt_export.generate import generate as run_generate

    bar, progress = _step_progress("sampling")
    t0 = time.perf_counter()
    with bar:
        res = run_generate(engines, classes=class_, labels_file=labels, num=num, seed=seed, steps=steps, cfg=cfg,
                           schedule=schedule, noise_file=noise, latents_out=latents_out, out_dir=out,
                           backend=backend, progress=progress,
                           say=_say)
    r, n = res.rows, res.sampler.num_steps
    print(f"{len(res.labels)} samples, {n} steps, cfg {res.sampler.guidance}, schedule {res.schedule_spec}: "
          f"encoder {r['encoder_calls']}/{n} steps, backend {res.backend}, {time.perf_counter() - t0:.1f} s")
    print(f"cond-only outside the guidance interval: encoder rows {r['encoder_rows']}/{r['encoder_rows_full']}, "
          f"decoder rows {r['decoder_rows']}/{r['decoder_rows_full']}, {100 * res.saved:.1f}% of the work saved")
    if latents_out is not None:
        print(f"wrote {latents_out}")
    if res.grid is not None:
        print(f"wrote {len(res.images)} PNGs and {res.grid}")


@app.command()
def schedule(
    engines: Optional[Path] = typer.Option(None, help="engine folder: run the template trajectory on it"),
    steps: Optional[int] = typer.Option(None, help="sampling steps N (default: the manifest's sampler)"),
    recompute: int = typer.Option(..., help="K: number of steps on which the encoder runs"),
    cfg: Optional[float] = typer.Option(None, help="CFG scale of the template trajectory (default: manifest)"),
    seed: int = typer.Option(0, help="template seed (8 samples)"),
    from_similarity: Optional[Path] = typer.Option(None, help="solve from a saved similarity-N.npy instead"),
    out: Optional[Path] = typer.Option(None, help="with --from-similarity: the schedule JSON to write"),
):
    """Choose the encoder's recompute steps with the statistical DP; store them with the engines."""
    from ddt_export.errors import InputError

    if from_similarity is not None:
        from ddt_export.generate import schedule_from_similarity

        if engines is not None or out is None:
            raise InputError("schedule --from-similarity", "--out FILE.json and no --engines",
                             "--engines" if engines is not None else "no --out")
        rec, paths = schedule_from_similarity(from_similarity, recompute, out)
    else:
        from ddt_export.generate import compute_schedule, model_label, sampler_for, store_schedule
        from ddt_export.runtime import load_engines

        if engines is None:
            raise InputError("schedule", "--engines DIR (or --from-similarity SIM.npy)", "neither")
        eng = load_engines(engines)
        sampler = sampler_for(eng, steps, cfg)
        bar, progress = _step_progress("template trajectory")
        with bar:
            rec, sim = compute_schedule(eng, sampler, recompute, seed=seed, progress=progress)
        paths = store_schedule(engines, rec, sim, model_label(eng))
    print(f"recompute steps ({len(rec['recompute_steps'])} of {rec['num_steps']}): {rec['recompute_steps']}")
    if "uniform" in rec:
        u = rec["uniform"]
        print(f"cumulative error: dp {rec['cost']:.4g}, uniform:{u['rate']} ({u['recompute']} steps) {u['cost']:.4g}")
    for p in paths.values():
        print(f"wrote {p}")

# --------------------------------------------------------------------------------------- calibrate / build


@app.command()
def calibrate(
    engines: Path = typer.Option(Path("engines/fp32"), help="fp32 export folder (`ddt-export export`)"),
    num: int = typer.Option(8, help="images per trajectory batch (the CFG batch is twice this)"),
    seed: int = typer.Option(0, help="noise seed: numpy default_rng(seed).standard_normal"),
    schedule: Optional[str] = typer.Option(None, help="the schedule that will run: all | uniform:R | dp:K | FILE.json"),
    classes: Optional[Path] = typer.Option(None, help="file of class ids (text or 1-D .npy), cycled to --num"),
    steps: Optional[int] = typer.Option(None, help="sampling steps (default: the manifest's sampler)"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: calibration/<config name>)"),
):
    """Capture encoder/decoder inputs of real trajectories on fp32 graphs (every step, full CFG batch)."""
    from ddt_export.calibrate import capture, read_classes
    from ddt_export.manifest import read_manifest

    out = out or Path("calibration") / read_manifest(engines).config.name
    ids = read_classes(classes) if classes else None
    bar, progress = _step_progress("calibration trajectories")
    with bar:
        rec = capture(engines, out, num=num, seed=seed, classes=ids, schedule=schedule, steps=steps,
                      progress=progress, say=_say)
    for name, g in rec["graphs"].items():
        print(f"{name}: {g['rows_stored']} of {g['rows_captured']} rows -> {out / g['file']}")
    print(f"wrote {out / 'manifest.json'} ({rec['sampler']['num_steps']} steps, schedule {rec['schedule']['spec']})")


@app.command()
def build(
    precision: str = typer.Option(..., help="fp32 | fp16 | bf16 | fp8"),
    ckpt: Optional[Path] = typer.Option(None, help="checkpoint; default: the bundled model's weights"),
    config: Optional[str] = typer.Option(None, help="preset name, official DDT YAML, or config JSON"),
    out: Optional[Path] = typer.Option(None, help="engine folder (default: engines/<precision>, and engines/default "
                                                  "is pointed at it)"),
    batch: str = typer.Option("1:16:64", help="engine batch range MIN:OPT:MAX (CFG rows count: 2 per image)"),
    timing_cache: Optional[Path] = typer.Option(None, help="TensorRT timing cache file (read and updated)"),
    force: bool = typer.Option(False, help="rebuild a folder built from something else"),
    vae: Optional[Path] = typer.Option(None, help="local diffusers AutoencoderKL folder (latent models)"),
    high_precision: str = typer.Option("fp16", help="fp8 only: fp16 | bf16 for everything not in FP8"),
    calibration: Optional[Path] = typer.Option(None, help="fp8 only: calibration folder (default: captured into OUT)"),
    weights: str = typer.Option("ema", help="ema | raw: which weights of a Lightning checkpoint"),
    opt_level: int = typer.Option(3, help="TensorRT builder optimization level 0-5"),
    backend: str = typer.Option("auto", help="auto (TensorRT if usable) | onnxruntime | tensorrt"),
    trust_checkpoint: bool = typer.Option(False, help="allow pickle code in the checkpoint (executes it!)"),
):
    """Export, quantize (fp8) and build the engines of one precision; without TensorRT, an ONNX Runtime folder."""
    from ddt_export.build import build as run_build, point_default
    from ddt_export.specs import BatchProfile

    target = out or DEFAULT_ENGINES.parent / precision
    bar, progress = _step_progress("calibration steps")  # shown while fp8 captures its calibration
    with bar:
        res = run_build(precision, out=target, ckpt=ckpt, config=config, batch=BatchProfile.parse(batch),
                        timing_cache=timing_cache, force=force, vae=vae, high_precision=high_precision,
                        calibration=calibration, weights=weights, trust=trust_checkpoint, opt_level=opt_level,
                        backend=backend, say=_say, progress=progress)
    for name, g in res.manifest.graphs.items():
        errs = {k: v.get("max_rel_err", "not run") for k, v in (g.get("parity") or {}).items()
                if isinstance(v, dict)}
        err = g.get("parity", {}).get("max_rel_err")
        shown = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k}: {v}" for k, v in errs.items())
        print(f"{name}: {target / g['file']}" + (f"  max rel err vs PyTorch fp32 {err:.2e}" if err else "")
              + (f"  [{shown}]" if shown else ""))
        if "quantization" in g:
            q = g["quantization"]["fp8_gemms"]
            print(f"  FP8 block GEMMs: {q['block_fp8']}/{q['block_gemms']}")
    print(f"{'reused' if res.reused else 'built'} {target} ({precision}, backend {res.backend})")
    if out is None and point_default(target, DEFAULT_ENGINES, say=_say):
        print(f"{DEFAULT_ENGINES} -> {target.name}")

# --------------------------------------------------------------------------------------- fid / validate


@app.command()
def fid(
    a: Path = typer.Argument(..., metavar="A", help="ADM-style .npz (mu/sigma, or arr_0 uint8 NHWC) or PNG folder"),
    b: Path = typer.Argument(..., metavar="B", help="the other side, same kinds"),
    features: str = typer.Option("digits", help="digits | inception: the extractor for image inputs"),
    inception_onnx: Optional[Path] = typer.Option(None, help="inception_fid.onnx from `ddt-export fid-inception`"),
    batch: int = typer.Option(50, help="images per feature-extractor call"),
    from_images: bool = typer.Option(False, help="recompute stats from arr_0 even where mu/sigma are stored"),
):
    """Frechet distance between two image sets or statistics; the distance alone is the last line printed."""
    from ddt_export.fid import fid_from_paths

    res = fid_from_paths(a, b, features=features, inception_onnx=inception_onnx, batch=batch,
                         from_images=from_images)
    for s in (res.a, res.b):
        console.print(s.describe(), highlight=False, soft_wrap=True)
    if res.features == "inception" and any(s.n is None for s in (res.a, res.b)):
        console.print("note: stored statistics are used as they are; ADM's were made with the TF graph, whose "
                      "preprocessing differs from pytorch-fid's (use --from-images for one convention)",
                      highlight=False, soft_wrap=True)
    print(f"{res.value:.6f}")


@app.command("fid-inception")
def fid_inception(
    weights: Path = typer.Option(..., help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (no download)"),
    out: Path = typer.Option(Path("engines/fid"), help="folder for inception_fid.onnx and inception_fid.json"),
):
    """Export pytorch-fid's FID Inception-v3 to ONNX (needs torch), checked against PyTorch."""
    import json

    from ddt_export.inception import INFO_NAME, export_inception

    path = export_inception(weights, out)
    info = json.loads((out / INFO_NAME).read_text())
    if not info["source"]["official"]:
        console.print(f"note: {weights} has sha256 {info['source']['sha256'][:12]}, not pytorch-fid's 6726825d...; "
                      "its features are not the FID ones unless it holds the same weights", highlight=False,
                      soft_wrap=True)
    print(f"{path}: max rel err vs PyTorch {info['parity']['max_rel_err']:.2e} (tol {info['parity']['tol']:.1e})")
    print(f"wrote {path} and {out / INFO_NAME}")


@app.command()
def validate(
    engines: Path = typer.Option(DEFAULT_ENGINES, help="engine folder to validate"),
    reference: str = typer.Option("torch", help="torch (fp32 PyTorch from the manifest's checkpoint) | DIR2 "
                                                "(a second engine folder of the same model)"),
    num: Optional[int] = typer.Option(None, help="number of samples, labels 0, 1, ... cycled (default 250)"),
    seed: int = typer.Option(0, help="noise seed: numpy default_rng(seed).standard_normal"),
    schedule: Optional[str] = typer.Option(None, help="encoder schedule of both sides: all | uniform:R | dp:K | FILE"),
    stats: Optional[Path] = typer.Option(None, help="data statistics .npz (ADM-style mu/sigma or arr_0 images); "
                                                    "default for the digits model: the bundled digits_stats.npz"),
    max_fid_delta: Optional[float] = typer.Option(None, help="fail (exit 2) when the FID delta exceeds this"),
    features: Optional[str] = typer.Option(None, help="digits | inception (default: digits for the digits model)"),
    inception_onnx: Optional[Path] = typer.Option(None, help="inception_fid.onnx from `ddt-export fid-inception`"),
    out: Path = typer.Option(Path("validation"), help="folder for report.json and side_by_side.png"),
):
    """Engines vs a reference from identical noise: latent error, per-tensor parity, FID; the FID delta gate."""
    from ddt_export.validate import validate as run_validate

    bar, progress = _step_progress("validating (sample-steps)")
    with bar:
        rep = run_validate(engines, reference=reference, num=num, seed=seed, schedule=schedule, stats=stats,
                           features=features, inception_onnx=inception_onnx, max_fid_delta=max_fid_delta, out=out,
                           progress=progress, say=_say)
    r, e = rep["reference"], rep["latent_rel_err"]
    print(f"{rep['num']} samples, schedule {rep['schedule']['spec']}: {rep['engines']['precision']} engines vs "
          f"{r['kind']} {r['precision']} reference")
    print(f"final latent rel err: mean {e['mean']:.3e}  p99 {e['p99']:.3e}  max {e['max']:.3e}")
    for name, p in rep["parity"].items():
        print(f"{name} at step {p['step']}: max rel err {p['max_rel_err']:.3e} (tol {p['tolerance']:.1e}), "
              f"rel L2 {p['rel_l2']:.3e}")
    f = rep["fid"]
    if "skipped" in f:
        print(f"FID skipped: {f['skipped']}")
    else:
        print(f"FID ({f['features']} features) engine vs reference: {f['engine_vs_reference']:.4f}")
        if "engine_vs_data" in f:
            print(f"FID vs data ({f['stats']}): engine {f['engine_vs_data']:.4f}, "
                  f"reference {f['reference_vs_data']:.4f}")
        gate = f.get("gate")
        print(f"delta {f['delta_definition']} = {f['delta']:.4f}"
              + (f" <= {gate['max_fid_delta']:g}: passed" if gate else ""))
    print(f"wrote {out / 'report.json'} and {out / 'side_by_side.png'}")


# --------------------------------------------------------------------------------------- bench


@app.command()
def bench(
    engines: Path = typer.Option(DEFAULT_ENGINES, help="engine folder (export or build output)"),
    batch: List[int] = typer.Option([1, 4], help="batch sizes in images (repeat the option)"),
    steps: Optional[int] = typer.Option(None, help="sampling steps (default: the manifest's)"),
    schedule: List[str] = typer.Option(["all", "uniform:2"], help="encoder schedules (repeat); `all` is always run"),
    repeats: int = typer.Option(3, help="timed repeats per measurement (after one warm-up)"),
    torch_baseline: bool = typer.Option(True, help="also time the PyTorch reference (needs the [export] extra)"),
    cond_only: bool = typer.Option(True, help="skip the unconditional half outside the guidance interval"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all numbers as JSON"),
    plot: Optional[Path] = typer.Option(None, help="PNG of images/s against batch size and schedule"),
):
    """Per-stage latency, images/s per batch and schedule, sharing speed-up measured vs predicted, vs PyTorch."""
    from rich.table import Table

    from ddt_export.bench import bench as run_bench
    from ddt_export.bench import write_outputs

    res = run_bench(engines, batches=batch, steps=steps, schedules=schedule, repeats=repeats,
                    torch_variants=None if torch_baseline else (), cond_only=(cond_only,),
                    say=_say)
    out = Console(width=140)
    t = Table(title=f"stages: one call ({res.model}, {res.precision})")
    for c in ("backend", "graph", "rows", "median ms", "min..max ms"):
        t.add_column(c)
    for s in res.stages:
        t.add_row(s["backend"], s["graph"], str(s["rows"]), f"{1e3 * s['s']['median']:.2f}",
                  f"{1e3 * s['s']['lo']:.2f}..{1e3 * s['s']['hi']:.2f}")
    out.print(t)
    t = Table(title=f"trajectories: {res.steps} steps")
    for c in ("backend", "batch", "schedule", "enc calls", "median s", "images/s", "host share"):
        t.add_column(c)
    for r in res.runs:
        t.add_row(r["backend"], str(r["batch"]), r["schedule"], str(r["encoder_calls"]), f"{r['s']['median']:.3f}",
                  f"{r['images_per_s']:.3f}", f"{r['host_fraction']:.1%}" if "host_fraction" in r else "-")
    out.print(t)
    t = Table(title="encoder sharing: speed-up over `all`")
    for c in ("backend", "batch", "schedule", "recompute", "predicted (FLOPs)", "measured"):
        t.add_column(c)
    for s in res.sharing:
        t.add_row(s["backend"], str(s["batch"]), s["schedule"], f"{s['recompute_fraction']:.2f}",
                  f"{s['predicted']:.2f}x", f"{s['measured']:.2f}x")
    out.print(t)
    write_outputs(res, json_out, plot)


if __name__ == "__main__":
    main()
