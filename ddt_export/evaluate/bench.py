"""`ddt-export bench`: where the time goes, engines against the PyTorch original, measured in one run.

- Stages: one encoder call, one decoder call (2B CFG rows), the VAE decoder (B rows), each timed alone.
- Runs: whole `generate` trajectories per batch size and schedule, on every loop the folder has (a TensorRT
  folder: the device loop and the host loop, side by side); images/s, and for the host loop the host's share
  (loop wall time minus time inside graph calls).
- Baselines: the PyTorch reference on the same weights and inputs — eager fp32 on CPU (the official loop:
  full 2B batch every step); on a GPU also bf16 eager and torch.compile.
- Sharing: the speed-up of each schedule over `all`, measured, against the FLOP model (`flops.py`).
Warm-up runs are excluded; every number is a median over repeats with its min/max spread.
Torch is imported only for the PyTorch baselines.
"""
from __future__ import annotations

import platform
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..core.artifacts import atomic_path, library_versions, write_json
from ..core.flops import step_flops
from ..core.log import Say
from ..core.noise import sample_noise
from ..runtime import load_engines, sample
from ..runtime.sampling.host import sample_host
from ..runtime.sampling.plan import network_flops, plan_steps
from ..runtime.sampling.plans import lookup
from ..runtime.sampling.request import CLI, RequestInput, resolve
from ..runtime.sampling.schedules import resolve_schedule

DEFAULT_BATCHES = (1, 4)
DEFAULT_SCHEDULES = ("all", "uniform:2")
DEFAULT_REPEATS = 3
TORCH_VARIANTS = ("torch-eager-fp32", "torch-eager-bf16", "torch-compile-bf16")  # = export.reference.VARIANTS


@dataclass
class Timing:
    median: float
    lo: float
    hi: float
    n: int

    @staticmethod
    def of(xs: Sequence[float]) -> "Timing":
        return Timing(statistics.median(xs), min(xs), max(xs), len(xs))


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return Timing.of(xs)


class TimedEngines:
    """Engines (a `runtime.graphs.engines.Graphs`) whose graph calls add their wall time to `spent[graph]`."""

    def __init__(self, engines):
        self._e = engines
        self.config, self.max_batch, self.min_batch = engines.config, engines.max_batch, engines.min_batch
        self.spent = defaultdict(float)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = self._e.run(graph, feeds)
        self.spent[graph] += time.perf_counter() - t0
        return out


@dataclass
class BenchResult:
    model: str
    engines: str
    backend: str
    precision: str
    steps: int
    machine: dict = field(default_factory=dict)
    stages: list = field(default_factory=list)  # {backend, graph, batch(rows), ms: Timing}
    runs: list = field(default_factory=list)  # {backend, batch, schedule, cond_only, s: Timing, images_per_s, ...}
    sharing: list = field(default_factory=list)  # {backend, batch, schedule, predicted, measured}


def machine_info() -> dict:
    import os

    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "versions": library_versions(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return info


def torch_reference(engines, variant: str):
    """The PyTorch reference of `variant` on the engines' model, or the reason it is not available here."""
    from ..core.errors import DDTExportError

    try:
        from ..export.reference import TorchReference
    except ImportError:
        return "needs PyTorch (the [export] extra)"
    try:
        return TorchReference(engines.manifest, variant)
    except DDTExportError as e:  # no GPU for a GPU variant, a checkpoint that is gone or changed: skipped, said
        return str(e)


@dataclass(frozen=True)
class BenchOptions:
    """What `bench` measures."""

    batches: Sequence[int] = DEFAULT_BATCHES  # images per trajectory (the CFG batch is twice this)
    steps: int | None = None  # sampling steps (default: the manifest's)
    schedules: Sequence[str] = DEFAULT_SCHEDULES  # `all` always runs: the reference for measured speed-ups
    repeats: int = DEFAULT_REPEATS  # timed repeats per measurement, after one warm-up
    torch_variants: Sequence[str] | None = None  # None: TORCH_VARIANTS; (): no PyTorch baseline
    cond_only: Sequence[bool] = (True,)  # cond-only rows outside the guidance interval, or the full batch
    device_loop: bool = True  # on a TensorRT folder, time the device loop beside the host loop
    solver: str | None = None  # every run's solver and forecast (default: the manifest's)
    forecast: int | None = None
    plan: str | None = None  # a stored plan, timed against the model's reference trajectory (its own steps)


def bench(engines_dir: Path, options: BenchOptions = BenchOptions(), *, say: Say = print) -> BenchResult:
    """Everything in the module doc. On a folder with a device loop (TensorRT) both loops are timed, side by side
    (`device_loop=False`: the host loop only); the host loop's share is measured on the host loop."""
    o = options
    with load_engines(engines_dir, device_loop=o.device_loop) as engines:
        specs = ["all"] + [s for s in o.schedules if s != "all"]  # the reference for measured speed-ups
        if o.plan is not None:  # the plan against the model's reference trajectory
            asked = {"all": RequestInput(), f"plan:{o.plan}": RequestInput(plan=o.plan)}
        else:
            asked = {spec: RequestInput(steps=o.steps, schedule=spec, solver=o.solver, forecast=o.forecast)
                     for spec in specs}
        plans = lookup(engines.folder, engines.manifest)
        requests = {k: resolve_schedule(resolve(engines.config, g, CLI, plans), engines, say) for k, g in asked.items()}
        sampler = requests["all"].sampler
        resolved = {spec: (r.sampler, list(r.recompute)) for spec, r in requests.items()}
        res = BenchResult(engines.config.name, str(engines_dir), engines.backend_name, engines.manifest.precision,
                          sampler.num_steps, machine_info())
        _stages(engines, res, o)
        _trajectories(engines, res, sampler, resolved, o, say)
        _baselines(engines, res, sampler, resolved, o, say)
        return res


def _stages(engines, res: BenchResult, o: BenchOptions) -> None:
    """One call of each graph, alone, at each batch's CFG rows."""
    rng, m = np.random.default_rng(0), engines.config.model
    for b in o.batches:
        rows = 2 * b
        x = rng.standard_normal((rows, *m.latent_shape), dtype=np.float32)
        t = np.full(rows, 0.5, np.float32)
        y = np.zeros(rows, np.int64)
        s = engines.encoder(x=x, t=t, y=y)
        res.stages.append({"backend": engines.backend_name, "graph": "encoder", "rows": rows,
                           "s": asdict(timeit(lambda: engines.encoder(x=x, t=t, y=y), o.repeats))})
        res.stages.append({"backend": engines.backend_name, "graph": "decoder", "rows": rows,
                           "s": asdict(timeit(lambda: engines.decoder(x=x, s=s), o.repeats))})
        if engines.vae_decoder is not None:
            res.stages.append({"backend": engines.backend_name, "graph": "vae_decoder", "rows": b,
                               "s": asdict(timeit(lambda: engines.vae_decoder(x[:b]), o.repeats))})


def _trajectories(engines, res: BenchResult, sampler, resolved: dict[str, tuple], o: BenchOptions,
                  say: Say) -> None:
    """Whole trajectories on each loop the folder has (device first: what `sample` runs), and sharing's
    speed-up over `all`, measured against the FLOP model."""
    m, flops = engines.config.model, step_flops(engines.config.model)
    loops = ("device", "host") if engines.loop == "device" else ("host",)
    for loop, b in ((lp, b) for lp in loops for b in o.batches):
        name = engines.backend_name if loop == "host" else f"{engines.backend_name} device loop"
        noise, labels = sample_noise(0, range(b), m.latent_shape), np.arange(b, dtype=np.int64) % m.num_classes
        for co in o.cond_only:
            base = None
            for spec, (smp, sched) in resolved.items():
                timed = TimedEngines(engines)

                def run():  # the device loop runs its graphs itself: only the host loop's calls are timed
                    if loop == "host":
                        return sample_host(timed, noise, labels, smp, sched, cond_only_outside=co)
                    return sample(engines, noise, labels, smp, sched, cond_only_outside=co)

                run()  # warm-up
                walls, host = [], []
                for _ in range(o.repeats):
                    timed.spent.clear()
                    t0 = time.perf_counter()
                    run()
                    w = time.perf_counter() - t0
                    walls.append(w)
                    host.append((w - sum(timed.spent.values())) / w)
                tm = Timing.of(walls)
                run_rec = {"backend": name, "loop": loop, "batch": b, "schedule": spec, "cond_only": co,
                           "steps": smp.num_steps, "solver": smp.solver, "forecast": smp.forecast,
                           "encoder_calls": len(sched), "s": asdict(tm), "images_per_s": b / tm.median}
                if loop == "host":  # inside the device loop graph calls are not separate host calls
                    run_rec["host_fraction"] = statistics.median(host)
                res.runs.append(run_rec)
                say(f"{name:>12} batch {b:>3} {spec:>12} cond_only={co}: {run_rec['images_per_s']:.3f} img/s"
                    + (f" (host {run_rec['host_fraction']:.1%})" if loop == "host" else ""))
                if spec == "all":
                    base = tm.median
            cost = {spec: network_flops(plan_steps(smp, sched, co), flops.encoder, flops.decoder)
                    for spec, (smp, sched) in resolved.items()}
            for r in res.runs:
                if r["batch"] == b and r["cond_only"] == co and r["backend"] == name and base:
                    # predicted: the FLOP model's network work of `all` over this run's (rows of each graph)
                    res.sharing.append({"backend": r["backend"], "batch": b, "schedule": r["schedule"],
                                        "cond_only": co, "recompute_fraction": r["encoder_calls"] / r["steps"],
                                        "gflop_per_image": cost[r["schedule"]] / 1e9,
                                        "predicted": cost["all"] / cost[r["schedule"]],
                                        "measured": base / r["s"]["median"]})


def _baselines(engines, res: BenchResult, sampler, resolved: dict[str, tuple], o: BenchOptions,
               say: Say) -> None:
    """The PyTorch reference: the official loop, same weights, noise, labels and schedules."""
    m = engines.config.model
    for variant in TORCH_VARIANTS if o.torch_variants is None else o.torch_variants:
        ref = torch_reference(engines, variant)
        if isinstance(ref, str):
            say(f"{variant}: skipped ({ref})")
            continue
        for b in o.batches:
            for graph in ("encoder", "decoder"):
                res.stages.append({"backend": variant, "graph": graph, "rows": 2 * b,
                                   "s": asdict(timeit(ref.stage(graph, 2 * b), o.repeats))})
            noise, labels = sample_noise(0, range(b), m.latent_shape), np.arange(b, dtype=np.int64) % m.num_classes
            for spec, (smp, sched) in resolved.items():
                if smp.order != 1 or smp.forecast:  # the PyTorch reference is the official Euler loop
                    continue
                tm = timeit(lambda: ref.sample(noise, labels, smp, sched), o.repeats)
                res.runs.append({"backend": variant, "batch": b, "schedule": spec, "cond_only": False,
                                 "encoder_calls": len(sched), "s": asdict(tm), "images_per_s": b / tm.median})
                say(f"{variant:>12} batch {b:>3} {spec:>12}: {b / tm.median:.3f} img/s")


def write_outputs(res: BenchResult, json_path: Path | None, plot_path: Path | None) -> None:
    if json_path:
        write_json(Path(json_path), asdict(res))
    if plot_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = defaultdict(list)
        for r in res.runs:
            series[(r["backend"], r["schedule"], r["cond_only"])].append((r["batch"], r["images_per_s"]))
        for (backend, spec, co), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{backend} {spec}" + (" cond-only" if co else ""))
        ax.set_xlabel("batch (images)")
        ax.set_ylabel("images / s")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{res.model} {res.precision}, {res.steps} steps")
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(Path(plot_path)) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
