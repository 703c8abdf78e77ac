"""`ddt-export build`: checkpoint -> the engine folder of one precision, reused only when its manifest matches.

    fp32 | fp16 | bf16:  export the graphs in that precision (fp32 islands inside, fp32 engine I/O)
    fp8:                 export fp32 + the high precision (stages/), calibrate on fp32 trajectories
                         (calibration/, unless given), ModelOpt FP8 Q/DQ (ddt_export.quantize)
    then, with TensorRT and a GPU: one strongly typed plan per graph (ONNX kept in onnx/), backend "tensorrt";
    without: the ONNX graphs are the engines, backend "onnxruntime" (one line says so).

An existing folder is reused when its manifest records the same request (precision, weights, config, batch
profile, VAE, FP8 settings; for TensorRT also its version, GPU and optimization level) and every file still
has its recorded sha256; otherwise the build is refused unless `force`, which rebuilds. Stage folders inside
`out` are the build's own and are rebuilt whenever stale. TensorRT code is kept thin: the network comes from
TensorRT's ONNX parser (strongly typed: precision comes from the ONNX dtypes), polygraphy's CreateConfig /
EngineBytesFromNetwork do the config, timing cache and build; parser and builder errors are collected and
raised as one BackendError naming the node.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Config, load_config
from .errors import ArtifactError, BackendError, ConfigError, NumericsError
from .manifest import MANIFEST, Manifest, read_manifest, sha256_file, verify_graphs
from .specs import PRECISIONS, SPECS, BatchProfile, model_dims

DEFAULT_OPT_LEVEL = 3  # TensorRT's default builder optimization level (0-5)
FP8_MIN_CC = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) and later
BF16_MIN_CC = (8, 0)
Say = Callable[[str], None]


@dataclass
class BuildResult:
    folder: Path
    backend: str
    manifest: Manifest
    reused: bool


# ------------------------------------------------------------------------------------------ TensorRT probing


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why not): `import tensorrt` works, cuda-python imports and a CUDA GPU is visible."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not loadable
        return False, f"`import tensorrt` failed ({e})"
    try:
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
    except (ImportError, OSError, RuntimeError) as e:  # no cuda-python >= 12.6.1, or no CUDA driver
        return False, f"cuda-python cannot reach a GPU ({e})"
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        return False, f"no CUDA GPU visible ({err})"
    return True, ""


def gpu_record() -> dict:
    """The running TensorRT version and GPU, as recorded in (and checked against) TensorRT manifests."""
    from .runtime.trt import running_platform

    return running_platform()


# ------------------------------------------------------------------------------------------ requests and reuse


def _request(precision: str, backend: str, batch: BatchProfile, vae: Path | None, high_precision: str,
             calibration: Path | None, opt_level: int) -> dict:
    """What a build folder must have been built with to be reused (stored as manifest.extra["build"])."""
    req = {"precision": precision, "backend": backend, "batch": f"{batch.min}:{batch.opt}:{batch.max}",
           "vae": str(Path(vae).resolve()) if vae else None}
    if precision == "fp8":
        req["high_precision"] = high_precision
        req["calibration"] = str(Path(calibration).resolve()) if calibration else "captured into the folder"
    if backend == "tensorrt":
        req["builder_optimization_level"] = opt_level
    return req


def differences(folder: Path, cfg: Config, source: dict, request: dict, gpu: dict | None = None) -> list[str]:
    """Why the folder's artifacts are not what this build would make ([] = reusable)."""
    try:
        man = read_manifest(folder)
    except ArtifactError as e:
        return [str(e)]
    diffs = []
    if man.source.get("sha256") != source.get("sha256") or man.source.get("weights") != source.get("weights"):
        diffs.append(f"weights: built {man.source.get('sha256', '')[:12]}, asked {source.get('sha256', '')[:12]}")
    if man.config.model != cfg.model or man.config.sampler != cfg.sampler:
        diffs.append(f"config: built {man.config.name}, asked {cfg.name}")
    old = man.extra.get("build", {})
    diffs += [f"{k}: built {old.get(k)}, asked {v}" for k, v in request.items() if old.get(k) != v]
    if gpu is not None:
        trt_rec = man.extra.get("tensorrt", {})
        diffs += [f"{k}: built {trt_rec.get(k)}, running {v}" for k, v in gpu.items() if trt_rec.get(k) != v]
    if not diffs:
        try:
            verify_graphs(man, folder)
        except ArtifactError as e:
            diffs.append(str(e))
    return diffs


def _stage_ok(folder: Path, source: dict, cfg: Config, precision: str, batch: BatchProfile, vae: Path | None) -> bool:
    try:
        man = read_manifest(folder)
        verify_graphs(man, folder)
    except ArtifactError:
        return False
    want_vae = vae is not None
    return (man.precision == precision and man.source.get("sha256") == source.get("sha256")
            and man.source.get("weights") == source.get("weights") and man.config == cfg and man.batch == batch
            and ("vae_decoder" in man.graphs) == want_vae)


# ------------------------------------------------------------------------------------------ ONNX stages


class _Model:
    """The fp32 PyTorch model, loaded on first use (a reused build never imports torch)."""

    def __init__(self, ckpt, cfg, weights, trust):
        self.args, self._model = (ckpt, cfg, weights, trust), None

    def get(self):
        if self._model is None:
            from .checkpoint import load_model, read_state_dict

            ckpt, cfg, weights, trust = self.args
            self._model = load_model(cfg.model, read_state_dict(ckpt, weights, trust), str(ckpt))
        return self._model


def _export(model: _Model, cfg: Config, out: Path, source: dict, precision: str, batch: BatchProfile,
            vae: Path | None, say: Say) -> Manifest:
    from .export import export_model

    if _stage_ok(out, source, cfg, precision, batch, vae):
        say(f"{precision} graphs in {out} are up to date")
        return read_manifest(out)
    say(f"exporting {precision} graphs to {out}")
    export_model(model.get(), cfg, out, source=source, precision=precision, vae_dir=vae, force=True,
                       batch=batch, progress=say)
    if precision == "bf16":
        _record_bf16(model.get(), cfg, out)
    return read_manifest(out)


def _record_bf16(model, cfg: Config, out: Path) -> None:
    """bf16 graphs cannot run in onnxruntime on CPU (no bf16 MatMul): record that, and PyTorch's bf16 error."""
    import copy

    import numpy as np
    import torch

    from .model import DecoderGraph, EncoderGraph
    from .precision import onnxruntime_status, record_parity, tensor_errors
    from .specs import DECODER, ENCODER

    record_parity(out, onnxruntime_status(out), key="onnxruntime")  # "not_run" + the reason
    dims, rng = model_dims(cfg.model), np.random.default_rng(1234)
    low = copy.deepcopy(model).to(torch.bfloat16)
    errs = {}
    for spec, wrap in ((ENCODER, EncoderGraph), (DECODER, DecoderGraph)):
        feeds = [torch.from_numpy(v) for v in spec.dummy_inputs(dims, 3, rng, cfg.model.num_classes).values()]
        with torch.no_grad():
            ref, got = wrap(model.float())(*feeds).double(), wrap(low)(*feeds).double()
        errs[spec.name] = {"max_rel_err": tensor_errors(got.numpy(), ref.numpy())[0],
                           "reference": "PyTorch CPU, the same model cast to bf16, vs fp32, random inputs"}
    record_parity(out, errs, key="torch_bf16")
    bad = [f"{g}: {e['max_rel_err']:.3e}" for g, e in errs.items() if not e["max_rel_err"] <= ENCODER.tolerance["bf16"]]
    if bad:
        raise NumericsError("bf16 model (PyTorch CPU) vs fp32", f"max rel err <= {ENCODER.tolerance['bf16']}",
                            "; ".join(bad))


def _fp8(model: _Model, cfg: Config, out: Path, source: dict, batch: BatchProfile, vae: Path | None,
         high_precision: str, calibration: Path | None, say: Say, progress) -> Manifest:
    from . import calibrate
    from .generate import default_schedule
    from .precision import graph_errors, record_parity
    from .quantize import quantize_folder
    from .schedule import parse_spec, steps_for

    stages = out / "stages"
    fp32 = _export(model, cfg, stages / "fp32", source, "fp32", batch, None, say)
    _export(model, cfg, stages / high_precision, source, high_precision, batch, vae, say)
    calib = Path(calibration) if calibration else out / "calibration"
    sampler = fp32.config.sampler
    steps = steps_for(parse_spec(default_schedule(sampler)), sampler.num_steps)  # never dp: no engines needed
    try:  # a --calibration folder brings its own schedule (e.g. dp:K); a captured one uses the default
        diffs = calibrate.matches(calibrate.read_calibration(calib), cfg, fp32.source, sampler,
                                  None if calibration else steps)
    except ArtifactError as e:
        diffs = [str(e)]
    if diffs and calibration is not None:
        raise ArtifactError(f"--calibration {calib}", "a calibration of this model and sampler",
                            "; ".join(diffs), "calibrate again, or leave --calibration out to capture one")
    if diffs:
        say(f"capturing calibration trajectories into {calib} ({calibrate.DEFAULT_NUM} samples, "
            f"{sampler.num_steps} steps, full CFG batch)")
        calibrate.capture(stages / "fp32", calib, progress=progress, say=say)
    else:
        say(f"calibration {calib} matches; reusing it")
    quantize_folder(stages / "fp32", stages / high_precision, calib, out, high_precision=high_precision,
                    force=True, say=say)
    # onnxruntime CPU runs FP8 Q/DQ around fp16; around bf16 it cannot (no bf16 MatMul): "not_run" is recorded
    record_parity(out, graph_errors(out, stages / "fp32", calibration=calib, check=high_precision == "fp16"))
    return read_manifest(out)


def export_stage(precision: str, model: _Model, cfg: Config, out: Path, source: dict, batch: BatchProfile,
                 vae: Path | None, high_precision: str, calibration: Path | None, say: Say, progress) -> Manifest:
    """The onnxruntime folder of `precision` at `out` (for fp8 with its stages and calibration inside)."""
    if precision == "fp8":
        return _fp8(model, cfg, out, source, batch, vae, high_precision, calibration, say, progress)
    return _export(model, cfg, out, source, precision, batch, vae, say)


# ------------------------------------------------------------------------------------------ TensorRT plans


def profile_shapes(spec_name: str, cfg: Config, batch: BatchProfile, dims: dict | None = None) -> dict:
    """{input: [min, opt, max] shapes} of one graph's optimization profile, from the engine I/O spec."""
    dims = dims or model_dims(cfg.model)
    return {t.name: [list(t.shape(dims, b)) for b in (batch.min, batch.opt, batch.max)]
            for t in SPECS[spec_name].inputs}


def _parser_error(err) -> str:
    """One ONNX-parser error with the node that failed (TensorRT 10 IParserError)."""
    parts = [str(err.desc())]
    for attr, label in (("node_name", "node"), ("node_operator", "op"), ("node", "index")):
        fn = getattr(err, attr, None)
        if fn is not None:
            parts.append(f"{label} {fn()}")
    return ", ".join(parts)


def build_plan(onnx_path: Path, plan_path: Path, profile: dict, *, timing_cache: Path | None, opt_level: int) -> None:
    """Strongly typed network from TensorRT's ONNX parser -> serialized plan at `plan_path` (atomic)."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.exception import PolygraphyException

    from .manifest import atomic_path
    from .runtime.trt import check

    class Log(trt.ILogger):  # keeps the builder's errors for the exception message
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)

    log = Log()
    builder = check(trt.Builder(log), "trt.Builder")
    network = check(builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)),
                    "create_network(STRONGLY_TYPED)")
    parser = check(trt.OnnxParser(network, log), "trt.OnnxParser")
    if not parser.parse_from_file(str(onnx_path)) or parser.num_errors:
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or log.errors
        raise BackendError(f"TensorRT ONNX parser on {onnx_path}", "a parsed network", "; ".join(errors) or "failure")
    prof = Profile()
    for name, (lo, opt, hi) in profile.items():
        prof.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
    config = CreateConfig(profiles=[prof], builder_optimization_level=opt_level,
                          load_timing_cache=str(timing_cache) if timing_cache else None)
    try:
        plan = EngineBytesFromNetwork((builder, network, parser), config=config,
                                      save_timing_cache=str(timing_cache) if timing_cache else None)()
    except PolygraphyException as e:
        raise BackendError(f"TensorRT build of {onnx_path.name}", "an engine", "; ".join(log.errors) or str(e))
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(plan))


def build_tensorrt(onnx_dir: Path, out: Path, *, timing_cache: Path | None, opt_level: int, request: dict,
                   say: Say) -> Manifest:
    """Plans for every graph of the onnxruntime folder `onnx_dir`, and the TensorRT manifest in `out`."""
    src = read_manifest(onnx_dir)
    gpu = gpu_record()
    cc = tuple(int(v) for v in gpu["compute_capability"].split("."))
    need = {"fp8": FP8_MIN_CC, "bf16": BF16_MIN_CC}.get(src.precision)
    if need and cc < need:
        raise BackendError(f"{src.precision} engines on {gpu['gpu']}", f"compute capability >= {need[0]}.{need[1]}",
                           gpu["compute_capability"],
                           "FP8 needs Ada/Hopper or later, bf16 Ampere or later; build fp16 instead")
    (out / MANIFEST).unlink(missing_ok=True)
    graphs, profiles = {}, {}
    for name, rec in src.graphs.items():
        vae = src.graphs.get("vae_decoder", {})
        dims = model_dims(src.config.model, vae.get("image_channels", 3), vae.get("factor", 8))
        profiles[name] = profile_shapes(name, src.config, src.batch, dims)
        say(f"building {name}.plan ({src.precision}, strongly typed, optimization level {opt_level})")
        build_plan(onnx_dir / rec["file"], out / f"{name}.plan", profiles[name], timing_cache=timing_cache,
                   opt_level=opt_level)
        graphs[name] = {k: v for k, v in rec.items() if k not in ("file", "sha256")}
        graphs[name].update({"file": f"{name}.plan", "sha256": sha256_file(out / f"{name}.plan"),
                             "onnx": {"file": str(Path(onnx_dir.name) / rec["file"]), "sha256": rec["sha256"]}})
    man = dataclasses.replace(src, backend="tensorrt", graphs=graphs)
    man.extra = dict(src.extra, build=request, tensorrt=dict(gpu, strongly_typed=True, profiles=profiles,
                                                             builder_optimization_level=opt_level,
                                                             timing_cache=str(timing_cache) if timing_cache else None))
    man.write(out)
    return man


# ------------------------------------------------------------------------------------------ the command


def build(precision: str, *, out: Path, ckpt: Path | None = None, config: str | None = None,
          batch: BatchProfile | None = None, timing_cache: Path | None = None, force: bool = False,
          vae: Path | None = None, high_precision: str = "fp16", calibration: Path | None = None,
          weights: str = "ema", trust: bool = False, opt_level: int = DEFAULT_OPT_LEVEL, backend: str = "auto",
          say: Say = print, progress=None) -> BuildResult:
    """Build (or reuse) the engine folder `out` for `precision`. See the module doc."""
    from .checkpoint import bundled_weights
    from .errors import CheckpointError

    if precision not in PRECISIONS:
        raise ConfigError("--precision", " | ".join(PRECISIONS), precision)
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        raise ConfigError("--backend", "auto | onnxruntime | tensorrt", backend)
    cfg, out, batch = load_config(config), Path(out), batch or BatchProfile()
    ckpt = Path(ckpt) if ckpt else bundled_weights(cfg)
    if ckpt is None:
        raise CheckpointError("--ckpt", f"a checkpoint (config {cfg.name} has no bundled weights)", "none")
    if not Path(ckpt).is_file():
        raise CheckpointError("--ckpt", "an existing file", str(ckpt))
    source = {"path": str(Path(ckpt).resolve()), "sha256": sha256_file(Path(ckpt)), "weights": weights}
    usable, why = tensorrt_status()
    if backend == "tensorrt" and not usable:
        raise BackendError("TensorRT", "importable with a visible GPU", why, "build with --backend onnxruntime")
    chosen = "tensorrt" if usable and backend != "onnxruntime" else "onnxruntime"
    if chosen == "onnxruntime" and backend == "auto":
        say(f"TensorRT is not available ({why}): building the ONNX Runtime engine folder for {precision} instead")
    request = _request(precision, chosen, batch, vae, high_precision, calibration, opt_level)
    gpu = gpu_record() if chosen == "tensorrt" else None
    if (out / MANIFEST).is_file():
        diffs = differences(out, cfg, source, request, gpu)
        if not diffs:
            say(f"{out} is up to date ({precision}, {chosen}); nothing to build")
            return BuildResult(out, chosen, read_manifest(out), reused=True)
        if not force:
            raise ArtifactError(str(out), f"a {precision} {chosen} build of this model and settings",
                                "; ".join(diffs), "pass --force to rebuild it")
        say(f"rebuilding {out}: " + "; ".join(diffs))
    model = _Model(ckpt, cfg, weights, trust)
    onnx_dir = out if chosen == "onnxruntime" else out / "onnx"
    man = export_stage(precision, model, cfg, onnx_dir, source, batch, vae, high_precision, calibration, say,
                       progress)
    if chosen == "tensorrt":
        man = build_tensorrt(onnx_dir, out, timing_cache=timing_cache, opt_level=opt_level, request=request,
                             say=say)
    else:
        man.extra["build"] = request
        man.write(out)
        if precision in ("bf16",) or (precision == "fp8" and high_precision == "bf16"):
            say("note: onnxruntime's CPU provider has no bfloat16 MatMul; this folder runs with onnxruntime-gpu "
                "(CUDAExecutionProvider) or as a TensorRT build")
    return BuildResult(out, chosen, read_manifest(out), reused=False)


def point_default(target: Path, link: Path, say: Say = print) -> bool:
    """Make `link` (engines/default) a relative symlink to `target`, atomically; never replaces a real folder."""
    target, link = Path(target), Path(link)
    if link.exists() and not link.is_symlink():
        say(f"note: {link} is a folder, not a link; left as is (pass --engines {target} to use this build)")
        return False
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target.resolve(), link.parent.resolve()), tmp, target_is_directory=True)
    os.replace(tmp, link)
    return True
