"""FP8 (E4M3) graphs with NVIDIA ModelOpt's ONNX post-training quantization, calibrated on real trajectories.

What gets FP8 Q/DQ: the block GEMMs (attn.qkv, attn.proj, mlp.w1/w2/w3, adaLN_modulation of each block) that
the FP8 recipe selects (`build.recipes`: by role and block), weights per output channel, activations per
tensor, scales from the recipe's calibration (max or entropy) on the captured trajectory inputs
(`ddt_export.calibrate`). What stays in high precision: the block GEMMs the recipe leaves out, and always
- the embedders (x/s/t/y_embedder) and the final layer: GEMMs at the model's edges, where the error is not
  averaged by any later layer, and a sliver of the work (x/s_embedder have K = C*p*p = 16 for DDT-XL);
- the attention matmuls (q @ k^T, attn @ v): DDT-XL's head size is 72, not a multiple of 16, so TensorRT has
  no FP8 fused-attention kernel for it; FP8 Q/DQ there would only add (de)quantize layers around an
  unfused fp16/bf16 attention.

How, per graph (encoder, decoder), from files only:
1. ModelOpt `quantize(quantize_mode="fp8", high_precision_dtype="fp32", nodes_to_quantize=<the recipe's GEMMs>)` on
   the fp32 graph, calibrating on CPU (`calibration_eps=["cpu"]`): the fp32 graph with E4M3 Q/DQ.
2. ModelOpt AutoCast `convert_to_mixed_precision(low_precision_type=fp16|bf16, nodes_to_exclude=<islands>)`:
   everything else in fp16/bf16 except exactly the fp32 islands of our own fp16/bf16 export (RMSNorm
   statistics, RoPE, timestep frequencies, the final LayerNorm), engine I/O kept float32.
Why not `quantize(high_precision_dtype="fp16")` in one call: ModelOpt's built-in conversion keeps nodes in
fp32 only by op type (`op_types_to_exclude_fp16`). RMSNorm's statistics share op types (Add, Mul) with the
residual stream, so by op type they either all go fp16 (the mean of squares overflows fp16 once a token's RMS
passes 256) or drag the residual stream to fp32. AutoCast takes node names; the islands are read from the
fp16/bf16 export of the same model (`model.py` decides them once), matched node by node (same op sequence
once Casts are dropped; checked).
The node roles come from the exporter's `pkg.torch.onnx.name_scopes` metadata (the module path of every
node); they are copied onto the quantized graph so `fp8_gemm_report` can count from the graph alone. A graph in
which the recipe selects no GEMM is the high-precision export itself.
"""
from __future__ import annotations

import ast
import contextlib
import io
import re
import shutil
from pathlib import Path

import numpy as np

from ..core.artifacts import artifact_folder
from ..core.config import ModelConfig
from ..core.errors import ArtifactError, BackendError
from ..core.flops import FP8_RATE, GEMM_ROLES, block_gemm_flops
from ..core.log import Say
from ..core.manifest import GraphRecord, Manifest, read_manifest, refuse_foreign
from ..core.precision import high_precision as high_precision_row, precision
from ..core.provenance import IDENTITY, Provenance
from ..core.specs import DECODER, ENCODER
from .recipes import Recipe, parse_recipe, phase_steps

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
BLOCK_GEMMS = GEMM_ROLES
_BLOCK = re.compile(r"model\.blocks\.(\d+)\.(" + "|".join(re.escape(g) for g in BLOCK_GEMMS) + r")(\.\d+)?$")
_EMBEDDER = re.compile(r"model\.(x|s|t|y)_embedder\b")
CALIB_CHUNK = 16  # rows per calibration inference
QUANTIZED = (ENCODER, DECODER)


# ------------------------------------------------------------------------------------------ graph inspection


def _scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == SCOPES_KEY:
            try:
                return list(ast.literal_eval(p.value))
            except (ValueError, SyntaxError):
                return []
    return []


def gemm_role(node) -> str:
    """block.<qkv|proj|w1|w2|w3|adaLN> | attention | embedder | final_layer | other, from the module path."""
    scopes = _scopes(node)
    for s in reversed(scopes):
        hit = _BLOCK.search(s)
        if hit:
            return "block." + hit.group(2).split(".")[-1]
    if any(_EMBEDDER.search(s) for s in scopes):
        return "embedder"
    if any(s.startswith("model.final_layer") for s in scopes):
        return "final_layer"
    if any(re.search(r"model\.blocks\.\d+\.attn$", s) for s in scopes):
        return "attention"
    return "other"


def gemm_site(node) -> tuple[int, str] | None:
    """(block index, role) of a block GEMM (the key of `core.flops.block_gemm_flops`), else None."""
    for s in reversed(_scopes(node)):
        hit = _BLOCK.search(s)
        if hit:
            return int(hit.group(1)), hit.group(2)
    return None


def gemm_sites(model) -> dict[str, tuple[int, str]]:
    """Block GEMM node name -> (block, role)."""
    gemm_roles(model)  # the metadata check
    return {n.name: site for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
            for site in [gemm_site(n)] if site is not None}


def gemm_roles(model) -> dict[str, str]:
    """MatMul/Gemm node name -> role. Needs the exporter's name-scope metadata (ArtifactError without it)."""
    gemms = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    if gemms and not any(_scopes(n) for n in gemms):
        raise ArtifactError("graph", f"MatMul/Gemm nodes with {SCOPES_KEY} metadata (a ddt-export graph)",
                            "no module paths", "export the graph with `ddt-export export`")
    return {n.name: gemm_role(n) for n in gemms}


def _producers(model) -> dict[str, object]:
    return {o: n for n in model.graph.node for o in n.output}


def _is_fp8_dq(name: str, producers: dict, fp8_tensors: set[str]) -> bool:
    node = producers.get(name)
    return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in fp8_tensors


def _fp8_tensors(model) -> set[str]:
    """Names of FLOAT8E4M3FN tensors: initializers and QuantizeLinear outputs with an E4M3 zero point."""
    from onnx import TensorProto

    out = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in out:
            out.update(n.output)
    return out


def fp8_gemm_report(model, cfg: ModelConfig | None = None) -> dict:
    """Which GEMMs are fed by FP8 DequantizeLinear on both inputs (activation and weight), by role.

    Returns {"block_gemms", "block_fp8", "fraction" (of the block GEMM nodes), "fp8_outside_blocks": [roles],
    "roles": {role: [fp8, total]}, "fp8_sites": [[block, role], ...]}; with the model's config also
    "block_flops", "fp8_flops" and "flop_fraction": the block GEMM FLOPs per sample of this graph
    (`core.flops.block_gemm_flops`) and the share of them behind FP8 Q/DQ.
    """
    roles = gemm_roles(model)
    producers, fp8 = _producers(model), _fp8_tensors(model)
    by_role: dict[str, list[int]] = {}
    sites: dict[tuple[int, str], bool] = {}
    for n in model.graph.node:
        if n.name not in roles:
            continue
        fed = all(_is_fp8_dq(i, producers, fp8) for i in n.input[:2])
        counts = by_role.setdefault(roles[n.name], [0, 0])
        counts[0] += int(fed)
        counts[1] += 1
        site = gemm_site(n)
        if site is not None:
            sites[site] = fed
    blocks = [v for k, v in by_role.items() if k.startswith("block.")]
    total, done = sum(v[1] for v in blocks), sum(v[0] for v in blocks)
    out = {"block_gemms": total, "block_fp8": done, "fraction": done / total if total else 0.0,
           "fp8_outside_blocks": sorted(k for k, v in by_role.items() if not k.startswith("block.") and v[0]),
           "roles": by_role, "fp8_sites": sorted([b, r] for (b, r), fed in sites.items() if fed)}
    if cfg is not None:
        flops = block_gemm_flops(cfg)
        out["block_flops"] = sum(flops[k] for k in sites)
        out["fp8_flops"] = sum(flops[k] for k, fed in sites.items() if fed)
        out["flop_fraction"] = out["fp8_flops"] / out["block_flops"] if sites else 0.0
    return out


def island_nodes(fp32_model, hp_model) -> list[str]:
    """Names (in the fp32 graph) of the nodes the fp16/bf16 export computes in float32: its fp32 islands.

    The two exports of one model have the same op sequence once Casts are dropped; checked, else ArtifactError.
    """
    import onnx
    from onnx import TensorProto

    hp = onnx.shape_inference.infer_shapes(hp_model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*hp.graph.value_info, *hp.graph.output, *hp.graph.input)}
    types.update({i.name: i.data_type for i in hp.graph.initializer})
    a = [n for n in fp32_model.graph.node if n.op_type != "Cast"]
    b = [n for n in hp.graph.node if n.op_type != "Cast"]
    if [n.op_type for n in a] != [n.op_type for n in b]:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x.op_type != y.op_type), min(len(a), len(b)))
        raise ArtifactError("fp32 and high-precision exports", "the same op sequence (Casts aside)",
                            f"{len(a)} vs {len(b)} nodes, first difference at node {first}",
                            "export both from the same checkpoint with this ddt-export version")
    return [x.name for x, y in zip(a, b) if any(types.get(o) == TensorProto.FLOAT for o in y.output)]


# ------------------------------------------------------------------------------------------ quantization


def _anchored(names) -> list[str]:
    return [re.escape(n) + "$" for n in names]  # ModelOpt matches node-name patterns with re.match


@contextlib.contextmanager
def _quiet(what: str):
    """ModelOpt and onnxruntime's calibrator print progress bars; keep them, and show them only on failure."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except Exception as e:
        tail = "\n".join(buf.getvalue().strip().splitlines()[-12:])
        raise BackendError(what, "success", f"{type(e).__name__}: {e}", f"last output:\n{tail}" if tail else "") from e


def _graph_files(folder: Path, name: str) -> list[Path]:
    return [p for p in (folder / name, folder / f"{name}.data") if p.exists()]


def quantize_graph(fp32_path: Path, hp_path: Path, calib: dict[str, np.ndarray], out_path: Path, *,
                   recipe: Recipe, cfg: ModelConfig, high_precision: str = "fp16", scratch: Path) -> dict:
    """One fp32 graph -> its FP8 graph at `out_path` (see the module doc). Returns the quantization record.
    A graph holding none of the recipe's GEMMs is installed as the high-precision export `hp_path` itself."""
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.quantization import quantize

    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    wanted, sites = recipe.sites(cfg), gemm_sites(fp32)
    targets = sorted(n for n, site in sites.items() if site in wanted)
    external = (Path(str(fp32_path) + ".data")).exists()
    rows = len(next(iter(calib.values())))
    record = {"tool": "nvidia-modelopt onnx ptq", "mode": "fp8 e4m3", "high_precision": high_precision,
              "recipe": recipe.to_dict(), "calibration_method": recipe.calibration, "calibration_rows": rows,
              "weights": "per output channel", "activations": "per tensor",
              "not_quantized": ["block GEMMs the recipe leaves out", "embedders", "final_layer",
                                "attention matmuls (head size not a multiple of 16)"]}
    if not targets:  # nothing to quantize here: the high-precision export is this graph
        for f in _graph_files(hp_path.parent, hp_path.name):
            shutil.copy(f, out_path.parent / f.name)  # same file names: the external data reference holds
        record.update(fp8_gemms=fp8_gemm_report(onnx.load(str(hp_path), load_external_data=False), cfg),
                      calibration_rows=0, fp32_island_nodes=None)
        return record
    islands = island_nodes(fp32, onnx.load(str(hp_path), load_external_data=False))
    work = scratch / fp32_path.stem
    work.mkdir(parents=True, exist_ok=True)
    for f in _graph_files(fp32_path.parent, fp32_path.name):  # ModelOpt writes its intermediates beside the input
        shutil.copy(f, work / f.name)
    chunk = min(CALIB_CHUNK, rows)
    shapes = ",".join(f"{k}:" + "x".join(str(d) for d in (chunk, *v.shape[1:])) for k, v in calib.items())
    qdq = work / f"{fp32_path.stem}.qdq.onnx"
    with _quiet(f"ModelOpt FP8 quantization of {fp32_path.name}"):
        quantize(str(work / fp32_path.name), quantize_mode="fp8", calibration_data=calib, calibration_shapes=shapes,
                 calibration_method=recipe.calibration, calibration_eps=["cpu"],
                 op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=_anchored(targets),
                 disable_mha_qdq=True,  # attention stays high precision: no FP8 fused MHA for head size 72
                 high_precision_dtype="fp32",  # converted below by AutoCast, with our fp32 islands
                 use_external_data_format=external, output_path=str(qdq), log_level="ERROR")
    with _quiet(f"ModelOpt AutoCast of {qdq.name} to {high_precision}"):
        model = convert_to_mixed_precision(str(qdq), low_precision_type=high_precision,
                                           nodes_to_exclude=_anchored(islands), keep_io_types=True, data_max=np.inf,
                                           providers=["cpu"])
    scopes = {n.name: p for n in fp32.graph.node for p in n.metadata_props if p.key == SCOPES_KEY}
    for n in model.graph.node:
        if n.name in scopes and not _scopes(n):
            n.metadata_props.append(scopes[n.name])
    report = fp8_gemm_report(model, cfg)
    here = sorted(list(sites[n]) for n in targets)
    if report["fp8_sites"] != here or report["fp8_outside_blocks"]:
        raise BackendError(f"FP8 quantization of {fp32_path.name}",
                           f"exactly the recipe's {len(here)} block GEMMs in FP8 and none outside the blocks",
                           f"{report['block_fp8']} in FP8, outside: {report['fp8_outside_blocks']}")
    if external:  # out_path is in a staging folder: installed with its data by Staging.install
        onnx.save(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{out_path.name}.data")
    else:
        onnx.save(model, str(out_path))
    record.update(fp8_gemms=report, fp32_island_nodes=len(islands))
    return record


def quantize_folder(fp32_dir: Path, hp_dir: Path, calib_dir: Path, out: Path, *, provenance: Provenance,
                    recipe: Recipe | None = None, high_precision: str = "fp16", force: bool = False,
                    say: Say = print) -> Manifest:
    """fp32 export + same-model fp16/bf16 export + calibration -> an FP8 onnxruntime folder at `out` quantized
    by `recipe` (default: `recipes.DEFAULT_RECIPE`), whose manifest records `provenance` (what the build was
    asked for), the recipe with the FLOP share it puts in FP8, and each graph's error against fp32, measured on
    calibration rows before the manifest is written."""
    from .calibrate import calibration_inputs, differences, read_calibration
    from .parity import files_errors

    hp_row = high_precision_row(high_precision)
    src, hp = read_manifest(fp32_dir), read_manifest(hp_dir)
    kinds = src.provenance.diff(hp.provenance, IDENTITY)
    if src.precision != "fp32" or hp.precision != high_precision or kinds:
        raise ArtifactError("quantization inputs", f"an fp32 and a {high_precision} export of one model",
                            f"{src.precision} and {hp.precision}" + (f" ({'; '.join(kinds)})" if kinds else ""))
    recipe = recipe or parse_recipe(None)
    model_cfg = src.config.model
    share = recipe.share(model_cfg)  # ConfigError for a recipe that selects nothing on this model
    calib = read_calibration(calib_dir)
    steps = phase_steps(Provenance.from_dict(calib["provenance"]).sampler, recipe.calibration_rows)
    stale = differences(calib, src.provenance, any_schedule=True)
    if any(d.startswith(("weights", "model")) for d in stale):
        raise ArtifactError(f"calibration {calib_dir}", f"captured on {fp32_dir}'s model", "; ".join(stale),
                            "calibrate again")
    graphs: dict[str, GraphRecord] = {}
    with artifact_folder(Path(out), refuse=refuse_foreign(provenance, force)) as staging:
        for spec in QUANTIZED:
            say(f"quantizing {spec.file} to FP8 (recipe {recipe.name}, high precision {high_precision}, "
                f"{recipe.calibration} calibration on {recipe.calibration_rows} rows)")
            rec = quantize_graph(Path(fp32_dir) / spec.file, Path(hp_dir) / spec.file,
                                 calibration_inputs(calib_dir, spec, calib, steps), staging.path(spec.file),
                                 recipe=recipe, cfg=model_cfg, high_precision=high_precision,
                                 scratch=staging.path("modelopt"))
            rec["calibration"] = {"folder": str(Path(calib_dir).resolve()),
                                  "sha256": calib["graphs"][spec.name]["sha256"], "schedule": calib["schedule"]}
            graphs[spec.name] = GraphRecord(spec.file, "", info={"quantization": rec})
        fp8_flops = sum(graphs[s.name].info["quantization"]["fp8_gemms"]["fp8_flops"] for s in QUANTIZED)
        assert fp8_flops == share.fp8, (fp8_flops, share.fp8)  # every graph holds exactly the recipe's GEMMs
        for s in QUANTIZED:  # counted from the graphs: per sample, a step running both graphs
            graphs[s.name].info["quantization"]["recipe_share"] = {
                "of_block_gemm_flops": fp8_flops / share.block_gemms, "of_step_flops": fp8_flops / share.step,
                "predicted_speedup": share.predicted_speedup, "fp8_rate": FP8_RATE}
        if "vae_decoder" in hp.graphs:  # the VAE is not quantized: it runs in the high precision
            vae = hp.graphs["vae_decoder"]
            for f in _graph_files(Path(hp_dir), vae.file):
                shutil.copy(f, staging.path(f.name))
            graphs["vae_decoder"] = GraphRecord(vae.file, "", dict(vae.parity), dict(vae.info))
        # error against fp32 on the calibration rows, before anything is installed; onnxruntime CPU runs FP8
        # Q/DQ around fp16, not around bf16 ("not_run" and the reason are recorded)
        files = {g: staging.path(r.file) for g, r in graphs.items()}
        errors = files_errors(files, precision(provenance.precision), src.dims, src.config.model.num_classes,
                              Path(fp32_dir), calibration=Path(calib_dir), check=hp_row.ort_cpu, where=str(out))
        for g, rec in graphs.items():
            if g in errors:
                rec.parity["vs_fp32_onnx"] = errors[g]
            rec.sha256 = staging.install(rec.file)
        staging.record = Manifest(name=src.name, provenance=provenance, dims=hp.dims, source=src.source,
                                  graphs=graphs)
    return staging.record
