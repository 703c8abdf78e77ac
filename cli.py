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

# --------------------------------------------------------------------------------------- calibrate / build

# --------------------------------------------------------------------------------------- fid / validate

# --------------------------------------------------------------------------------------- bench


if __name__ == "__main__":
    main()
