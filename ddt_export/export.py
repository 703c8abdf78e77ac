"""Export: DDT -> encoder.onnx (x, t, y -> s) and decoder.onnx (x, s -> v) (+ vae_decoder.onnx), checked.

Each graph is exported into a scratch folder inside the target, checked (onnx.checker, shape inference, no
Col2Im / complex ops, onnxruntime parity against PyTorch at two batch sizes), then renamed into place; the
manifest is written last. Names, dynamic axes, dummy inputs and tolerances all come from `specs`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import bundled_weights, load_model, read_state_dict
from .config import Config, load_config
from .errors import ArtifactError, CheckpointError, NumericsError
from .manifest import MANIFEST, Manifest, atomic_dir, check_target_folder, sha256_file
from .model import DDT, DecoderGraph, EncoderGraph
from .precision import tensor_errors
from .specs import BATCH, DECODER, ENCODER, BatchProfile, GraphSpec, model_dims

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weights than this keep them in <name>.onnx.data (2 GB protobuf cap)
PARITY_BATCHES = (1, 3)
FORBIDDEN_OPS = {"Col2Im", "DFT", "STFT"}  # TensorRT lacks Col2Im; complex math must not leak into the graph
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

log = logging.getLogger(__name__)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_graph(module: torch.nn.Module, spec: GraphSpec, dims: dict[str, int], path: Path) -> None:
    """torch.onnx (dynamo) export of one graph to `path`, I/O from `spec`, dynamic batch."""
    example = tuple(torch.from_numpy(a) for a in spec.dummy_inputs(dims, 2, np.random.default_rng(0), 1).values())
    batch = torch.export.Dim("batch", min=1, max=4096)
    dyn = {t.name: {i: batch for i, d in enumerate(t.dims) if d == BATCH} for t in spec.inputs}
    external = _param_bytes(module) > EXTERNAL_DATA_BYTES
    with quiet_exporter():
        torch.onnx.export(module, example, str(path), input_names=spec.input_names(),
                          output_names=spec.output_names(), dynamic_shapes=dyn, opset_version=OPSET,
                          dynamo=True, external_data=external, optimize=True, verbose=False)


@contextlib.contextmanager
def quiet_exporter():
    """Around torch.onnx.export (dynamo): its progress lines on stdout, its warnings (pytree deprecations,
    unregistered torchvision ops) and torch.onnx's logging below ERROR are dropped; the CLI's output stays ours."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        yield


def check_graph(path: Path) -> None:
    """onnx.checker + shape inference (by path, so >2 GB graphs work) + forbidden ops."""
    import onnx

    onnx.checker.check_model(str(path), full_check=False)
    onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred")
    os.unlink(str(path) + ".inferred")
    g = onnx.load(str(path), load_external_data=False)
    bad = sorted({n.op_type for n in g.graph.node} & FORBIDDEN_OPS)
    complex_types = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
    if any(v.type.tensor_type.elem_type in complex_types for v in list(g.graph.value_info) + list(g.graph.output)):
        bad.append("complex tensors")
    if bad:
        raise ArtifactError(f"exported {path.name}", "plain ops (no Col2Im, no complex)", ", ".join(bad))


def parity(path: Path, spec: GraphSpec, reference: torch.nn.Module, dims: dict[str, int], precision: str,
           num_classes: int, batches=PARITY_BATCHES, seed: int = 1234) -> dict:
    """Run the graph in onnxruntime (CPU) and `reference` in PyTorch on fresh random inputs at each batch size.

    Error = max |out - ref| / max |ref| per output. Raises one NumericsError listing every output over its
    tolerance. Returns {"max_rel_err", "tolerance", "batches"}.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tol = spec.tolerance[precision]
    rng = np.random.default_rng(seed)
    worst, failures = 0.0, []
    for b in batches:
        feeds = spec.dummy_inputs(dims, b, rng, num_classes)
        outs = sess.run(spec.output_names(), feeds)
        with torch.no_grad():
            refs = reference(*(torch.from_numpy(v) for v in feeds.values()))
        refs = refs if isinstance(refs, (tuple, list)) else (refs,)
        for t, o, r in zip(spec.outputs, outs, refs):
            r = r.double().numpy()
            err = tensor_errors(o, r)[0]
            worst = max(worst, err)
            if not err <= tol:
                failures.append(f"{spec.name}.{t.name} @ batch {b}: max rel err {err:.3e} > {tol:.1e}")
    if failures:
        raise NumericsError(f"{spec.name}.onnx ({precision}) vs PyTorch fp32", "errors within tolerance",
                            "; ".join(failures))
    return {"max_rel_err": worst, "tolerance": tol, "batches": list(batches)}


def _install(scratch: Path, out: Path, name: str) -> None:
    """Move `name` (and its external data) from the scratch folder into `out`: data first, graph last."""
    data = scratch / f"{name}.data"
    if data.exists():
        os.replace(data, out / f"{name}.data")
    else:
        (out / f"{name}.data").unlink(missing_ok=True)
    os.replace(scratch / name, out / name)


def export_model(model: DDT, cfg: Config, out: Path, *, source: dict, precision: str = "fp32",
                 vae_dir: Path | None = None, force: bool = False, batch: BatchProfile | None = None,
                 check: bool = True, progress=None) -> Manifest:
    """Export `model` (fp32 reference weights) as `precision` graphs into `out`; write the manifest last."""
    out = Path(out)
    man = Manifest(config=cfg, precision=precision, source=source, batch=batch or BatchProfile())
    check_target_folder(out, man, force)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is unfinished until the new manifest lands
    dims = model_dims(cfg.model)
    reference = model.float().eval()
    exported = copy.deepcopy(reference).to(TORCH_DTYPES.get(precision, torch.float32))
    graphs = {}
    with atomic_dir(out, "export") as scratch:
        for spec, wrap in ((ENCODER, EncoderGraph), (DECODER, DecoderGraph)):
            if progress:
                progress(f"exporting {spec.file}")
            path = scratch / spec.file
            export_graph(wrap(exported).eval(), spec, dims, path)
            check_graph(path)
            record = {"file": spec.file}
            if check and precision in ("fp32", "fp16"):  # onnxruntime CPU has no bf16 MatMul
                if progress:
                    progress(f"checking {spec.file} against PyTorch")
                record["parity"] = parity(path, spec, wrap(reference), dims, precision, cfg.model.num_classes)
            _install(scratch, out, spec.file)
            record["sha256"] = sha256_file(out / spec.file)
            graphs[spec.name] = record
    if cfg.model.latent_scale is not None:
        if vae_dir is not None:
            from .vae import export_vae

            graphs["vae_decoder"] = export_vae(Path(vae_dir), cfg, out, precision=precision, progress=progress)
        else:
            man.extra["vae"] = "not exported: no --vae folder given; generate writes latents only"
    man.graphs = graphs
    man.write(out)
    return man


def load_checkpoint_model(ckpt: Path | None, cfg: Config, weights: str = "ema", trust: bool = False,
                          random_weights: bool = False, seed: int = 0) -> tuple[DDT, dict]:
    """The fp32 reference model and its `source` record (path, sha256, weights) for the manifest."""
    if random_weights:
        if ckpt is not None:
            raise CheckpointError("--random-weights", "no --ckpt", str(ckpt))
        torch.manual_seed(seed)
        model = DDT(cfg.model).eval()
        return model, {"path": None, "sha256": f"random-seed-{seed}", "weights": "random", "seed": seed}
    if ckpt is None:
        ckpt = bundled_weights(cfg)
        if ckpt is None:
            raise CheckpointError("--ckpt", f"a checkpoint (config {cfg.name} has no bundled weights)", "none")
    model = load_model(cfg.model, read_state_dict(ckpt, weights, trust), str(ckpt))
    return model, {"path": str(Path(ckpt).resolve()), "sha256": sha256_file(Path(ckpt)), "weights": weights}


def export_checkpoint(ckpt, config, out, *, weights="ema", vae_dir=None, random_weights=False, trust=False,
                      force=False, precision="fp32", progress=None) -> Manifest:
    cfg = load_config(config)
    model, source = load_checkpoint_model(ckpt, cfg, weights, trust, random_weights)
    return export_model(model, cfg, Path(out), source=source, precision=precision, vae_dir=vae_dir, force=force,
                        progress=progress)
