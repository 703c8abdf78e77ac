"""Export: DDT -> encoder.onnx (x, t, y -> s) and decoder.onnx (x, s -> v) (+ vae_decoder.onnx), checked.

One artifact folder (`core.artifacts.artifact_folder`): each graph is exported into the scratch folder,
checked (`graphs.check_graph`, and onnxruntime parity against PyTorch where onnxruntime CPU runs the precision;
otherwise the reason and PyTorch's own cast error are recorded), installed; the manifest, with every parity
record collected in memory and the provenance the caller asked for, is written once, last.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ..core.artifacts import artifact_folder
from ..core.config import Config, load_config
from ..core.errors import CheckpointError, ConfigError, NumericsError
from ..core.manifest import GraphRecord, Manifest, refuse_foreign
from ..core.numerics import tensor_errors
from ..core.precision import Precision, precision as precision_row
from ..core.provenance import FolderRef, Source, WeightsRef, provenance_for
from ..core.specs import DECODER, ENCODER, BatchProfile, Dims
from .checkpoint import bundled_weights, load_model, read_state_dict
from .hub import checkpoint_source, vae_folder
from .graphs import check_graph, export_graph, not_run, parity, torch_dtype
from .model import DDT, DecoderGraph, EncoderGraph

NO_VAE_NOTE = "vae_decoder not exported: no --vae folder given; generate writes latents only"


def torch_cast_errors(model: DDT, cfg: Config, dims: Dims, p: Precision, batch: int = 3,
                      seed: int = 1234) -> dict[str, dict]:
    """PyTorch's own error for a precision onnxruntime CPU cannot run (bf16): the same model cast to its dtype
    against fp32, on random inputs; NumericsError past the precision's tolerance."""
    rng = np.random.default_rng(seed)
    low = copy.deepcopy(model).to(torch_dtype(p))
    errs, bad = {}, []
    for spec, wrap in ((ENCODER, EncoderGraph), (DECODER, DecoderGraph)):
        feeds = [torch.from_numpy(v) for v in spec.dummy_inputs(dims, batch, rng, cfg.model.num_classes).values()]
        with torch.no_grad():
            ref, got = wrap(model.float())(*feeds).double(), wrap(low)(*feeds).double()
        err = tensor_errors(got.numpy(), ref.numpy())[0]
        errs[spec.name] = {"max_rel_err": err, "tolerance": p.tol(spec.name),
                           "reference": f"PyTorch CPU, the same model cast to {p.name}, vs fp32, random inputs"}
        if not err <= p.tol(spec.name):
            bad.append(f"{spec.name}: {err:.3e}")
    if bad:
        raise NumericsError(f"{p.name} model (PyTorch CPU) vs fp32", f"max rel err <= {p.tol('encoder')}",
                            "; ".join(bad))
    return errs


def export_model(model: DDT, cfg: Config, out: Path, *, weights: WeightsRef, precision: str = "fp32",
                 batch: BatchProfile | None = None, vae_dir: Path | FolderRef | None = None,
                 options: dict | None = None, force: bool = False, check: bool = True, progress=None) -> Manifest:
    """Export `model` (fp32 reference weights) as `precision` graphs into `out`; the manifest last.

    `options`: build settings recorded in the provenance (what a build folder was asked with)."""
    from .vae import export_vae

    p = precision_row(precision)
    if p.quantized:
        raise ConfigError("export precision", "an exported precision (fp32 | fp16 | bf16)", precision,
                          f"{precision} graphs are made by `ddt-export build --precision {precision}`")
    out = Path(out)
    prov = provenance_for(cfg, weights, precision, batch or BatchProfile(), vae_dir, options)
    dims = Dims.of(cfg.model)
    reference = model.float().eval()
    exported = copy.deepcopy(reference).to(torch_dtype(p))
    cast = torch_cast_errors(reference, cfg, dims, p) if check and not p.ort_cpu else {}
    graphs, notes = {}, []
    with artifact_folder(out, refuse=refuse_foreign(prov, force)) as staging:
        for spec, wrap in ((ENCODER, EncoderGraph), (DECODER, DecoderGraph)):
            if progress:
                progress(f"exporting {spec.file}")
            path = staging.path(spec.file)
            export_graph(wrap(exported).eval(), spec, dims, path)
            check_graph(path)
            checks = {}
            if check and p.ort_cpu:
                if progress:
                    progress(f"checking {spec.file} against PyTorch")
                checks["vs_pytorch"] = parity(path, spec, wrap(reference), dims, p, cfg.model.num_classes)
            elif not p.ort_cpu:  # record why onnxruntime cannot run it, and PyTorch's own cast error
                checks = {"onnxruntime": not_run(path), **({f"torch_{p.name}": cast[spec.name]} if cast else {})}
            graphs[spec.name] = GraphRecord(spec.file, staging.install(spec.file), checks)
        if cfg.model.latent_scale is not None:
            if vae_dir is not None:
                graphs["vae_decoder"], dims = export_vae(vae_dir, cfg, staging, p, check, progress)
            else:
                notes.append(NO_VAE_NOTE)
        staging.record = Manifest(name=cfg.name, provenance=prov, dims=dims, source=weights.source, graphs=graphs,
                                  notes=notes)
    return staging.record


def load_checkpoint_model(ckpt: Path | None, cfg: Config, weights: str = "ema", trust: bool = False,
                          random_weights: bool = False, seed: int = 0) -> tuple[DDT, WeightsRef]:
    """The fp32 reference model and its `WeightsRef` (sha256, ema/raw/random, source) for the manifest."""
    if random_weights:
        if ckpt is not None:
            raise CheckpointError("--random-weights", "no --ckpt", str(ckpt))
        torch.manual_seed(seed)
        model = DDT(cfg.model).eval()
        return model, random_weights_ref(seed)
    if ckpt is None:
        ckpt = bundled_weights(cfg)
        if ckpt is None:
            raise CheckpointError("--ckpt", f"a checkpoint (config {cfg.name} has no bundled weights)", "none")
    path, sha, source = checkpoint_source(ckpt)  # a local file or hf://... (fetched into the Hub cache)
    model = load_model(cfg.model, read_state_dict(path, weights, trust), str(ckpt))
    return model, WeightsRef(sha, weights, source)


def random_weights_ref(seed: int) -> WeightsRef:
    return WeightsRef(f"random-seed-{seed}", "random", Source(seed=seed))


def export_checkpoint(ckpt, config, out, *, weights="ema", vae_dir=None, random_weights=False, trust=False,
                      force=False, precision="fp32", progress=None) -> Manifest:
    cfg = load_config(config)
    vae_dir = vae_folder(vae_dir)  # a local folder, or hf://... resolved before the minutes of loading
    model, ref = load_checkpoint_model(ckpt, cfg, weights, trust, random_weights)
    return export_model(model, cfg, Path(out), weights=ref, precision=precision, vae_dir=vae_dir, force=force,
                        progress=progress)
