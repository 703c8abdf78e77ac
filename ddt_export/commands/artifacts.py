"""Commands that make artifacts: convert, export, calibrate, build."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..builder.calibrate import DEFAULT_NUM as CALIBRATION_NUM
from ..builder.engine import DEFAULT_HIGH_PRECISION, DEFAULT_OPT_LEVEL
from ..builder.recipes import DEFAULT_RECIPE, PRESETS as FP8_RECIPES
from ..core.precision import NAMES as PRECISIONS
from ..core.specs import BatchProfile
from ..runtime.graphs.backends import CHOICES as BACKENDS
from .common import FORECAST_HELP, SEED_HELP, SOLVER_HELP, say, step_progress

WEIGHTS_HELP = "ema | raw: which weights of a Lightning checkpoint"
TRUST_HELP = "allow pickle code in the checkpoint (executes it!)"
CONFIG_HELP = "preset name, official DDT YAML, or config JSON"


def convert(
    ckpt: Path = typer.Option(..., help="official Lightning .ckpt, a plain state dict (.pt/.pth) or .safetensors"),
    config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
    out: Path = typer.Option(..., help="output .safetensors; the config JSON is written beside it"),
    weights: str = typer.Option("ema", help=WEIGHTS_HELP),
    trust_checkpoint: bool = typer.Option(False, help=TRUST_HELP),
):
    """Convert a checkpoint to safetensors + config JSON."""
    from ..core.config import load_config
    from ..export.checkpoint import convert_checkpoint

    st, js = convert_checkpoint(ckpt, load_config(config), out, weights=weights, trust=trust_checkpoint)
    print(f"wrote {st} and {js}")


CKPT_HELP = "checkpoint file or hf://OWNER/REPO[/PATH][@REVISION]; default: the bundled model's weights"
VAE_HELP = "diffusers AutoencoderKL: a local folder or hf://OWNER/REPO[/SUBFOLDER][@REVISION] (latent models)"


def export(
    ckpt: Optional[str] = typer.Option(None, help=CKPT_HELP),
    config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
    out: Path = typer.Option(Path("engines/fp32"), help="output folder"),
    weights: str = typer.Option("ema", help=WEIGHTS_HELP),
    vae: Optional[str] = typer.Option(None, help=VAE_HELP),
    random_weights: bool = typer.Option(False, help="random weights (shape checks, benchmarks); no --ckpt"),
    trust_checkpoint: bool = typer.Option(False, help=TRUST_HELP),
    force: bool = typer.Option(False, help="overwrite a folder holding another model's artifacts"),
):
    """Export encoder.onnx (x,t,y -> s), decoder.onnx (x,s -> v) and vae_decoder.onnx, checked against PyTorch."""
    from ..export.exporter import ExportOptions, export_checkpoint

    man = export_checkpoint(ckpt, config, out, weights="random" if random_weights else weights, trust=trust_checkpoint,
                            options=ExportOptions(vae_dir=vae, force=force))
    for name, g in man.graphs.items():
        print(f"{name}: {out / g.file}  max rel err vs PyTorch {g.parity['vs_pytorch']['max_rel_err']:.2e}")
    print(f"wrote {out / 'manifest.json'}")


def calibrate(
    engines: Path = typer.Option(Path("engines/fp32"), help="fp32 export folder (`ddt-export export`)"),
    num: int = typer.Option(CALIBRATION_NUM, help="images per trajectory batch (the CFG batch is twice this)"),
    seed: int = typer.Option(0, help=SEED_HELP),
    schedule: Optional[str] = typer.Option(None, help="the schedule that will run: all | uniform:R | dp:K | FILE.json"),
    classes: Optional[Path] = typer.Option(None, help="file of class ids (text or 1-D .npy), cycled to --num"),
    steps: Optional[int] = typer.Option(None, help="sampling steps (default: the manifest's sampler)"),
    solver: Optional[str] = typer.Option(None, help=SOLVER_HELP + " (the solver that will run)"),
    forecast: Optional[int] = typer.Option(None, help=FORECAST_HELP),
    out: Optional[Path] = typer.Option(None, help="output folder (default: calibration/<config name>)"),
):
    """Capture encoder/decoder inputs of real trajectories on fp32 graphs (every step, full CFG batch)."""
    import dataclasses

    from ..builder.calibrate import capture, read_classes
    from ..core.errors import ArtifactError
    from ..runtime.sampling.request import CLI, RequestInput

    if not Path(engines).is_dir():  # the fresh set-up builds fp16 only: say how to make the fp32 graphs
        raise ArtifactError("--engines", "an fp32 export folder (calibration runs the fp32 graphs)",
                            f"{engines} does not exist", f"make it first: ddt-export export --out {engines}")

    given = RequestInput(classes=tuple(read_classes(classes)) if classes else None, num=num, seed=seed, steps=steps,
                         schedule=schedule, solver=solver, forecast=forecast)
    bar, progress = step_progress("calibration trajectories")
    with bar:
        out, rec = capture(engines, out, given, names=dataclasses.replace(CLI, classes="--classes"),
                           progress=progress, say=say)
    for name, g in rec["graphs"].items():
        print(f"{name}: {g['rows_stored']} of {g['rows_captured']} rows -> {out / g['file']}")
    print(f"wrote {out / 'manifest.json'} ({rec['provenance']['sampler']['num_steps']} steps, "
          f"schedule {rec['schedule']['spec']})")


def build(
    precision: str = typer.Option(..., help=" | ".join(PRECISIONS)),
    ckpt: Optional[str] = typer.Option(None, help=CKPT_HELP),
    config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
    out: Optional[Path] = typer.Option(None, help="engine folder (default: engines/<precision>, and engines/default "
                                                  "is pointed at it)"),
    batch: str = typer.Option(str(BatchProfile()), help="engine batch range MIN:OPT:MAX (CFG rows: 2 per image)"),
    timing_cache: Optional[Path] = typer.Option(None, help="TensorRT timing cache file (read and updated)"),
    force: bool = typer.Option(False, help="rebuild a folder built from something else"),
    vae: Optional[str] = typer.Option(None, help=VAE_HELP),
    high_precision: str = typer.Option(DEFAULT_HIGH_PRECISION, help="fp8 only: fp16 | bf16 for everything not in FP8"),
    calibration: Optional[Path] = typer.Option(None, help="fp8 only: calibration folder (default: captured into OUT)"),
    fp8_recipe: Optional[str] = typer.Option(None, help=f"fp8 only: which block GEMMs get FP8, a recipe name "
                                             f"({' | '.join(FP8_RECIPES)}) or a recipe .json file (default "
                                             f"{DEFAULT_RECIPE}; docs/fp8.md)"),
    weights: str = typer.Option("ema", help=WEIGHTS_HELP),
    opt_level: int = typer.Option(DEFAULT_OPT_LEVEL, help="TensorRT builder optimization level 0-5"),
    backend: str = typer.Option("auto", help=" | ".join(BACKENDS) + " (auto: TensorRT if usable)"),
    trust_checkpoint: bool = typer.Option(False, help=TRUST_HELP),
):
    """Export, quantize (fp8) and build the engines of one precision; without TensorRT, an ONNX Runtime folder."""
    from ..builder.engine import BuildOptions, build as run_build

    options = BuildOptions(ckpt=ckpt, config=config, batch=BatchProfile.parse(batch), vae=vae, weights=weights,
                           trust=trust_checkpoint, backend=backend, high_precision=high_precision,
                           calibration=calibration, fp8_recipe=fp8_recipe, opt_level=opt_level,
                           timing_cache=timing_cache, force=force)
    bar, progress = step_progress("calibration steps")  # shown while fp8 captures its calibration
    with bar:
        res = run_build(precision, options, out=out, say=say, progress=progress)
    for name, g in res.manifest.graphs.items():
        shown = ", ".join(f"{k} {v['max_rel_err']:.2e}" if "max_rel_err" in v else f"{k}: {next(iter(v.values()))}"
                          for k, v in g.parity.items())
        print(f"{name}: {res.folder / g.file}" + (f"  max rel err [{shown}]" if shown else ""))
        if "quantization" in g.info:
            q = g.info["quantization"]["fp8_gemms"]
            print(f"  FP8 block GEMMs: {q['block_fp8']}/{q['block_gemms']}")
    share = next((g.info["quantization"] for g in res.manifest.graphs.values() if "quantization" in g.info), None)
    if share is not None and "recipe_share" in share:
        r = share["recipe_share"]
        print(f"FP8 recipe {share['recipe']['name']}: {r['of_block_gemm_flops']:.1%} of the block GEMM FLOPs "
              f"({r['of_step_flops']:.1%} of a step's), predicted speed-up {r['predicted_speedup']:.2f}x at FP8 = "
              f"{r['fp8_rate']:g}x fp16")
    print(f"{'reused' if res.reused else 'built'} {res.folder} ({precision}, backend {res.backend})")
