"""The one GPU check (scripts/gpu_check.sh wraps it): everything that needs a GPU, in one bounded run.

    python scripts/gpu_check.py RESULTS_DIR [--dry-run] [--budget-s 440]

Writes RESULTS_DIR/gpu_check.json after every step (a run cut short still leaves what it measured); the shell
wrapper tees the log to RESULTS_DIR/gpu_check.log. Assumes PyTorch with CUDA, cuda-bindings, the NVRTC wheel
and onnxruntime, no network, maybe no TensorRT. Every step is recorded as ran / failed / skipped, each skip
with its reason (no GPU, no provider, `import tensorrt` failed, the time budget). Steps, most important first:

  environment     GPU, driver, torch / onnxruntime providers / TensorRT / cuda-bindings / NVRTC, tensorrt_status
  nvrtc-kernel    the device loop's kernels (a cubin for this GPU): CFG + Euler, CFG + adams:K, the forecast of s,
                  against the host loop's numpy arithmetic (bit-exact expected; gpu_check_sampling.py)
  gpu-tests       pytest -m "gpu or tensorrt" (TensorRT build, device loop, FP8 engine, where tensorrt imports)
  cost-curve      per-call seconds against rows: DDT-XL 256 encoder / decoder and the sd-vae-ft-ema decoder,
                  PyTorch bf16 eager, random weights (the serve simulator's GPU cost curve)
  torch-eager     DDT-XL 256 random weights, bf16 eager, batch 1/8/32, 50 steps, all and uniform:2, images/s
  ort-cuda        onnxruntime's CUDAExecutionProvider on the bundled digits model against its CPU provider
  tensorrt        digits model: TensorRT fp16 build, device loop against host loop (images/s), FP8 engine
  fast-plan       the folders built above: a fast plan (the stored `fast`, else a stand-in: adams:3, 10 steps,
                  uniform:2, forecast 1) against the model's default plan, images/s per loop; the device loop's
                  fast plan against its host loop (gpu_check_sampling.py)
  torch-compile   as torch-eager with torch.compile (compilation dominates: last, so the budget cuts it first)
--dry-run runs the environment probe only (CPU is fine) and lists what each step would do or why it would skip.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_check_sampling import fast_plan, nvrtc_kernel  # noqa: E402 - the sampling steps, beside this file

BUDGET_S = 440  # of the wrapper's 480 s: JSON, log and interpreter exit fit in the rest
BATCHES = (1, 8, 32)
STEPS = 50
SCHEDULES = ("all", "uniform:2")
ROWS = (1, 2, 4, 8, 16, 32, 64)
VAE_ROWS = (1, 2, 4, 8, 16)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)  # sd-vae-ft-ema


def probe() -> dict:
    """What this machine has; cheap, CPU-safe."""
    env = {"python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = (r.stdout or r.stderr).strip()
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.cuda.is_available()
        if env["torch_cuda"]:
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except ImportError as e:
        env["torch"], env["torch_cuda"] = f"not importable: {e}", False
    try:
        import onnxruntime as ort

        env["onnxruntime"], env["ort_providers"] = ort.__version__, ort.get_available_providers()
    except ImportError as e:
        env["onnxruntime"], env["ort_providers"] = f"not importable: {e}", []
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except Exception as e:  # noqa: BLE001 - ImportError or OSError (libnvinfer)
        env["tensorrt"] = f"not importable: {type(e).__name__}: {e}"
    try:
        from cuda.bindings import nvrtc
        from cuda.bindings import runtime as cudart

        env["cuda_runtime"] = cudart.cudaRuntimeGetVersion()[1]
        env["cuda_driver"] = cudart.cudaDriverGetVersion()[1]
        err, n = cudart.cudaGetDeviceCount()
        env["cuda_devices"] = int(n or 0) if int(err) == 0 else 0
        from ddt_export.runtime.graphs.trt_plan import cuda_reason

        env["cuda_reason"] = cuda_reason(getattr(err, "name", str(err)), int(n or 0), int(env["cuda_driver"] or 0),
                                         int(env["cuda_runtime"] or 0)) or "ok"
        env["nvrtc"] = ".".join(map(str, nvrtc.nvrtcVersion()[1:]))
    except Exception as e:  # noqa: BLE001
        env["cuda_bindings"] = f"unusable: {type(e).__name__}: {e}"
    from ddt_export.builder.tensorrt import tensorrt_status

    env["tensorrt_status"] = dict(zip(("usable", "why"), tensorrt_status()))
    return env


class Check:
    def __init__(self, out: Path, dry: bool, budget: float):
        self.out, self.dry, self.budget, self.t0 = out, dry, budget, time.monotonic()
        self.doc = {"dry_run": dry, "budget_s": budget, "steps": [], "results": {}}
        self.folders: dict[str, tuple[Path, dict]] = {}  # GPU engine folders built by a step: (folder, load kwargs)
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / ".gpu_check.json.partial"
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / "gpu_check.json")

    def step(self, name: str, what: str, fn, need_s: float, skip: str = "", always: bool = False) -> None:
        rec = {"name": name, "what": what, "need_s": need_s}
        if skip:
            rec.update(status="skipped", reason=skip)
        elif self.dry and not always:
            rec.update(status="would run")
        elif self.left() < need_s:
            rec.update(status="skipped", reason=f"time budget: {self.left():.0f} s left, needs about {need_s:.0f} s")
        else:
            t0 = time.monotonic()
            print(f"[gpu_check] {name}: {what}", flush=True)
            try:
                self.doc["results"][name] = fn(self)
                rec["status"] = "ran"
            except Exception as e:  # noqa: BLE001 - recorded, the next step still runs
                rec.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0],
                           traceback=traceback.format_exc()[-3000:])
            rec["seconds"] = round(time.monotonic() - t0, 1)
        print(f"[gpu_check] {name}: {rec['status']}" + (f" ({rec['reason']})" if "reason" in rec else "")
              + (f" in {rec['seconds']} s" if "seconds" in rec else ""), flush=True)
        self.doc["steps"].append(rec)
        self.write()


# ------------------------------------------------------------------------------------------ steps


def gpu_tests(check: Check) -> dict:
    limit = max(30, min(200, check.left() - 5))
    r = subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-m", "gpu or tensorrt", "-p",
                        "no:cacheprovider", f"--timeout={int(limit)}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=limit + 30, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    (check.out / "gpu_tests.log").write_text(r.stdout + r.stderr)
    tail = [ln for ln in r.stdout.splitlines() if ln.strip()][-15:]
    return {"returncode": r.returncode, "summary": tail[-1] if tail else "", "tail": tail}


def _xl(check: Check):
    """The DDT-XL 256 model, random weights, bf16 on the GPU, and a manifest the PyTorch reference reads."""
    if "xl" not in check.__dict__:
        import torch

        from ddt_export.core.config import load_config
        from ddt_export.core.manifest import Manifest
        from ddt_export.core.provenance import provenance_for
        from ddt_export.core.specs import BatchProfile, Dims
        from ddt_export.export.exporter import random_weights_ref
        from ddt_export.export.model import DDT

        cfg = load_config("ddt-xl-256")
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = DDT(cfg.model).eval()
        man = Manifest(cfg.name, provenance_for(cfg, random_weights_ref(0), "bf16", BatchProfile()), Dims.of(cfg.model))
        check.xl = (cfg, man, model)
    return check.xl


def cost_curve(check: Check) -> dict:
    import torch

    from ddt_export.evaluate.bench import timeit
    from ddt_export.export.reference import TorchReference

    cfg, man, model = _xl(check)
    ref = TorchReference(man, "torch-eager-bf16", model=model)
    curve = {"source": "PyTorch bf16 eager, DDT-XL 256 (random weights) and sd-vae-ft-ema's decoder "
                       "(random weights), one call, median of 5 after a warm-up; seconds by rows",
             "gpu": torch.cuda.get_device_name(0)}
    for graph in ("encoder", "decoder"):
        curve[graph] = {str(r): timeit(ref.stage(graph, r), 5).median for r in ROWS}
    from diffusers import AutoencoderKL

    with torch.device("cuda"):
        vae = AutoencoderKL(**SD_VAE).to(torch.bfloat16).eval()
    curve["vae_decoder"] = {}
    for r in VAE_ROWS:
        z = torch.randn(r, 4, 32, 32, device="cuda", dtype=torch.bfloat16)

        @torch.no_grad()
        def call():
            vae.decode(z)
            torch.cuda.synchronize()

        curve["vae_decoder"][str(r)] = timeit(call, 5).median
    return curve


def _baselines(check: Check, variant: str) -> dict:
    import dataclasses

    from ddt_export.core.noise import sample_noise
    from ddt_export.evaluate.bench import timeit
    from ddt_export.export.reference import TorchReference
    from ddt_export.runtime.sampling.grammar import parse_schedule, steps_for

    cfg, man, model = _xl(check)
    ref = TorchReference(man, variant, model=model)
    sampler = dataclasses.replace(cfg.sampler, num_steps=STEPS)
    runs, skipped = [], []
    for b in BATCHES:
        noise, labels = sample_noise(0, range(b), cfg.model.latent_shape), [i % 1000 for i in range(b)]
        for spec in SCHEDULES:
            need = 20 if variant == "torch-eager-bf16" else 60
            if check.left() < need:
                skipped.append(f"batch {b} {spec}: time budget")
                continue
            sched = steps_for(parse_schedule(spec), STEPS)
            tm = timeit(lambda: ref.sample(noise, labels, sampler, sched), repeats=1)  # after one warm-up
            runs.append({"batch": b, "schedule": spec, "steps": STEPS, "s": tm.median, "images_per_s": b / tm.median})
            print(f"[gpu_check]   {variant} batch {b} {spec}: {b / tm.median:.2f} img/s", flush=True)
    return {"variant": variant, "runs": runs, "skipped": skipped,
            "loop": "official: full [uncond; cond] batch every step, encoder on the schedule's steps"}


def ort_cuda(check: Check) -> dict:
    import numpy as np

    from ddt_export.core.noise import sample_noise
    from ddt_export.export.exporter import export_checkpoint
    from ddt_export.runtime import load_engines, sample

    folder = Path(tempfile.mkdtemp(prefix="ddt-ort-")) / "fp32"
    export_checkpoint(None, None, folder)  # the bundled digits model
    out = {}
    with load_engines(folder, providers=["CUDAExecutionProvider"]) as gpu, \
            load_engines(folder, providers=["CPUExecutionProvider"]) as cpu:
        sampler, m = gpu.config.sampler, gpu.config.model
        noise, labels = sample_noise(0, range(32), m.latent_shape), np.arange(32) % m.num_classes
        sched = list(range(sampler.num_steps))
        a = sample(gpu, noise, labels, sampler, sched)
        t0 = time.perf_counter()
        a = sample(gpu, noise, labels, sampler, sched)
        out["cuda_images_per_s_batch32"] = 32 / (time.perf_counter() - t0)
        b = sample(cpu, noise, labels, sampler, sched)
        out["latent_rel_err_vs_cpu"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        out["backend"] = gpu.backend_name
    check.folders["onnxruntime CUDA"] = (folder, {"providers": ["CUDAExecutionProvider"]})
    return out


def tensorrt_digits(check: Check) -> dict:
    from ddt_export.builder.engine import build
    from ddt_export.evaluate.bench import BenchOptions, bench

    work = Path(tempfile.mkdtemp(prefix="ddt-trt-"))
    out = {}
    t0 = time.perf_counter()
    res = build("fp16", out=work / "fp16", say=lambda m: None)  # the bundled model, every default
    out["build_fp16_s"], out["backend"] = time.perf_counter() - t0, res.backend
    check.folders["tensorrt fp16"] = (res.folder, {})
    b = bench(res.folder, BenchOptions(batches=BATCHES, steps=STEPS, schedules=SCHEDULES, repeats=3, torch_variants=()),
              say=lambda m: print(f"[gpu_check]   {m}", flush=True))
    out["runs"] = [{k: r[k] for k in ("backend", "loop", "batch", "schedule", "images_per_s")} for r in b.runs]
    out["stages"] = [{"graph": s["graph"], "rows": s["rows"], "s": s["s"]["median"]} for s in b.stages]
    if check.left() > 120:
        t0 = time.perf_counter()
        fp8 = build("fp8", out=work / "fp8", say=lambda m: None)
        out["build_fp8_s"], out["fp8_backend"] = time.perf_counter() - t0, fp8.backend
        out["fp8_speedup"] = fp8_speedup(res.folder, fp8.folder, b.stages)
    else:
        out["fp8"] = "skipped: time budget (tests/test_trt.py::test_fp8_engine covers the FP8 engine)"
    return out


def fp8_speedup(fp16_folder: Path, fp8_folder: Path, fp16_stages: list[dict]) -> dict:
    """The FP8 recipe's measured speed-up per graph call (fp16 engine seconds / FP8 engine seconds, same rows,
    timed here right after the fp16 ones) beside its prediction from FLOPs (issue 15)."""
    from ddt_export.core.manifest import read_manifest
    from ddt_export.evaluate.bench import BenchOptions, bench

    b8 = bench(fp8_folder, BenchOptions(batches=BATCHES, steps=STEPS, schedules=("all",), repeats=3, torch_variants=(),
                                        device_loop=False), say=lambda m: None)
    fp16 = {(s["graph"], s["rows"]): s["s"]["median"] for s in fp16_stages}
    q = read_manifest(fp8_folder).graphs["decoder"].info.get("quantization", {})
    return {"recipe": q.get("recipe", {}).get("name"), "predicted": q.get("recipe_share", {}),
            "measured": [{"graph": s["graph"], "rows": s["rows"], "fp16_s": fp16[(s["graph"], s["rows"])],
                          "fp8_s": s["s"]["median"], "speedup": fp16[(s["graph"], s["rows"])] / s["s"]["median"]}
                         for s in b8.stages if (s["graph"], s["rows"]) in fp16],
            "note": "digits model: a few MFLOP per call, so launch-bound; the ratio is a floor for DDT-XL"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="probe and list the steps; run nothing heavy (CPU)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    a = ap.parse_args(argv)
    check = Check(a.results, a.dry_run, a.budget_s)
    env = probe()
    check.doc["environment"] = env
    check.step("environment", "probe the GPU, driver and libraries", lambda c: env, 0, always=True)
    gpu = env.get("torch_cuda") or env.get("cuda_devices", 0) > 0
    no_gpu = "" if gpu else f"no CUDA GPU visible (torch.cuda: {env.get('torch_cuda')}; cuda-bindings: " \
                            f"{env.get('cuda_reason', env.get('cuda_bindings'))})"
    no_torch_gpu = "" if env.get("torch_cuda") else "PyTorch sees no CUDA GPU"
    no_nvrtc = "" if "nvrtc" in env else f"cuda-bindings / NVRTC: {env.get('cuda_bindings', 'no NVRTC')}"
    trt = env["tensorrt_status"]
    ort = "" if "CUDAExecutionProvider" in env["ort_providers"] else \
        f"onnxruntime has no CUDAExecutionProvider (providers: {', '.join(env['ort_providers']) or 'none'})"
    check.step("nvrtc-kernel", "the device loop's kernels on the GPU vs the host loop's numpy update", nvrtc_kernel, 10,
               no_gpu or no_nvrtc)
    check.step("gpu-tests", 'pytest tests -m "gpu or tensorrt"', gpu_tests, 60, no_gpu)
    check.step("cost-curve", f"XL encoder/decoder rows {ROWS}, VAE rows {VAE_ROWS}: seconds per call", cost_curve,
               40, no_torch_gpu)
    check.step("torch-eager", f"DDT-XL 256 bf16 eager, batch {BATCHES}, {STEPS} steps, {SCHEDULES}",
               lambda c: _baselines(c, "torch-eager-bf16"), 40, no_torch_gpu)
    check.step("ort-cuda", "onnxruntime CUDAExecutionProvider vs CPU, digits model", ort_cuda, 30, no_gpu or ort)
    check.step("tensorrt", "digits: TensorRT fp16 build, device vs host loop, FP8 engine and its speed-up per call", tensorrt_digits, 60,
               "" if trt["usable"] else f"TensorRT unusable: {trt['why']}")
    check.step("fast-plan", "fast plan vs the default plan, images/s, on the GPU folders built above", fast_plan,
               30, no_gpu or ("" if check.folders or check.dry else "no GPU engine folder: ort-cuda and tensorrt "
                                                                       "built none"))
    check.step("torch-compile", f"DDT-XL 256 bf16 torch.compile, batch {BATCHES}, {STEPS} steps, {SCHEDULES}",
               lambda c: _baselines(c, "torch-compile-bf16"), 90, no_torch_gpu)
    failed = [s["name"] for s in check.doc["steps"] if s["status"] == "failed"]
    check.doc["failed"] = failed
    check.write()
    print(f"[gpu_check] wrote {a.results / 'gpu_check.json'}; failed: {', '.join(failed) or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
