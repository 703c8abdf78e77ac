"""Commands that sample: generate, schedule."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ..runtime.graphs.backends import CHOICES as BACKENDS
from ..runtime.graphs.engines import DEFAULT_ENGINES
from ..runtime.sampling.grammar import SCHEDULE_KINDS
from ..runtime.sampling.request import RequestInput
from ..runtime.sampling.schedules import TEMPLATE_SAMPLES, TEMPLATE_SEED
from .common import (DEVICE_LOOP_HELP, FORECAST_HELP, PLAN_HELP, SEED_HELP, SOLVER_HELP, image_progress, say,
                     step_progress)

SCHEDULE_HELP = "encoder schedule: " + " | ".join(SCHEDULE_KINDS)



def generate(
    engines: Path = typer.Option(DEFAULT_ENGINES, help="engine folder written by `export` or `build`"),
    class_: Optional[List[str]] = typer.Option(None, "--class", help="class id in ASCII digits as written by str(id) "
                                               "(3, not 03); repeat for several (cycled to --num)"),
    labels: Optional[Path] = typer.Option(None, help="class ids as a 1-D integer .npy (instead of --class)"),
    num: Optional[int] = typer.Option(None, help="number of images (default: the classes given, or 8)"),
    seed: int = typer.Option(0, help=SEED_HELP),
    steps: Optional[int] = typer.Option(None, help="sampling steps (default: the manifest's sampler)"),
    cfg: Optional[float] = typer.Option(None, help="CFG scale inside the guidance interval (default: manifest)"),
    schedule: Optional[str] = typer.Option(None, help=SCHEDULE_HELP),
    interval: Optional[Tuple[float, float]] = typer.Option(None, help="guidance interval LO HI: CFG where LO < t < HI "
                                                           "(default: the manifest's)"),
    timeshift: Optional[float] = typer.Option(None, help="timestep shift (default: the manifest's)"),
    solver: Optional[str] = typer.Option(None, help=SOLVER_HELP),
    forecast: Optional[int] = typer.Option(None, help=FORECAST_HELP),
    plan: Optional[str] = typer.Option(None, help=PLAN_HELP),
    noise: Optional[Path] = typer.Option(None, help="initial noise (B, C, H, W) .npy, for exact reproduction"),
    latents_out: Optional[Path] = typer.Option(None, help="write the final latents (before the VAE) as .npy"),
    out: str = typer.Option("samples", help="run folder: PNGs, samples.npz, preview/grid.png, run.json (a new or "
                                          "empty folder, or an earlier run's)"),
    format_: str = typer.Option("png", "--format", help="png (one file per sample) | npz (ADM-style samples.npz: "
                                                       "arr_0 uint8 NHWC, arr_1 labels) | png,npz"),
    resume: bool = typer.Option(False, help="keep the finished chunks of the run in --out (same settings), "
                                            "sample the rest"),
    chunk: Optional[int] = typer.Option(None, help="images per chunk (default and most: batch.max // 2)"),
    backend: str = typer.Option("auto", help=" | ".join(BACKENDS)),
    ray: bool = typer.Option(False, "--ray", help="shard the chunks over a Ray actor pool (the [ray] extra)"),
    ray_address: Optional[str] = typer.Option(None, help="with --ray: cluster address (auto: `ray start`'s); "
                                                         "default: a new local cluster"),
    workers: Optional[int] = typer.Option(None, help="with --ray: actors, one engine copy each (default: the "
                                                     "cluster's GPUs, else its nodes)"),
    device_loop: bool = typer.Option(True, "--device-loop/--no-device-loop", help=DEVICE_LOOP_HELP),
):
    """Sample images with the engines: streamed in chunks, resumable, torch-free; optionally on a Ray cluster."""
    from ..runtime.generate.generate import RunOptions
    from ..runtime.generate.generate import generate as run_generate
    from ..scale import executor_for

    given = RequestInput(classes=tuple(class_) if class_ else None, labels_file=labels, num=num, seed=seed,
                         steps=steps, cfg=cfg, schedule=schedule, interval=interval, timeshift=timeshift,
                         solver=solver, forecast=forecast, plan=plan)
    options = RunOptions(out_dir=out, formats=format_, resume=resume, chunk=chunk, latents_out=latents_out,
                         noise_file=noise, backend=backend, device_loop=device_loop)
    executor = executor_for(ray, ray_address, workers, say)
    bar, progress = image_progress("sampling")
    seen = [0, 0]  # (done, total) as last reported: what an interrupt has written

    def count(done: int, total: int) -> None:
        seen[:] = done, total
        progress(done, total)

    t0 = time.perf_counter()
    try:
        with bar:
            res = run_generate(engines, given, options, executor=executor, progress=count, say=say)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_message(out, *seen, resume)) from None
    report(res, time.perf_counter() - t0)


def interrupted_message(out: str, done: int, total: int, resumed: bool) -> str:
    """What Ctrl-C left in the run folder, and how to go on."""
    if total == 0:
        return f"stopped before the first chunk finished: {out} holds no new samples"
    again = "the same command" + ("" if resumed else " with --resume")
    return (f"{done} of {total} samples are in {out} (whole chunks; nothing half-written under a final name); "
            f"{again} samples the other {total - done}")


def report(res, seconds: float) -> None:
    """The lines a finished run prints on stdout."""
    if res.was_complete:
        print(f"nothing to sample: the run is complete ({res.num} samples, all files there)")
        for kind, path in res.files.items():
            print(f"kept {path}" + (f" ({res.num} PNGs)" if kind == "png" else ""))
        return
    r, n = res.rows, res.sampler.num_steps
    how = (f"plan {res.request.plan}, " if res.request.plan else "") + f"{res.sampler.solver}" + (
        f", forecast {res.sampler.forecast}" if res.sampler.forecast else "")
    print(f"{res.num} samples, {n} steps ({how}), cfg {res.sampler.guidance}, schedule {res.schedule_spec}: "
          f"encoder {r['encoder_calls']}/{n} steps, backend {res.backend} ({res.loop} loop), {seconds:.1f} s")
    print(f"cond-only outside the guidance interval: encoder rows {r['encoder_rows']}/{r['encoder_rows_full']}, "
          f"decoder rows {r['decoder_rows']}/{r['decoder_rows_full']}, {100 * res.saved:.1f}% of the work saved")
    of_run = f" of the run's {res.chunks}" if res.chunks_run != res.chunks else ""
    print(f"sampled {res.new} in {res.chunks_run}{of_run} chunks of {res.chunk}, {res.seconds:.1f} s, "
          f"{res.images_per_s:.2f} images/s" + (f"; {res.resumed} were already there" if res.resumed else ""))
    for kind, path in res.files.items():
        print(f"wrote {path}" + (f" ({res.num} PNGs)" if kind == "png" else ""))


def schedule(
    engines: Optional[Path] = typer.Option(None, help="engine folder: run the template trajectory on it"),
    steps: Optional[int] = typer.Option(None, help="sampling steps N (default: the manifest's sampler)"),
    recompute: int = typer.Option(..., help="K: number of steps on which the encoder runs"),
    cfg: Optional[float] = typer.Option(None, help="CFG scale of the template trajectory (default: manifest)"),
    solver: Optional[str] = typer.Option(None, help=SOLVER_HELP + " (the template trajectory's)"),
    forecast: Optional[int] = typer.Option(None, help=FORECAST_HELP + " (the template trajectory's)"),
    dp_error: Optional[str] = typer.Option(None, help="reuse | forecast: the error the DP minimizes (default reuse, "
                                                      "the measured choice also under forecasting: docs/sampling.md)"),
    seed: int = typer.Option(TEMPLATE_SEED, help=f"template seed ({TEMPLATE_SAMPLES} samples)"),
    from_similarity: Optional[Path] = typer.Option(None, help="solve from a saved similarity-N.npy instead"),
    out: Optional[Path] = typer.Option(None, help="with --from-similarity: the schedule JSON to write"),
):
    """Choose the encoder's recompute steps with the statistical DP; store them with the engines."""
    from ..runtime.sampling.schedules import make_schedule

    bar, progress = step_progress("template trajectory")
    with bar:
        rec, paths = make_schedule(recompute, engines_dir=engines, from_similarity=from_similarity, out=out,
                                   given=RequestInput(steps=steps, cfg=cfg, solver=solver, forecast=forecast),
                                   seed=seed, progress=progress, method=dp_error)
    print(f"recompute steps ({len(rec['recompute_steps'])} of {rec['num_steps']}): {rec['recompute_steps']}")
    if "uniform" in rec:
        u = rec["uniform"]
        what = "forecast error" if rec["method"] == "dp-forecast1" else "cumulative error"
        print(f"{what}: dp {rec['cost']:.4g}, uniform:{u['rate']} ({u['recompute']} steps) {u['cost']:.4g}")
    for p in paths.values():
        print(f"wrote {p}")
