"""The digits-chosen plan at DDT-XL from the FLOP model, and wall time on this CPU (digits and ddt-xl-cpu).

FLOP model (`core.flops.step_flops` per row, `plan.network_flops` over a plan's rows): GFLOP per image of the
plan's structure at DDT-XL 256 and 512 against the official 250-step Euler sampler (the full [uncond; cond]
batch at every step, as the official loop runs it; also this runtime's `all`, conditional rows only outside the
guidance interval) and against the official DP example (51 encoder calls in 250 steps, full batch). The
structure is taken twice: the same step count as on digits, and the steps scaled to the XL reference (x 250 /
50, dp:K's K scaled alike). At XL a dp:K schedule's steps are not known without the model, so its K steps are
placed evenly: the encoder's row count depends on them only through which of them are guided. No quality is
measured at XL.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

XL_PRESETS = ("ddt-xl-256", "ddt-xl-512")
OFFICIAL_DP_CALLS = 51  # the official DP example: 51 encoder calls in 250 steps
STATE_BYTES = 4  # float32


def _recompute(schedule: str, steps: int, scale: float) -> list[int]:
    from ddt_export.runtime.sampling.grammar import uniform_steps

    if schedule == "all":
        return list(range(steps))
    kind, value = schedule.split(":")
    if kind == "uniform":
        return uniform_steps(steps, int(value))
    k = max(1, round(int(value) * scale))
    return sorted({int(round(i * steps / k)) for i in range(k)})


def xl_rows(plan) -> list[dict]:
    from ddt_export.core.config import PRESETS
    from ddt_export.core.flops import step_flops
    from ddt_export.runtime.sampling.plan import network_flops, plan_steps

    rows = []
    for preset in XL_PRESETS:
        cfg = PRESETS[preset]
        f, base = step_flops(cfg.model), cfg.sampler
        n = base.num_steps
        official = 2 * n * (f.encoder + f.decoder) / 1e9
        official_dp = (2 * OFFICIAL_DP_CALLS * f.encoder + 2 * n * f.decoder) / 1e9
        ours_all = network_flops(plan_steps(base, range(n)), f.encoder, f.decoder) / 1e9
        m = cfg.model
        state = {"s_per_half_per_sample_bytes": (plan.forecast + 1) * m.num_tokens * m.hidden_size * STATE_BYTES,
                 "velocity_history_per_sample_bytes": int(re.sub(r"\D", "", plan.solver) or 1) * int(
                     np.prod(m.latent_shape)) * STATE_BYTES}
        for label, steps in (("same steps", plan.steps), (f"steps x {n // 50}", plan.steps * n // 50)):
            sampler = dataclasses.replace(base, num_steps=steps, solver=plan.solver, forecast=plan.forecast,
                                          timeshift=plan.timeshift, guidance_interval=tuple(plan.interval))
            rec = _recompute(plan.schedule, steps, steps / plan.steps)
            g = network_flops(plan_steps(sampler, rec), f.encoder, f.decoder) / 1e9
            rows.append({"model": preset, "structure": label, "steps": steps, "encoder_calls": len(rec),
                         "gflop": g, "official_euler_gflop": official, "official_dp_gflop": official_dp,
                         "all_cond_only_gflop": ours_all, "speedup_vs_official_euler": official / g,
                         "speedup_vs_official_dp": official_dp / g, "speedup_vs_all": ours_all / g,
                         "official_dp_speedup": official / official_dp, **state})
    return rows


def cpu_flags() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    return {"model": model, "avx512f": "avx512f" in flags, "avx2": "avx2" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "amx": any(x.startswith("amx") for x in flags)}


def _summary(res) -> dict:
    runs = {r["schedule"]: r for r in res.runs if r["loop"] == "host"}
    plan = next(k for k in runs if k.startswith("plan:"))
    share = {s["schedule"]: s for s in res.sharing}
    return {"model": res.model, "batch": runs["all"]["batch"], "steps_reference": runs["all"]["steps"],
            "steps_plan": runs[plan]["steps"], "encoder_calls_plan": runs[plan]["encoder_calls"],
            "all_s": runs["all"]["s"], "plan_s": runs[plan]["s"],
            "measured_speedup": share[plan]["measured"], "predicted_speedup": share[plan]["predicted"],
            "gflop_all": share["all"]["gflop_per_image"], "gflop_plan": share[plan]["gflop_per_image"],
            "machine": res.machine}


def xl_cpu_folder(work: Path, digits_sampler, say) -> Path:
    """ddt-xl-cpu (28 blocks, 22 encoder, hidden 256, 32x32 latents) with random weights and the digits
    model's sampler (50 steps, its CFG and interval), so the digits plan applies to it as it is."""
    from ddt_export.core.config import PRESETS
    from ddt_export.export.exporter import export_checkpoint

    out = work / "xl-cpu-50"
    if not (out / "manifest.json").is_file():
        cfg = dataclasses.replace(PRESETS["ddt-xl-cpu"], name="ddt-xl-cpu-50", sampler=digits_sampler)
        path = work / "ddt-xl-cpu-50.json"
        path.write_text(cfg.to_json())
        say(f"exporting {cfg.name} (random weights) to {out}")
        export_checkpoint(None, str(path), out, weights="random")
    return out


def wall(folder: Path, plan, work: Path, say) -> dict:
    """`bench --plan fast` (one warm-up, median of 3) on the digits engines and on the XL-shaped model."""
    from ddt_export.core.manifest import read_manifest
    from ddt_export.evaluate.bench import BenchOptions, bench
    from ddt_export.runtime.sampling.plans import Plan, write_plan

    out = {}
    say("wall: digits, batch 8")
    res = bench(folder, BenchOptions(batches=(8,), repeats=3, torch_variants=(), plan="fast"), say=say)
    out["digits"] = dict(_summary(res), cpu=cpu_flags())
    xl = xl_cpu_folder(work, read_manifest(folder).config.sampler, say)
    man = read_manifest(xl)
    write_plan(xl, Plan("fast", plan.steps, plan.solver, plan.forecast, plan.timeshift, tuple(plan.interval),
                        plan.schedule, {"structure": plan.measured.get("structure"),
                                        "note": "the digits model's fast plan, not tuned on this model"}),
               man.provenance)
    say("wall: ddt-xl-cpu-50, batch 1")
    res = bench(xl, BenchOptions(batches=(1,), repeats=3, torch_variants=(), plan="fast"), say=say)
    out["xl-cpu"] = dict(_summary(res), cpu=cpu_flags())
    return out
