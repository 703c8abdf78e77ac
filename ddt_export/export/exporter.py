"""Export: DDT -> encoder.onnx (x, t, y -> s) and decoder.onnx (x, s -> v) (+ vae_decoder.onnx), checked.

One artifact folder (`core.artifacts.artifact_folder`): each graph is exported into the scratch folder,
checked (`graphs.check_graph`, and onnxruntime parity against PyTorch where onnxruntime CPU runs the precision;
otherwise the reason and PyTorch's own cast error are recorded), installed; the manifest, with every parity
record collected in memory and the provenance the caller asked for, is written once, last.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ExportOptions:
    """How an export is made besides its model and folder."""

    precision: str = "fp32"  # fp32 | fp16 | bf16 (fp8 graphs are made by `build`)
    batch: BatchProfile | None = None  # None: BatchProfile()
    vae_dir: Path | FolderRef | None = None  # a diffusers AutoencoderKL folder (latent models)
    build_options: dict | None = None  # build settings recorded in the provenance (what a build was asked with)
    force: bool = False  # write over a folder holding another model's artifacts
    check: bool = True  # parity against PyTorch (or PyTorch's own cast error where onnxruntime cannot run it)


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


def export_model(model: DDT, cfg: Config, out: Path, weights: WeightsRef, options: ExportOptions = ExportOptions(),
                 *, progress=None) -> Manifest:
    """Export `model` (fp32 reference weights, identified by `weights`) as `options.precision` graphs into `out`;
    the manifest last."""
    from .vae import export_vae

    precision, vae_dir, check = options.precision, options.vae_dir, options.check
    p = precision_row(precision)
    if p.quantized:
        raise ConfigError("export precision", "an exported precision (fp32 | fp16 | bf16)", precision,
                          f"{precision} graphs are made by `ddt-export build --precision {precision}`")
    out = Path(out)
    prov = provenance_for(cfg, weights, precision, options.batch or BatchProfile(), vae_dir, options.build_options)
    dims = Dims.of(cfg.model)
    reference = model.float().eval()
    exported = copy.deepcopy(reference).to(torch_dtype(p))
    cast = torch_cast_errors(reference, cfg, dims, p) if check and not p.ort_cpu else {}
    graphs, notes = {}, []
    with artifact_folder(out, refuse=refuse_foreign(prov, options.force)) as staging:
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


def export_checkpoint(ckpt, config, out: Path, *, weights: str = "ema", trust: bool = False,
                      options: ExportOptions = ExportOptions(), progress=None) -> Manifest:
    """`ddt-export export`: a checkpoint (or, with weights "random", seeded random weights) -> `out`."""
    cfg = load_config(config)
    # a local VAE folder, or hf://... resolved before the minutes of loading
    options = dataclasses.replace(options, vae_dir=vae_folder(options.vae_dir))
    model, ref = load_checkpoint_model(ckpt, cfg, weights if weights != "random" else "ema", trust,
                                       random_weights=weights == "random")
    return export_model(model, cfg, Path(out), ref, options, progress=progress)
