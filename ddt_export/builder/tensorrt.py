"""TensorRT engine builds: the thin adapter over TensorRT's ONNX parser and polygraphy's builder config.

The network comes from TensorRT's ONNX parser; TensorRT 11 networks are always strongly typed (precision comes
from the ONNX dtypes: an fp16 graph with fp32 islands, FP8 Q/DQ). polygraphy's CreateConfig /
EngineBytesFromNetwork do the config, timing cache and build; CreateConfig leaves TF32 off unless asked, so an
fp32 graph builds true-FP32 kernels. Parser and builder errors are collected and raised as one BackendError
naming the node; TensorRT's warnings are shown (`BuildLog`). Everything around it (profiles from the specs, the
manifest, provenance) is shared with the ONNX Runtime path and tested on CPU. Torch-free.
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
    """One ONNX-parser error with the node that failed (TensorRT 11 IParserError)."""
    return f"{err.desc()}, node {err.node_name()}, op {err.node_operator()}, index {err.node()}"


class BuildLog:
    """What TensorRT says during a build, kept as the build needs it (plain Python: tested on CPU).

    Errors are kept for the exception message. Warnings (precision fallbacks, a timing-cache mismatch, layers
    not run in FP8) are kept and each distinct one is shown once through `say`, the first `shown` of them, then
    how many more. Info and verbose messages are dropped. TensorRT's Python binding calls a Python logger for
    every message, whatever its severity (only its C++ `trt.Logger` filters before Python, and that one prints
    instead of keeping), so `TrtLog.log` drops them at its first statement, one dictionary lookup."""

    def __init__(self, say: Say | None = None, shown: int = 20):
        self.say, self.shown = say, shown
        self.errors: list[str] = []
        self.warnings: list[str] = []  # distinct, in order

    def record(self, level: str, msg: str) -> None:
        if level == "error":
            self.errors.append(msg)
        elif level == "warning" and msg not in self.warnings:
            self.warnings.append(msg)
            if self.say is not None and len(self.warnings) <= self.shown:
                self.say(f"TensorRT warning: {msg}")

    def summary(self) -> str:
        """'' or one line: how many distinct warnings were not shown."""
        extra = len(self.warnings) - self.shown
        return f"TensorRT: {extra} more distinct warnings not shown" if extra > 0 else ""


def build_plan(onnx_path: Path, plan_path: Path, profile: dict, *, timing_cache: Path | None, opt_level: int,
               say: Say | None = None) -> None:
    """Network from TensorRT's ONNX parser (strongly typed: the only kind in TensorRT 11) -> serialized plan at
    `plan_path` (a staging path). TensorRT's warnings go to `say`, its errors into the exception."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.exception import PolygraphyException

    from ..runtime.graphs.gpu import check

    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: "error", sev.ERROR: "error", sev.WARNING: "warning"}

    class TrtLog(trt.ILogger):  # TensorRT calls it for every message: anything but errors and warnings returns
        def __init__(self, sink: BuildLog):
            trt.ILogger.__init__(self)
            self.sink = sink

        def log(self, severity, msg):
            level = levels.get(severity)
            if level is not None:
                self.sink.record(level, msg)

    build_log = BuildLog(say)
    log = TrtLog(build_log)
    builder = check(trt.Builder(log), "trt.Builder")
    network = check(builder.create_network(0), "create_network")  # no flags: TensorRT 11 ignores STRONGLY_TYPED
    parser = check(trt.OnnxParser(network, log), "trt.OnnxParser")
    if not parser.parse_from_file(str(onnx_path)) or parser.num_errors:
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or build_log.errors
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
        raise BackendError(f"TensorRT build of {onnx_path.name}", "an engine", "; ".join(build_log.errors) or str(e))
    finally:
        if build_log.summary() and say is not None:
            say(build_log.summary())
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
                       opt_level=opt_level, say=say)
            info = dict(rec.info, onnx={"file": str(Path(onnx_dir.name) / rec.file), "sha256": rec.sha256})
            graphs[name] = GraphRecord(f"{name}.plan", staging.install(f"{name}.plan"), dict(rec.parity), info)
        staging.record = Manifest(
            name=src.name, provenance=provenance, dims=src.dims, backend="tensorrt", source=src.source,
            graphs=graphs, notes=list(src.notes),
            tensorrt={"strongly_typed": True, "profiles": profiles, "builder_optimization_level": opt_level,
                      "timing_cache": str(timing_cache) if timing_cache else None})
    return staging.record
