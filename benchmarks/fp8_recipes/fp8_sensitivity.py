"""Which DDT GEMMs carry the FP8 error: one GEMM group at a time in FP8, the rest in fp16; then FID.

    python benchmarks/fp8_recipes/fp8_sensitivity.py deviation    # every group + the presets: final-latent deviation
    python benchmarks/fp8_recipes/fp8_sensitivity.py calibration  # max vs entropy, rows of all steps vs per phase
    python benchmarks/fp8_recipes/fp8_sensitivity.py fid --recipes ffn+qkv all --seeds 0 1 2
    python benchmarks/fp8_recipes/fp8_sensitivity.py fid --num 2000 --recipes mix-ffn+qkv  # extends the 500-sample runs
    python benchmarks/fp8_recipes/fp8_sensitivity.py xl           # ddt-xl-cpu (random weights): the same recipes
    python benchmarks/fp8_recipes/fp8_sensitivity.py report       # tables + docs/img/fp8-pareto.png from the JSON

Every FP8 number here is ONNX Runtime CPU emulating ModelOpt's Q/DQ graphs (QuantizeLinear to E4M3, then
DequantizeLinear to fp16 around an fp16 MatMul); no TensorRT, no GPU. Each recipe is quantized from one fp32 +
fp16 export and one calibration set (`build --precision fp8` stages), so recipes differ only in their Q/DQ.
Deviation: per-sample ||x_fp8 - x_fp32|| / ||x_fp32|| of the final latents from the same noise (core.noise,
seed --seed), schedule `all`, the production host loop (runtime.sample). FID: 500 samples per seed (--num;
more extends the cached 500-sample runs with samples 500.., after checking samples 0..3 come out the same) against
the bundled digits statistics (benchmarks/common/digits.py's `fid_run`), paired with fp32 on the same noise; the
paired bootstrap resamples the sample indices (same indices on both sides) per seed, and the 95% interval is
that of the 3-seed mean. Predicted speed-up: `core.flops.fp8_speedup` of the recipe's FP8 share of a step's
FLOPs (both graphs), FP8 at 2x fp16 (H100/H200 dense tensor cores), for the digits model and for DDT-XL/256.
Results go to fp8_sensitivity.json (this folder) as each one is measured (a rerun skips what is there).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]  # run as a script: this checkout's ddt_export and benchmarks.common

from benchmarks.common.digits import limit_threads  # noqa: E402
from ddt_export.builder.engine import BuildOptions, build, reuse_differences  # noqa: E402
from ddt_export.builder.quantize import quantize_folder  # noqa: E402
from ddt_export.builder.recipes import PRESETS, Recipe  # noqa: E402
from ddt_export.core.artifacts import write_json  # noqa: E402
from ddt_export.core.config import PRESETS as MODELS  # noqa: E402
from ddt_export.core.manifest import read_manifest  # noqa: E402
from ddt_export.core.noise import StepNoise, sample_noise  # noqa: E402
from ddt_export.core.numerics import relative_errors  # noqa: E402
from ddt_export.runtime import load_engines, sample  # noqa: E402
from ddt_export.runtime.sampling.request import RequestInput, make_labels, resolve_sampler  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "fp8_sensitivity.json"
WORK = ROOT / "engines" / "fp8_study"
XL_PRESET = "ddt-xl-256"  # the deployment shape the predicted speed-ups are quoted for
BAR = 0.05  # |dFID| within noise: 3-seed mean of |dFID| and the paired 95% interval (issue 15)

# One group at a time (everything else fp16): roles, encoder vs decoder, first/middle/last block.
GROUPS = [Recipe(f"only-{n}", quantize=(rule,)) for n, rule in (
    ("qkv", "qkv"), ("proj", "proj"), ("ffn", "ffn"), ("w1w3", "w1,w3"), ("w2", "w2"), ("adaLN", "adaLN"),
    ("adaLN-enc", "adaLN@encoder"), ("adaLN-dec", "adaLN@decoder"), ("encoder", "*@encoder"),
    ("decoder", "*@decoder"), ("first", "*@first"), ("middle", "*@middle"), ("last", "*@last"))]
# Compositions, chosen after the single-group FIDs (the decoder's GEMMs move FID least, the encoder's qkv most)
CANDIDATES = [Recipe(f"mix-{n}", quantize=rules) for n, rules in (
    ("dec+ffn-enc", ("*@decoder", "ffn@encoder")), ("dec+w1w3-enc", ("*@decoder", "w1,w3@encoder")),
    ("dec+w2-enc", ("*@decoder", "w2@encoder")), ("ffn-enc", ("ffn@encoder",)), ("w1w3+adaLN", ("w1,w3", "adaLN")),
    # second round: groups that raise FID alone and spread the samples (qkv, proj, the decoder's adaLN) with groups
    # that lower it and contract them (FFN, w1/w3, w2), so that the two shifts offset
    ("ffn+qkv", ("ffn", "qkv")), ("dec+ffn+qkv-enc", ("*@decoder", "ffn@encoder", "qkv@encoder")))]
# Calibration choices the ONNX FP8 path offers, on the all-GEMMs recipe (where the differences are largest)
CALIBRATION = [Recipe("all-entropy", calibration="entropy"), Recipe("all-guided-rows", calibration_rows="guided"),
               Recipe("all-unguided-rows", calibration_rows="unguided")]


def recipe_named(name: str) -> Recipe:
    return {r.name: r for r in (*GROUPS, *CANDIDATES, *CALIBRATION, *PRESETS.values())}[name]


def use(work: Path | None = None, results: Path | None = None) -> None:
    """Another work folder and results JSON than the study's own (a smoke run that leaves both alone)."""
    global WORK, RESULTS
    WORK, RESULTS = Path(work or WORK), Path(results or RESULTS)


def load() -> dict:
    import json

    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save(section: str, key: str, value) -> None:
    res = load()
    res.setdefault(section, {})[key] = value
    write_json(RESULTS, res)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shares(recipe: Recipe, model: str) -> dict:
    out = {}
    for name, key in ((model, "model"), (XL_PRESET, "xl256")):
        s = recipe.share(MODELS[name].model)
        out[key] = {"of_block_gemm_flops": s.of_block_gemms, "of_step_flops": s.of_step,
                    "predicted_speedup": s.predicted_speedup}
    return out


# ------------------------------------------------------------------------------------------ artifacts


def digits_base() -> Path:
    """The bundled model's fp8 build with the `all` recipe: its stages (fp32, fp16) and calibration are shared."""
    out = WORK / "digits" / "base"
    build("fp8", BuildOptions(backend="onnxruntime", fp8_recipe="all"), out=out, say=lambda m: say("  " + m))
    return out


def xl_base(num: int, steps: int) -> Path:
    """ddt-xl-cpu, random weights seed 0: fp32 + fp16 exports and a short calibration (num images, steps)."""
    from ddt_export.builder.calibrate import capture
    from ddt_export.export.exporter import ExportOptions, export_checkpoint

    base = WORK / "xl-cpu" / "base"
    for prec in ("fp32", "fp16"):
        if not (base / "stages" / prec / "manifest.json").is_file():
            say(f"exporting ddt-xl-cpu {prec} (random weights)")
            export_checkpoint(None, "ddt-xl-cpu", base / "stages" / prec, weights="random",
                              options=ExportOptions(precision=prec, force=True))
    if not (base / "calibration" / "manifest.json").is_file():
        say(f"calibrating ddt-xl-cpu ({num} images, {steps} steps)")
        capture(base / "stages" / "fp32", base / "calibration", RequestInput(num=num, steps=steps), say=say)
    return base


def quantized(base: Path, recipe: Recipe, where: Path) -> Path:
    """`base`'s stages quantized by `recipe` into where/<name>, reused when its provenance matches."""
    man = read_manifest(base / "stages" / "fp32")
    out = where / recipe.name
    opts = {"fp8_recipe": recipe.key(), "high_precision": "fp16", "calibration": str((base / "calibration").resolve())}
    asked = man.provenance.replace(precision="fp8", options=opts)
    if reuse_differences(out, asked):
        t0 = time.time()
        quantize_folder(base / "stages" / "fp32", base / "stages" / "fp16", base / "calibration", out,
                        provenance=asked, recipe=recipe, force=True, say=lambda m: None)
        say(f"  quantized {recipe.name} ({time.time() - t0:.0f} s)")
    return out


class PhaseEngines:
    """Study only: two FP8 folders switched by guidance phase (scales calibrated per phase), as one `Graphs`
    (runtime.graphs.engines) for the host loop. Its observer sees each call's step just before the call, which
    picks the folder for that call."""

    loop = "host"  # `sample` runs the host loop (an observer needs it anyway)

    def __init__(self, guided, unguided, guided_steps: set[int]):
        self.guided, self.unguided, self.steps = guided, unguided, guided_steps
        self.config, self.max_batch, self.min_batch = guided.config, guided.max_batch, guided.min_batch
        self.current = guided

    def observe(self, graph: str, step: int, inputs: dict) -> None:
        self.current = self.guided if step in self.steps else self.unguided

    def run(self, graph: str, feeds: dict) -> dict:
        return self.current.run(graph, feeds)


def with_headroom(folder: Path, factor: float) -> Path:
    """Study only: a copy of an FP8 folder with every activation Q/DQ scale times `factor` (amax headroom:
    FP8 loses no precision to a larger scale until values reach the subnormals, and saturates nothing).
    ModelOpt has no such option; the scales are edited after it, and the manifest's sha256s follow."""
    import hashlib
    import json
    import shutil

    import onnx
    from onnx import numpy_helper

    out = folder.parent / f"{folder.name}-headroom{factor:g}"
    if (out / "manifest.json").is_file():
        return out
    shutil.copytree(folder, out, dirs_exist_ok=True)
    man = json.loads((out / "manifest.json").read_text())
    for g in ("encoder", "decoder"):
        m = onnx.load(str(out / f"{g}.onnx"))
        inits = {i.name: i for i in m.graph.initializer}
        consumers = {}
        for n in m.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        names = set()
        for n in m.graph.node:  # activations: a QuantizeLinear of a computed tensor, and its DequantizeLinear(s)
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
                names.add(n.input[1])
                names.update(d.input[1] for d in consumers.get(n.output[0], []) if d.op_type == "DequantizeLinear")
        for name in names:
            a = numpy_helper.to_array(inits[name])
            inits[name].CopyFrom(numpy_helper.from_array((a * factor).astype(a.dtype), name))
        onnx.save(m, str(out / f"{g}.onnx"))
        man["graphs"][g]["sha256"] = hashlib.sha256((out / f"{g}.onnx").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(man, indent=2))
    return out


def latents(folder: Path | tuple, num: int, seed: int, steps: int | None = None) -> np.ndarray:
    """Final latents of `num` samples (classes cycled) from seed `seed`, schedule all, production host loop."""
    if isinstance(folder, tuple):  # (guided folder, unguided folder): per-phase scales
        from ddt_export.builder.recipes import phase_steps

        with load_engines(folder[0], "onnxruntime") as g, load_engines(folder[1], "onnxruntime") as u:
            sampler = resolve_sampler(g.config.sampler, RequestInput(steps=steps))
            eng = PhaseEngines(g, u, phase_steps(sampler, "guided"))
            return _sample(eng, sampler, num, seed, eng.observe)
    with load_engines(folder, "onnxruntime") as eng:
        return _sample(eng, resolve_sampler(eng.config.sampler, RequestInput(steps=steps)), num, seed, None)


def _sample(eng, sampler, num: int, seed: int, observer) -> np.ndarray:
    m = eng.config.model
    noise = sample_noise(seed, range(num), m.latent_shape)
    labels = make_labels(m.num_classes, RequestInput(num=num))
    return sample(eng, noise, labels, sampler, list(range(sampler.num_steps)), observer=observer,
                  rng=StepNoise(seed, range(num)))


def deviation_rows(base: Path, model: str, recipes, section: str, num: int, seed: int, steps: int | None = None):
    """Final-latent deviation from fp32 of each recipe (and of the fp16 export: the floor), saved one by one."""
    done = load().get(section, {})
    ref_path = base.parent / f"fp32-latents-n{num}-s{seed}-steps{steps}.npy"
    if not ref_path.is_file():
        say(f"{section}: fp32 reference latents ({num} samples)")
        np.save(ref_path, latents(base / "stages" / "fp32", num, seed, steps))
    ref = np.load(ref_path)
    where = base.parent / "recipes"
    for r in [None, *recipes]:
        name = "fp16" if r is None else (r if isinstance(r, str) else r.name)
        if name in done and done[name].get("num") == num:
            continue
        t0 = time.time()
        if r is None:
            folder, row = base / "stages" / "fp16", {"recipe": None}
        elif isinstance(r, str) and r == "per-phase":  # the guided- and unguided-row folders, by phase
            folder = tuple(where / f"all-{p}-rows" for p in ("guided", "unguided"))
            row = {"recipe": {**PRESETS["all"].to_dict(), "name": r, "calibration_rows": "per phase (two graphs)"},
                   "shares": shares(PRESETS["all"], model)}
        elif isinstance(r, str) and r.startswith("all-headroom"):  # activation scales x N after ModelOpt
            folder = with_headroom(quantized(base, PRESETS["all"], where), float(r.removeprefix("all-headroom")))
            row = {"recipe": {**PRESETS["all"].to_dict(), "name": r, "calibration": f"max x {r[12:]}"},
                   "shares": shares(PRESETS["all"], model)}
        else:
            folder = quantized(base, r, where)
            q = read_manifest(folder).graphs
            row = {"recipe": r.to_dict(), "shares": shares(r, model),
                   "graph_rel_l2": {g: q[g].parity["vs_fp32_onnx"]["rel_l2"] for g in ("encoder", "decoder")}}
        err = relative_errors(latents(folder, num, seed, steps), ref)
        row.update(num=num, seed=seed, mean=float(err.mean()), max=float(err.max()), seconds=time.time() - t0)
        save(section, name, row)
        say(f"{section} {name}: mean {row['mean']:.2e} max {row['max']:.2e} ({row['seconds']:.0f} s)")


# ------------------------------------------------------------------------------------------ FID


def svc_accuracy(lat: np.ndarray, clfs) -> float:
    """fid_digits' recognition rate (RBF SVC on the pixels) of latents sampled with classes cycled by index."""
    labels = make_labels(MODELS["ddt-tiny-digits"].model.num_classes, RequestInput(num=len(lat)))
    svc = next(clf for name, clf, _ in clfs if name == "svc")
    return float((svc.predict(np.clip(lat, -1, 1).reshape(len(lat), -1)) == labels).mean())


FIRST = 500  # the FID runs' sample count; larger runs reuse these samples and sample only the rest


def tail_latents(folder: Path, seed: int, start: int, stop: int, chunk: int = 250) -> np.ndarray:
    """Final latents of samples start..stop-1 of a `generate(folder, num=stop, seed=seed, schedule="all")` run:
    per-sample noise (core.noise: seed, index) and labels cycled by index, so samples 0..start-1 are a shorter
    run's (checked on every extension: its first samples again, against the shorter run's)."""
    with load_engines(folder, "onnxruntime") as eng:
        m, sampler = eng.config.model, eng.config.sampler
        labels = make_labels(m.num_classes, RequestInput(num=stop))
        out = []
        for lo in range(start, stop, chunk):
            idx = range(lo, min(lo + chunk, stop))
            out.append(sample(eng, sample_noise(seed, idx, m.latent_shape), labels[idx.start:idx.stop], sampler,
                              list(range(sampler.num_steps)), cond_only_outside=True, rng=StepNoise(seed, idx)))
            say(f"    {folder.name} seed {seed}: samples {idx.start}..{idx.stop - 1}")
        return np.concatenate(out)


def fid_rows(base: Path, names: list[str], seeds: list[int], num: int, draws: int) -> None:
    from benchmarks.common.digits import bootstrap_draws, classifiers, fid_run
    from ddt_export.core.images import images_from_samples
    from ddt_export.evaluate.features import DIGITS_STATS, DigitsFeatures
    from ddt_export.evaluate.fid import fid, load_stats, stats_from_features

    data, ext, clfs = load_stats(DIGITS_STATS), DigitsFeatures(), classifiers()
    cache = WORK / "digits" / "fid"
    cache.mkdir(parents=True, exist_ok=True)

    def run(name: str, folder: Path, seed: int) -> dict:
        f = cache / f"{name}-s{seed}-n{num}.npz"
        first = cache / f"{name}-s{seed}-n{FIRST}.npz"
        if not f.is_file() and num > FIRST and first.is_file():  # samples 0..FIRST-1 are those already run
            with np.load(first) as z:
                head = {k: z[k] for k in z.files}
            again = relative_errors(tail_latents(folder, seed, 0, 4), head["latents"][:4])
            if not again.max() < 1e-4:
                raise RuntimeError(f"{name} seed {seed}: samples 0..3 again differ from the {FIRST}-sample run "
                                   f"by {again.max():.2e}: the tail would not continue that run")
            t0 = time.time()
            tail = tail_latents(folder, seed, FIRST, num)
            lat = np.concatenate([head["latents"], tail])
            feats = np.concatenate([head["features"], ext.extract(images_from_samples(tail))])
            value = fid(stats_from_features(feats), data)
            np.savez(f, features=feats, latents=lat, fid=value, seconds=head["seconds"] + time.time() - t0,
                     svc=svc_accuracy(lat, clfs))
            say(f"  FID {name} seed {seed}: {value:.3f} ({num} samples, {time.time() - t0:.0f} s for the last "
                f"{num - FIRST})")
        if not f.is_file():
            r = fid_run(folder, num, seed, "all", data, ext, clfs)
            np.savez(f, features=r["features"], latents=r["latents"], fid=r["fid"], seconds=r["seconds"],
                     svc=r["recognized"]["svc"])
            say(f"  FID {name} seed {seed}: {r['fid']:.3f} ({r['seconds']:.0f} s)")
        with np.load(f) as z:
            return {k: z[k] for k in z.files}

    ref = {s: run("fp32", base / "stages" / "fp32", s) for s in seeds}
    for name in names:
        recipe = recipe_named(name)
        folder = quantized(base, recipe, base.parent / "recipes")
        per = {s: run(name, folder, s) for s in seeds}
        deltas = [float(per[s]["fid"] - ref[s]["fid"]) for s in seeds]
        boots = [bootstrap_draws(per[s]["features"], ref[s]["features"], data, draws, 1000 + s) for s in seeds]
        mean = np.mean(boots, axis=0)
        lo, hi = float(np.percentile(mean, 2.5)), float(np.percentile(mean, 97.5))
        mean_abs = statistics.mean(abs(d) for d in deltas)
        pooled = [np.concatenate([runs[s]["features"] for s in seeds]) for runs in (per, ref)]
        pooled_delta = fid(stats_from_features(pooled[0]), data) - fid(stats_from_features(pooled[1]), data)
        row = {"recipe": recipe.to_dict(), "shares": shares(recipe, "ddt-tiny-digits"),
               "num": num, "seeds": seeds, "fid": [float(per[s]["fid"]) for s in seeds],
               "fid_fp32": [float(ref[s]["fid"]) for s in seeds], "delta": deltas,
               "mean_delta": statistics.mean(deltas),
               "mean_abs_delta": mean_abs, "ci95": [lo, hi], "pooled_delta": float(pooled_delta),
               "bootstrap_sd": [float(b.std(ddof=1)) for b in boots],
               # > 0: FP8 spreads the samples' features, < 0: contracts them (the generated trace exceeds the data's)
               "trace_change": [float(np.trace(np.cov(per[s]["features"], rowvar=False))
                                      - np.trace(np.cov(ref[s]["features"], rowvar=False))) for s in seeds],
               "trace_fp32": [float(np.trace(np.cov(ref[s]["features"], rowvar=False))) for s in seeds],
               "trace_data": float(np.trace(data.sigma)),
               "deviation": float(np.mean([relative_errors(per[s]["latents"], ref[s]["latents"]).mean()
                                           for s in seeds])),
               "svc": [float(per[s]["svc"]) for s in seeds], "draws": draws,
               "meets_bar": bool(mean_abs <= BAR and (lo <= 0 <= hi or (-BAR <= lo and hi <= BAR)))}
        section = "fid" if len(seeds) > 1 else f"fid-seed{seeds[0]}"
        save(section if num == FIRST else f"{section}-n{num}", name, row)
        say(f"FID {name}: deltas {', '.join(f'{d:+.3f}' for d in deltas)}, mean |d| {mean_abs:.3f}, "
            f"95% [{lo:+.3f}, {hi:+.3f}], bar {'met' if row['meets_bar'] else 'missed'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["deviation", "calibration", "fid", "xl", "report"])
    p.add_argument("--num", type=int, default=None, help="samples (deviation 100, FID 500, xl 2)")
    p.add_argument("--seed", type=int, default=100, help="noise seed of the deviation runs (FID uses --seeds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=None,
                   help="recipes (fid: default all presets; xl: only these, default every group + the presets)")
    p.add_argument("--steps", type=int, default=20, help="xl: sampling and calibration steps")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help=f"engines and caches (default {WORK})")
    p.add_argument("--results", type=Path, default=None, help=f"the results JSON (default {RESULTS.name} here)")
    a = p.parse_args(argv)
    use(a.work, a.results)
    if a.what == "report":
        from benchmarks.fp8_recipes.fp8_report import report

        return report(load())
    limit_threads(a.threads)
    presets = [recipe_named(n) for n in (a.recipes or PRESETS)]
    if a.what == "deviation":
        deviation_rows(digits_base(), "ddt-tiny-digits", GROUPS + CANDIDATES + presets, "deviation", a.num or 100,
                       a.seed)
    elif a.what == "calibration":
        deviation_rows(digits_base(), "ddt-tiny-digits", [PRESETS["all"], *CALIBRATION, "per-phase", "all-headroom4"],
                       "calibration", a.num or 100, a.seed)
    elif a.what == "fid":
        fid_rows(digits_base(), a.recipes or list(PRESETS), a.seeds, a.num or 500, a.bootstrap)
    elif a.what == "xl":
        chosen = presets if a.recipes else GROUPS + presets  # --recipes: only those (the groups cost minutes each)
        deviation_rows(xl_base(2, a.steps), "ddt-xl-cpu", chosen, "xl", a.num or 2, a.seed, a.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
