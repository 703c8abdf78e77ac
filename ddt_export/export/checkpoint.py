"""Checkpoints: official Lightning .ckpt, plain state dicts, .safetensors -> a strictly checked DDT.

Official Lightning checkpoints hold `state_dict` with `denoiser.*`, `ema_denoiser.*` and `diffusion_trainer.*`
keys (see the official LightningModel.state_dict); a torch.compile'd denoiser adds `_orig_mod.`.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from ..core.artifacts import atomic_path, write_json
from ..core.config import Config, ModelConfig, bundled_weights  # noqa: F401 (bundled_weights: re-exported)
from ..core.errors import CheckpointError
from .model import DDT

PREFIXES = {"ema": "ema_denoiser.", "raw": "denoiser."}  # keys: core.provenance.WEIGHT_KINDS


def _torch_load(path: Path, trust: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(Unsupported global: [^\n]*|Unsupported operand [^\n]*)", str(e))
        raise CheckpointError(
            f"checkpoint {path}", "tensors only (torch.load weights_only=True)",
            found.group(1) if found else str(e).splitlines()[0],
            "--trust-checkpoint loads it anyway and EXECUTES the pickle code in it: only for files you trust")
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}", "a readable PyTorch file",
                              f"{type(e).__name__}: {e}".splitlines()[0])


def read_state_dict(path: Path, weights: str = "ema", trust: bool = False) -> dict[str, torch.Tensor]:
    """The denoiser's state dict from any supported file. `weights` picks EMA or raw in Lightning checkpoints."""
    path = Path(path)
    if weights not in PREFIXES:
        raise CheckpointError("--weights", "ema | raw", weights)
    if not path.is_file():
        raise CheckpointError("checkpoint", "an existing file", str(path))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint {path}", "a valid .safetensors file", str(e))
    else:
        obj = _torch_load(path, trust)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # Lightning
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"checkpoint {path}", "a state dict of tensors (or Lightning's state_dict)",
                                  type(obj).__name__)
        sd = obj
    prefix = PREFIXES[weights]
    if any(k.startswith(("ema_denoiser.", "denoiser.")) for k in sd):
        picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not picked:
            raise CheckpointError(f"checkpoint {path}", f"keys starting with '{prefix}' (--weights {weights})",
                                  "none", "try the other --weights")
        sd = picked
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def check_state_dict(expected: dict, sd: dict, where: str, want: str, *, optional: set[str] = frozenset(),
                     hint: str = "") -> None:
    """The one strict state-dict check: every expected key present with its shape, nothing extra (keys in
    `optional` may be missing); one CheckpointError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(sd) - set(optional))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(set(sd) & set(expected))
              if tuple(getattr(sd[k], "shape", ())) != tuple(expected[k].shape)]
    parts = [f"{len(items)} {label}: " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")
             for label, items in (("missing", missing), ("unexpected", unexpected),
                                  ("shape (file vs model)", shapes)) if items]
    if parts:
        raise CheckpointError(where, want, "; ".join(parts), hint)


def load_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], where: str = "checkpoint") -> DDT:
    """Build a DDT for `cfg` and copy `sd` into it after checking every key and shape; fp32, eval mode."""
    model = DDT(cfg)
    own = model.state_dict()
    check_state_dict(own, sd, f"{where} against the config", f"{len(own)} matching keys",
                     hint="is --config the model this checkpoint was trained as?")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()


def convert_checkpoint(ckpt: Path, cfg: Config, out: Path, weights: str = "ema", trust: bool = False):
    """Write `out` (.safetensors, fp32) and the config JSON beside it. Returns both paths."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError("--out", "a .safetensors path", str(out))
    model = load_model(cfg.model, read_state_dict(ckpt, weights, trust), str(ckpt))
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    js = out.with_suffix(".json")
    write_json(js, cfg.to_dict())
    return out, js
