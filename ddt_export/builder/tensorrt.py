"""TensorRT engine builds: the thin adapter over TensorRT's ONNX parser and polygraphy's builder config.

The network comes from TensorRT's ONNX parser, strongly typed (precision comes from the ONNX dtypes: an fp16
graph with fp32 islands, FP8 Q/DQ); polygraphy's CreateConfig / EngineBytesFromNetwork do the config, timing
cache and build. Parser and builder errors are collected and raised as one BackendError naming the node.
Everything around it (profiles from the specs, the manifest, provenance) is shared with the ONNX Runtime path
and tested on CPU. Torch-free.
"""
from __future__ import annotations

from pathlib import Path

from ..core.artifacts import artifact_folder
from ..core.errors import BackendError
from ..core.log import Say
from ..core.manifest import GraphRecord, Manifest, read_manifest
from ..core.provenance import Provenance
from ..core.specs import SPECS, BatchProfile, Dims
from ..runtime.graphs.trt_plan import cuda_reason, polygraphy_reason, unusable_reason


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why not): `import tensorrt` works, cuda-python reaches a driver new enough for it, a CUDA GPU is
    visible, and polygraphy can drive TensorRT 11's builder. The decisions are `runtime.graphs.trt_plan`'s."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an ImportError, or OSError: the wheel is there but libnvinfer won't load
        why = unusable_reason(e)
        if not why:
            raise
        return False, f"`import tensorrt` failed ({why})"
    try:
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        driver = cudart.cudaDriverGetVersion()[1]
        runtime = cudart.cudaRuntimeGetVersion()[1]
    except Exception as e:  # noqa: BLE001 - no cuda-python, or no CUDA driver at all
        why = unusable_reason(e)
        if not why:
            raise
        return False, f"cuda-python cannot reach a GPU ({why})"
    why = cuda_reason(getattr(err, "name", str(err)), int(count or 0), int(driver or 0), int(runtime or 0))
    if why:
        return False, why
    try:
        from importlib.metadata import version

        why = polygraphy_reason(version("polygraphy"))
    except Exception as e:  # noqa: BLE001 - PackageNotFoundError
        why = f"polygraphy is not installed ({e}): pip install 'polygraphy>=0.53'"
    return (False, why) if why else (True, "")


def running_platform() -> dict:
    """The running TensorRT version and GPU: the platform TensorRT provenance records (and is checked against)."""
    from ..runtime.graphs.trt import running_platform as probe

    return probe()


def profile_shapes(spec_name: str, dims: Dims, batch: BatchProfile) -> dict:
    """{input: [min, opt, max] shapes} of one graph's optimization profile, from the engine I/O spec."""
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
    """Strongly typed network from TensorRT's ONNX parser -> serialized plan at `plan_path` (a staging path)."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.exception import PolygraphyException

    from ..runtime.graphs.trt import check

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
    Path(plan_path).write_bytes(bytes(plan))


def check_compute_capability(precision, platform: dict) -> None:
    """Refuse a precision whose tensor cores this GPU lacks (the precision table's min_cc)."""
    cc = tuple(int(v) for v in platform["compute_capability"].split("."))
    need = precision.min_cc
    if need and cc < need:
        raise BackendError(f"{precision.name} engines on {platform['gpu']}",
                           f"compute capability >= {need[0]}.{need[1]}", platform["compute_capability"],
                           f"{precision.note}; build fp16 instead")


def build_tensorrt(onnx_dir: Path, out: Path, *, provenance: Provenance, timing_cache: Path | None, opt_level: int,
                   say: Say) -> Manifest:
    """Plans for every graph of the onnxruntime folder `onnx_dir` (inside `out`), and the TensorRT manifest in
    `out` recording `provenance` (its platform: the running TensorRT and GPU)."""
    src = read_manifest(onnx_dir)
    check_compute_capability(src.precision_row, dict(provenance.platform))
    graphs, profiles = {}, {}
    with artifact_folder(out) as staging:
        for name, rec in src.graphs.items():
            profiles[name] = profile_shapes(name, src.dims, src.batch)
            say(f"building {name}.plan ({src.precision}, strongly typed, optimization level {opt_level})")
            build_plan(onnx_dir / rec.file, staging.path(f"{name}.plan"), profiles[name], timing_cache=timing_cache,
                       opt_level=opt_level)
            info = dict(rec.info, onnx={"file": str(Path(onnx_dir.name) / rec.file), "sha256": rec.sha256})
            graphs[name] = GraphRecord(f"{name}.plan", staging.install(f"{name}.plan"), dict(rec.parity), info)
        staging.record = Manifest(
            name=src.name, provenance=provenance, dims=src.dims, backend="tensorrt", source=src.source,
            graphs=graphs, notes=list(src.notes),
            tensorrt={"strongly_typed": True, "profiles": profiles, "builder_optimization_level": opt_level,
                      "timing_cache": str(timing_cache) if timing_cache else None})
    return staging.record
