"""Commands that measure: fid, evaluate, fid-inception, validate, bench, tune."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ..evaluate.adm import IS_ORDER, IS_ORDERS, IS_SEED, IS_SPLIT
from ..evaluate.bench import DEFAULT_BATCHES, DEFAULT_REPEATS, DEFAULT_SCHEDULES
from ..evaluate.features import DEFAULT_BATCH as FEATURE_BATCH
from ..evaluate.tune_space import DEFAULT_CONFIRM as TUNE_CONFIRM, DEFAULT_NUM as TUNE_NUM, \
    DEFAULT_PROBE as TUNE_PROBE, DEFAULT_RECALL_DELTA as TUNE_RECALL_DELTA
from ..evaluate.validate import DEFAULT_NUM as VALIDATE_NUM
from ..runtime.graphs.engines import DEFAULT_ENGINES
from .common import (DEVICE_LOOP_HELP, FORECAST_HELP, PLAN_HELP, SEED_HELP, SOLVER_HELP, console, image_progress,
                     say, step_progress)


def fid(
    a: Path = typer.Argument(..., metavar="A", help="ADM-style .npz (mu/sigma, or arr_0 uint8 NHWC) or PNG folder"),
    b: Path = typer.Argument(..., metavar="B", help="the other side, same kinds"),
    features: str = typer.Option("digits", help="digits | inception: the extractor for image inputs"),
    inception_onnx: Optional[Path] = typer.Option(None, help="inception_fid.onnx from `ddt-export fid-inception`"),
    batch: int = typer.Option(FEATURE_BATCH, help="images per feature-extractor call"),
    from_images: bool = typer.Option(False, help="recompute stats from arr_0 even where mu/sigma are stored"),
):
    """Frechet distance between two image sets or statistics; the distance alone is the last line printed."""
    from ..evaluate.fid import fid_from_paths

    res = fid_from_paths(a, b, features=features, inception_onnx=inception_onnx, batch=batch,
                         from_images=from_images)
    for s in (res.a, res.b):
        console.print(s.describe(), highlight=False, soft_wrap=True)
    console.print(res.compares(), highlight=False, soft_wrap=True)
    if res.warning() is not None:
        console.print(res.warning(), style="yellow", highlight=False, soft_wrap=True)
    if res.features == "inception" and any(s.n is None for s in (res.a, res.b)):
        console.print("note: stored statistics are used as they are; ADM's were made with the TF graph, whose "
                      "preprocessing differs from pytorch-fid's (use --from-images for one convention)",
                      highlight=False, soft_wrap=True)
    print(f"{res.value:.6f}")


def evaluate(
    samples: Path = typer.Argument(..., metavar="SAMPLES", help="sample batch: ADM-style .npz (arr_0 uint8 NHWC) "
                                                                "or PNG folder"),
    ref: Path = typer.Argument(..., metavar="REF", help="reference batch: .npz (arr_0 and/or mu, sigma, mu_s, "
                                                        "sigma_s) or PNG folder"),
    features: str = typer.Option("digits", help="digits | inception: the feature network"),
    inception_onnx: Optional[Path] = typer.Option(None, help="inception_fid.onnx from `ddt-export fid-inception`"),
    batch: int = typer.Option(FEATURE_BATCH, help="images per feature-extractor call"),
    from_images: bool = typer.Option(False, help="recompute stats from arr_0 even where they are stored"),
    is_order: str = typer.Option(IS_ORDER, help=f"{' | '.join(IS_ORDERS)}: the order IS cuts its splits of {IS_SPLIT} "
                                              f"from; shuffled: a fixed permutation (seed {IS_SEED}); as-given: "
                                              "the stored order, ADM's evaluator exactly"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the numbers as JSON"),
):
    """ADM's five numbers (Inception Score, FID, sFID, precision, recall) of SAMPLES against REF."""
    from ..core.artifacts import write_json
    from ..evaluate.suite import evaluate_paths, format_numbers

    bar, progress = step_progress("featurizing (images)")
    with bar:
        res = evaluate_paths(samples, ref, features=features, inception_onnx=inception_onnx, batch=batch,
                             from_images=from_images, is_order=is_order, progress=progress, say=say)
    for side in (res.samples, res.reference):
        console.print(side.describe(), highlight=False, soft_wrap=True)
    if res.features == "inception" and any(s.stats.n is None for s in (res.samples, res.reference)):
        console.print("note: stored statistics are used as they are; ADM's were made with the TF graph, whose "
                      "preprocessing differs from pytorch-fid's (use --from-images for one convention)",
                      highlight=False, soft_wrap=True)
    rec = res.record()
    if rec["reference_inception_score"] is not None:
        console.print(f"reference Inception Score: {rec['reference_inception_score']:.4f}", highlight=False)
    for line in format_numbers(rec):
        print(line)
    if json_out is not None:
        write_json(json_out, rec)
        print(f"wrote {json_out}")


def fid_inception(
    weights: Path = typer.Option(..., help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (no download)"),
    out: Path = typer.Option(Path("engines/fid"), help="folder for inception_fid.onnx and inception_fid.json"),
):
    """Export pytorch-fid's FID Inception-v3 to ONNX (needs torch), checked against PyTorch."""
    import json

    from ..export.inception import INFO_NAME, export_inception

    path = export_inception(weights, out)
    info = json.loads((out / INFO_NAME).read_text())
    if not info["source"]["official"]:
        console.print(f"note: {weights} has sha256 {info['source']['sha256'][:12]}, not pytorch-fid's 6726825d...; "
                      "its features are not the FID ones unless it holds the same weights", highlight=False,
                      soft_wrap=True)
    print(f"{path}: max rel err vs PyTorch {info['parity']['max_rel_err']:.2e} (tol {info['parity']['tol']:.1e})")
    print(f"wrote {path} and {out / INFO_NAME}")


def validate(
    engines: Path = typer.Option(DEFAULT_ENGINES, help="engine folder to validate"),
    reference: str = typer.Option("torch", help="torch (fp32 PyTorch from the manifest's checkpoint) | DIR2 "
                                                "(a second engine folder of the same model)"),
    num: int = typer.Option(VALIDATE_NUM, help="number of samples, labels 0, 1, ... cycled"),
    seed: int = typer.Option(0, help=SEED_HELP),
    schedule: Optional[str] = typer.Option(None, help="encoder schedule of both sides: all | uniform:R | dp:K | FILE"),
    solver: Optional[str] = typer.Option(None, help=SOLVER_HELP + "; the reference runs euler"),
    forecast: Optional[int] = typer.Option(None, help=FORECAST_HELP + "; the reference reuses"),
    plan: Optional[str] = typer.Option(None, help=PLAN_HELP + "; the reference runs the model's own trajectory"),
    stats: Optional[Path] = typer.Option(None, help="data statistics .npz (ADM-style mu/sigma or arr_0 images); "
                                                    "default for the digits model: the bundled digits_stats.npz"),
    max_fid_delta: Optional[float] = typer.Option(None, help="fail (exit 2) when the FID delta exceeds this"),
    min_precision_ratio: Optional[float] = typer.Option(None, help="fail (exit 2) when precision(engine) / "
                                                                   "precision(reference) is below this"),
    min_recall_ratio: Optional[float] = typer.Option(None, help="fail (exit 2) when recall(engine) / "
                                                                "recall(reference) is below this"),
    features: Optional[str] = typer.Option(None, help="digits | inception (default: digits for the digits model)"),
    inception_onnx: Optional[Path] = typer.Option(None, help="inception_fid.onnx from `ddt-export fid-inception`"),
    out: Path = typer.Option(Path("validation"), help="folder for report.json and side_by_side.png"),
    device_loop: bool = typer.Option(True, "--device-loop/--no-device-loop", help=DEVICE_LOOP_HELP),
):
    """Engines vs a reference from identical noise: latent error, per-tensor parity, FID and ADM's IS, sFID,
    precision, recall; gates on the FID delta and the precision/recall ratios."""
    from ..evaluate.suite import summary_lines
    from ..evaluate.validate import ValidateOptions, validate as run_validate
    from ..runtime.sampling.request import RequestInput

    options = ValidateOptions(reference=reference, stats=stats, features=features, inception_onnx=inception_onnx,
                              max_fid_delta=max_fid_delta, min_precision_ratio=min_precision_ratio,
                              min_recall_ratio=min_recall_ratio, out=out, device_loop=device_loop)
    bar, progress = step_progress("validating (sample-steps)")
    with bar:
        rep = run_validate(engines, RequestInput(num=num, seed=seed, schedule=schedule, solver=solver,
                                                 forecast=forecast, plan=plan), options, progress=progress, say=say)
    r, e = rep["reference"], rep["latent_rel_err"]
    print(f"{rep['num']} samples, schedule {rep['schedule']['spec']}: {rep['engines']['precision']} engines "
          f"({rep['engines']['loop']} loop) vs "
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
    if "skipped" not in rep["adm"]:
        for line in summary_lines(rep["adm"]):
            print(line)
    print(f"wrote {out / 'report.json'} and {out / 'side_by_side.png'}")


def bench(
    engines: Path = typer.Option(DEFAULT_ENGINES, help="engine folder (export or build output)"),
    batch: List[int] = typer.Option(list(DEFAULT_BATCHES), help="batch sizes in images (repeat the option)"),
    steps: Optional[int] = typer.Option(None, help="sampling steps (default: the manifest's)"),
    schedule: List[str] = typer.Option(list(DEFAULT_SCHEDULES), help="encoder schedules (repeat); `all` always runs"),
    repeats: int = typer.Option(DEFAULT_REPEATS, help="timed repeats per measurement (after one warm-up)"),
    torch_baseline: bool = typer.Option(True, help="also time the PyTorch reference (needs the [export] extra)"),
    cond_only: bool = typer.Option(True, help="skip the unconditional half outside the guidance interval"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all numbers as JSON"),
    plot: Optional[Path] = typer.Option(None, help="PNG of images/s against batch size and schedule"),
    device_loop: bool = typer.Option(True, "--device-loop/--no-device-loop",
                                     help="on a TensorRT folder, time the device loop beside the host loop (default)"),
    solver: Optional[str] = typer.Option(None, help=SOLVER_HELP),
    forecast: Optional[int] = typer.Option(None, help=FORECAST_HELP),
    plan: Optional[str] = typer.Option(None, help=PLAN_HELP + "; timed against the model's own trajectory"),
):
    """Per-stage latency, images/s per batch and schedule, sharing speed-up measured vs predicted, vs PyTorch."""
    from rich.table import Table

    from ..evaluate.bench import BenchOptions, bench as run_bench, write_outputs

    res = run_bench(engines, BenchOptions(batches=batch, steps=steps, schedules=schedule, repeats=repeats,
                                          torch_variants=None if torch_baseline else (), cond_only=(cond_only,),
                                          device_loop=device_loop, solver=solver, forecast=forecast, plan=plan),
                    say=say)
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


def _csv(text: Optional[str], flag: str, kind, what: str) -> tuple:
    """A comma-separated flag value as a tuple of `kind` (None: empty, the default)."""
    from ..core.errors import InputError

    if text is None:
        return ()
    try:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(flag, f"comma-separated {what}", text)


def tune(
    engines: Path = typer.Option(DEFAULT_ENGINES, help="engine folder to tune; the plans go into its plans/"),
    max_fid_delta: float = typer.Option(..., help="the budget: |FID(plan) - FID(reference)| at most this "
                                                  "(mean over seeds); the cheapest plan within is `fast`"),
    max_recall_delta: float = typer.Option(TUNE_RECALL_DELTA, help="... and |recall(plan) - recall(reference)| "
                                                                   "at most this"),
    num: int = typer.Option(TUNE_NUM, help="FID samples per seed for each confirmed candidate (and the reference)"),
    seed: List[int] = typer.Option([0], help=SEED_HELP + "; repeat for more seeds (the probe uses the first)"),
    probe: int = typer.Option(TUNE_PROBE, help="samples of the cheap trajectory-error stage"),
    confirm: int = typer.Option(TUNE_CONFIRM, help="candidates confirmed with FID, at most"),
    solvers: Optional[str] = typer.Option(None, help="comma-separated: euler,adams:2,adams:3,adams:4 (default)"),
    steps: Optional[str] = typer.Option(None, help="comma-separated step counts (default: 1/8..1/2 of the "
                                                   "reference's)"),
    timeshifts: Optional[str] = typer.Option(None, help="comma-separated timeshifts (default 1,1.5)"),
    rates: Optional[str] = typer.Option(None, help="comma-separated R of uniform:R schedules (default 2,3)"),
    dp_fractions: Optional[str] = typer.Option(None, help="comma-separated fractions f of dp:K schedules, K = f x "
                                                          "steps (default 0.5,0.333,0.25)"),
    forecasts: Optional[str] = typer.Option(None, help="comma-separated forecast orders (default 0,1,2)"),
    interval: List[str] = typer.Option([], help="LO,HI: a guidance interval to try besides the reference's "
                                                "(repeat; default: the reference's with LO + 0.1)"),
    features: Optional[str] = typer.Option(None, help="digits | inception (default: digits for the digits model)"),
    inception_onnx: Optional[Path] = typer.Option(None, help="inception_fid.onnx from `ddt-export fid-inception`"),
    stats: Optional[Path] = typer.Option(None, help="data .npz (arr_0 images for precision/recall; default for the "
                                                    "digits model: the bundled digits_stats.npz)"),
):
    """Search solver x steps x timeshift x encoder schedule x forecast x guidance interval against the model's
    reference trajectory (same noise and seeds for every candidate); write the frontier of |dFID| against
    network GFLOP per image into ENGINES/plans/ (+ frontier.png), the cheapest plan within the budget as `fast`."""
    from ..evaluate.tune import tune as run_tune
    from ..evaluate.tune_space import SearchSpace, TuneOptions

    defaults = SearchSpace()
    space = SearchSpace(
        solvers=_csv(solvers, "--solvers", str, "solvers") or defaults.solvers,
        steps=_csv(steps, "--steps", int, "integers"),
        timeshifts=_csv(timeshifts, "--timeshifts", float, "numbers") or defaults.timeshifts,
        rates=_csv(rates, "--rates", int, "integers") if rates is not None else defaults.rates,
        dp_fractions=_csv(dp_fractions, "--dp-fractions", float, "numbers") if dp_fractions is not None
        else defaults.dp_fractions,
        forecasts=_csv(forecasts, "--forecasts", int, "integers") or defaults.forecasts,
        intervals=tuple(_csv(iv, "--interval", float, "LO,HI numbers") for iv in interval) or None)
    options = TuneOptions(max_fid_delta=max_fid_delta, max_recall_delta=max_recall_delta, num=num, seeds=tuple(seed),
                          probe=probe, confirm=confirm, space=space, features=features,
                          inception_onnx=inception_onnx, stats=stats)
    bar, progress = image_progress("tuning", "sample-steps")
    with bar:
        res = run_tune(engines, options, progress=progress, say=say)
    rec = res.record
    print(f"{len(rec['candidates']) - 1} candidates probed, {len(rec['confirmed']) - 1} confirmed with FID "
          f"({rec['protocol']['samples']} samples x {len(rec['protocol']['seeds'])} seeds)")
    for c in rec["confirmed"]:
        mark = " <- fast" if c.get("plan") == "fast" else (" (frontier)" if c["frontier"] else "")
        print(f"{c['name']:<36} {c['gflop']:8.3f} GFLOP  {rec['confirmed'][0]['gflop'] / c['gflop']:5.2f}x  "
              f"dFID {c['dfid']:+.4f}  d precision {c['dprecision']:+.4f}  d recall {c['drecall']:+.4f}{mark}")
    print(f"fast = {res.fast}; wrote {', '.join(str(p) for p in res.plans.values())}")
