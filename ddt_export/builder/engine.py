"""`ddt-export build`: checkpoint -> the engine folder of one precision, reused only when its provenance matches.

    fp32 | fp16 | bf16:  export the graphs in that precision (fp32 islands inside, fp32 engine I/O)
    fp8:                 export fp32 + the high precision (stages/), calibrate on fp32 trajectories
                         (calibration/, unless given), ModelOpt FP8 Q/DQ of the block GEMMs the FP8 recipe
                         selects (`build.recipes`, default `DEFAULT_RECIPE`; `build.quantize`)
    then, with TensorRT and a GPU: one strongly typed plan per graph (ONNX kept in onnx/), backend "tensorrt"
    (`build.tensorrt`); without: the ONNX graphs are the engines, backend "onnxruntime" (one line says so).

The provenance the build is asked for (weights, config, precision, batch profile, VAE, build options (for fp8
the recipe among them), and for
TensorRT the running version and GPU) is computed first, without torch. An existing folder is reused when its
recorded provenance has no difference from it and every file still has its recorded sha256; otherwise it is
refused unless `force`, which rebuilds. Stage folders inside `out` are the build's own and are rebuilt whenever
their provenance differs. The whole build holds the folder lock on `out`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.artifacts import MANIFEST, folder_lock
from ..core.config import Config, bundled_weights, load_config
from ..core.errors import ArtifactError, BackendError, CheckpointError, ConfigError
from ..core.log import Say
from ..core.manifest import Manifest, read_manifest, verify_graphs
from ..core.precision import Precision, high_precision as high_precision_row, precision as precision_row
from ..core.provenance import WEIGHT_KINDS, Provenance, WeightsRef, provenance_for
from ..core.specs import BatchProfile
from ..runtime.graphs.backends import CHOICES
from ..runtime.graphs.engines import DEFAULT_ENGINES
from .recipes import Recipe, parse_recipe
from .tensorrt import build_tensorrt, running_platform, tensorrt_status

DEFAULT_OPT_LEVEL = 3  # TensorRT's default builder optimization level (0-5)
DEFAULT_HIGH_PRECISION = "fp16"
CAPTURED = "captured into the folder"


@dataclass(frozen=True)
class BuildOptions:
    """What a build is asked for besides its precision and folder (the `build` command's flags)."""

    ckpt: Path | str | None = None  # None: the config's bundled weights; hf://OWNER/REPO[/PATH] works too
    config: str | None = None  # a preset, an official YAML or a config JSON (None: the bundled model)
    batch: BatchProfile | None = None  # None: BatchProfile()
    vae: Path | str | None = None
    weights: str = "ema"  # ema | raw | random
    trust: bool = False  # unpickle a checkpoint that safe loading refuses
    backend: str = "auto"  # auto: TensorRT if usable, else ONNX Runtime
    high_precision: str = DEFAULT_HIGH_PRECISION  # fp8: everything not in FP8
    calibration: Path | None = None  # fp8: a calibration folder (None: captured into the build)
    fp8_recipe: str | Path | Recipe | None = None  # fp8: a preset name, a recipe JSON or a Recipe
    opt_level: int = DEFAULT_OPT_LEVEL  # TensorRT builder optimization level
    timing_cache: Path | None = None  # TensorRT timing cache, read and updated
    force: bool = False  # rebuild a folder built from something else


@dataclass
class BuildResult:
    folder: Path
    backend: str
    manifest: Manifest
    reused: bool


def build_options(p: Precision, backend: str, high_precision: str, calibration: Path | None,
                  opt_level: int, recipe: Recipe | None = None) -> dict:
    """The build settings that change the artifact, as recorded in (and compared by) its provenance."""
    opts = {}
    if p.quantized:
        opts["fp8_recipe"] = (recipe or parse_recipe(None)).key()
        opts["high_precision"] = high_precision
        opts["calibration"] = str(Path(calibration).resolve()) if calibration else CAPTURED
    if backend == "tensorrt":
        opts["builder_optimization_level"] = opt_level
    return opts


def reuse_differences(folder: Path, asked: Provenance) -> list[str]:
    """Why a folder is not what this build would make ([] = reusable): its provenance, then its files."""
    try:
        man = read_manifest(folder)
    except ArtifactError as e:
        return [str(e)]
    diffs = man.provenance.diff(asked)
    if not diffs:
        try:
            verify_graphs(man, folder)
        except ArtifactError as e:
            diffs.append(str(e))
    return diffs


class _Model:
    """The fp32 PyTorch model of a checkpoint, loaded on first use (a reused build never imports torch)."""

    def __init__(self, ckpt: Path, cfg: Config, ref: WeightsRef, trust: bool):
        self.ckpt, self.cfg, self.ref, self.trust, self._model = ckpt, cfg, ref, trust, None

    def get(self):
        if self._model is None:
            from ..export.checkpoint import load_model, read_state_dict

            self._model = load_model(self.cfg.model, read_state_dict(self.ckpt, self.ref.kind, self.trust),
                                     str(self.ckpt))
        return self._model


def _export(model: _Model, out: Path, asked: Provenance, vae: Path | None, say: Say) -> Manifest:
    """The onnxruntime folder `out` of an exported precision, reused when its provenance is `asked`."""
    from ..export.exporter import ExportOptions, export_model

    if not reuse_differences(out, asked):
        say(f"{asked.precision} graphs in {out} are up to date")
        return read_manifest(out)
    say(f"exporting {asked.precision} graphs to {out}")
    return export_model(model.get(), model.cfg, out, model.ref, ExportOptions(
        precision=asked.precision, batch=asked.batch, vae_dir=vae, build_options=dict(asked.options), force=True),
        progress=say)


def _fp8(model: _Model, out: Path, asked: Provenance, vae: Path | None, o: BuildOptions, recipe: Recipe, say: Say,
         progress) -> Manifest:
    from ..runtime.sampling.grammar import default_schedule, parse_schedule, steps_for
    from . import calibrate
    from .quantize import quantize_folder

    high_precision, calibration = o.high_precision, o.calibration
    stages = out / "stages"
    stage = asked.replace(options={}, platform={})
    fp32 = _export(model, stages / "fp32", stage.replace(precision="fp32", vae=None), None, say)
    _export(model, stages / high_precision, stage.replace(precision=high_precision), vae, say)
    calib = Path(calibration) if calibration else out / "calibration"
    sampler = fp32.config.sampler
    steps = steps_for(parse_schedule(default_schedule(sampler)), sampler.num_steps)  # never dp: no engines needed
    want = calibrate.calibration_provenance(fp32.provenance, sampler, steps)
    try:  # a --calibration folder brings its own schedule (e.g. dp:K); a captured one uses the default
        diffs = calibrate.differences(calibrate.read_calibration(calib), want, any_schedule=calibration is not None)
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
    return quantize_folder(stages / "fp32", stages / high_precision, calib, out, provenance=asked, recipe=recipe,
                           high_precision=high_precision, force=True, say=say)


def build(precision: str, options: BuildOptions = BuildOptions(), *, out: Path | None = None, say: Say = print,
          progress=None) -> BuildResult:
    """Build (or reuse) the engine folder `out` for `precision`. See the module doc. Without `out`: builds
    engines/<precision> and points engines/default (what generate, serve, validate and bench read) at it."""
    if out is None:
        res = build(precision, options, out=DEFAULT_ENGINES.parent / precision, say=say, progress=progress)
        if point_default(res.folder, DEFAULT_ENGINES, say):
            say(f"{DEFAULT_ENGINES} -> {res.folder.name}")
        return res
    o, out = options, Path(out)
    p, recipe = _check(precision, o)
    from ..export.hub import checkpoint_source, vae_folder  # torch-free: local paths or hf://...

    cfg, batch = load_config(o.config), o.batch or BatchProfile()
    if recipe is not None:
        recipe.sites(cfg.model)  # a recipe that selects nothing (or a block this model lacks): refused first
    vae = vae_folder(o.vae, say)
    ckpt = o.ckpt if o.ckpt else bundled_weights(cfg)
    if ckpt is None:
        raise CheckpointError("--ckpt", f"a checkpoint (config {cfg.name} has no bundled weights)", "none")
    ckpt, digest, source = checkpoint_source(ckpt, say)
    ref = WeightsRef(digest, o.weights, source)
    chosen = _backend(o.backend, precision, say)
    asked = provenance_for(cfg, ref, precision, batch, vae, build_options(p, chosen, o.high_precision, o.calibration,
                                                                           o.opt_level, recipe),
                           running_platform() if chosen == "tensorrt" else None)
    with folder_lock(out):
        if (out / MANIFEST).is_file():
            diffs = reuse_differences(out, asked)
            if not diffs:
                say(f"{out} is up to date ({precision}, {chosen}); nothing to build")
                return BuildResult(out, chosen, read_manifest(out), reused=True)
            if not o.force:
                raise ArtifactError(str(out), f"a {precision} {chosen} build of this model and settings",
                                    "; ".join(diffs), "pass --force to rebuild it")
            say(f"rebuilding {out}: " + "; ".join(diffs))
        model = _Model(ckpt, cfg, ref, o.trust)
        onnx_dir = out if chosen == "onnxruntime" else out / "onnx"
        onnx_asked = asked if chosen == "onnxruntime" else asked.replace(platform={})
        if p.quantized:
            man = _fp8(model, onnx_dir, onnx_asked, vae, o, recipe, say, progress)
        else:
            man = _export(model, onnx_dir, onnx_asked, vae, say)
        if chosen == "tensorrt":
            man = build_tensorrt(onnx_dir, out, provenance=asked, timing_cache=o.timing_cache, opt_level=o.opt_level,
                                 say=say)
        elif not p.ort_cpu or (p.quantized and not high_precision_row(o.high_precision).ort_cpu):
            say("note: onnxruntime's CPU provider has no bfloat16 MatMul; this folder runs with onnxruntime-gpu "
                "(CUDAExecutionProvider) or as a TensorRT build")
    return BuildResult(out, chosen, man, reused=False)


def _check(precision: str, o: BuildOptions) -> tuple[Precision, Recipe | None]:
    """The precision's row and, for fp8, its recipe; every option checked before anything is read."""
    p = precision_row(precision)
    if p.quantized:
        high_precision_row(o.high_precision)
    elif o.fp8_recipe is not None:
        raise ConfigError("--fp8-recipe", "only with --precision fp8", f"--precision {precision}")
    recipe = (o.fp8_recipe if isinstance(o.fp8_recipe, Recipe) else parse_recipe(o.fp8_recipe)) if p.quantized \
        else None
    if o.backend not in CHOICES:
        raise ConfigError("--backend", " | ".join(CHOICES), o.backend)
    if o.weights not in WEIGHT_KINDS:
        raise CheckpointError("--weights", " | ".join(WEIGHT_KINDS), o.weights)
    return p, recipe


def _backend(asked: str, precision: str, say: Say) -> str:
    """tensorrt when it is usable and not declined, else onnxruntime (said, when auto chose it)."""
    usable, why = tensorrt_status()
    if asked == "tensorrt" and not usable:
        raise BackendError("TensorRT", "importable with a visible GPU", why, "build with --backend onnxruntime")
    chosen = "tensorrt" if usable and asked != "onnxruntime" else "onnxruntime"
    if chosen == "onnxruntime" and asked == "auto":
        say(f"TensorRT is not available ({why}): building the ONNX Runtime engine folder for {precision} instead")
    return chosen


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
