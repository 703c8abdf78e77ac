"""One graph: torch.onnx export, structural checks, onnxruntime parity against PyTorch. Shared by the DDT
graphs (`exporter`) and the VAE decoder (`vae`); names, dynamic axes and dummy inputs come from `core.specs`,
tolerances from `core.precision`."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ArtifactError, NumericsError
from ..core.numerics import tensor_errors
from ..core.precision import Precision
from ..core.specs import BATCH, Dims, GraphSpec
from ..runtime.graphs import ort

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weights than this keep them in <name>.onnx.data (2 GB protobuf cap)
PARITY_BATCHES = (1, 3)
FORBIDDEN_OPS = {"Col2Im", "DFT", "STFT"}  # TensorRT lacks Col2Im; complex math must not leak into the graph


def torch_dtype(p: Precision) -> torch.dtype:
    """The dtype a precision's graphs are exported in (a quantized precision exports fp32 first)."""
    return torch.float32 if p.quantized else getattr(torch, p.dtype)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def quiet_exporter():
    """Around torch.onnx.export (dynamo): its progress lines on stdout, its warnings (pytree deprecations,
    unregistered torchvision ops) and torch.onnx's logging below ERROR are dropped; the CLI's output stays ours."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        yield


def export_graph(module: torch.nn.Module, spec: GraphSpec, dims: Dims, path: Path) -> None:
    """torch.onnx (dynamo) export of one graph to `path`, I/O from `spec`, dynamic batch."""
    example = tuple(torch.from_numpy(a) for a in spec.dummy_inputs(dims, 2, np.random.default_rng(0), 1).values())
    batch = torch.export.Dim("batch", min=1, max=4096)
    dyn = {t.name: {i: batch for i, d in enumerate(t.dims) if d == BATCH} for t in spec.inputs}
    external = _param_bytes(module) > EXTERNAL_DATA_BYTES
    with quiet_exporter():
        torch.onnx.export(module, example, str(path), input_names=spec.input_names(),
                          output_names=spec.output_names(), dynamic_shapes=dyn, opset_version=OPSET,
                          dynamo=True, external_data=external, optimize=True, verbose=False)


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


def parity(path: Path, spec: GraphSpec, reference: torch.nn.Module, dims: Dims, precision: Precision,
           num_classes: int, batches=PARITY_BATCHES, seed: int = 1234) -> dict:
    """Run the graph in onnxruntime (CPU) and `reference` in PyTorch on fresh random inputs at each batch size.

    Error = max |out - ref| / max |ref| per output. Raises one NumericsError listing every output over its
    tolerance. Returns {"max_rel_err", "tolerance", "batches"}.
    """
    sess = ort.session(path)
    tol = precision.tol(spec.name)
    rng = np.random.default_rng(seed)
    worst, failures = 0.0, []
    for b in batches:
        feeds = spec.dummy_inputs(dims, b, rng, num_classes)
        outs = sess.run(spec.output_names(), feeds)
        with torch.no_grad():
            refs = reference(*(torch.from_numpy(v) for v in feeds.values()))
        refs = refs if isinstance(refs, (tuple, list)) else (refs,)
        for t, o, r in zip(spec.outputs, outs, refs):
            err = tensor_errors(o, r.double().numpy())[0]
            worst = max(worst, err)
            if not err <= tol:
                failures.append(f"{spec.name}.{t.name} @ batch {b}: max rel err {err:.3e} > {tol:.1e}")
    if failures:
        raise NumericsError(f"{spec.name}.onnx ({precision.name}) vs PyTorch fp32", "errors within tolerance",
                            "; ".join(failures))
    return {"max_rel_err": worst, "tolerance": tol, "batches": list(batches)}


def not_run(path: Path) -> dict:
    """Why onnxruntime CPU cannot run a graph (bf16: no MatMul kernel), as a parity record."""
    sess, why = ort.try_session(path)
    return {"runs": True} if sess is not None else {"not_run": why}
