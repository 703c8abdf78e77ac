"""The serve load study's simulator side: the serving engine on a virtual clock (`runtime.batching.simulate`)
replaying the study's traces, on a cost curve fitted to the servers' own iterations, a measured GPU curve, or a
GPU-like curve from the FLOP model.

Imports only `workload` of the study's files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.serve_load.workload import POLICIES, arrivals, catalog, kind_input, poisson_trace, summary
from ddt_export.core.config import load_config
from ddt_export.core.flops import step_flops
from ddt_export.runtime.batching.simulate import Arrival, CostCurve, gpu_like_curve, simulate
from ddt_export.runtime.sampling.grammar import steps_for
from ddt_export.runtime.sampling.request import API, SampleRequest, resolve

ROWS = (1, 2, 4, 8, 16, 32, 48, 64)  # the rows of a cost curve's points
VAE_FLOPS_256 = 0.31e12  # sd-vae-ft-ema decoder, one 256 px image (a stated estimate, ~1.2 TFLOP at 512 px)


def fit_trace(recs: list[dict], request_s: float) -> tuple[CostCurve, dict]:
    """The cost curve from the servers' own iterations (`serve --trace`): one loop iteration, less its VAE call,
    takes E0 [encoder ran] + e1 x encoder rows + D0 + d1 x decoder rows + h x requests seconds (non-negative
    least squares); the loop's idle-free gap between iterations is the per-iteration overhead; `request_s`
    (client latency less the server's own time: HTTP, JSON, PNGs) is the per-request cost."""
    from scipy.optimize import nnls

    busy = [r for r in recs if r["step_s"] is not None]
    x = np.array([[r["encoder_rows"] > 0, r["encoder_rows"], 1.0, r["decoder_rows"], r["requests"]] for r in busy],
                 np.float64)
    y = np.array([r["end"] - r["start"] - r["vae_s"] for r in busy])
    (e0, e1, d0, d1, h), _ = nnls(x, y)
    resid = y - x @ np.array([e0, e1, d0, d1, h])
    order = sorted(busy, key=lambda r: r["start"])
    gaps = [b["start"] - a["end"] for a, b in zip(order, order[1:]) if 0 <= b["start"] - a["end"] < 0.02]
    curve = CostCurve(tuple((r, float(e0 + e1 * r)) for r in ROWS), tuple((r, float(d0 + d1 * r)) for r in ROWS),
                      iteration_s=float(np.median(gaps)) if gaps else 0.0, request_step_s=float(h),
                      request_s=float(request_s), note="fitted to the servers' iterations at this load")
    return curve, {"iterations": len(busy), "encoder_ms": [1e3 * e0, 1e3 * e1], "decoder_ms": [1e3 * d0, 1e3 * d1],
                   "request_ms": 1e3 * h, "gap_ms": 1e3 * curve.iteration_s, "request_s": request_s,
                   "r2": float(1 - resid.var() / y.var()) if len(y) > 1 else float("nan")}


def sim_stats(arr: list[Arrival], res, solo: list[float]) -> dict:
    lat = np.array([res.latency[i] for i in sorted(res.latency)])
    slow = np.array([res.latency[i] / solo[arr[i].kind] for i in sorted(res.latency)])
    span = max(res.end, arr[-1].t if arr else 0.0, 1e-9)
    out = summary(lat, slow, len(arr), len(res.rejected), span)
    out.update(requests_per_iteration=res.requests_per_iteration, rows_per_iteration=res.rows_per_iteration)
    if len(lat):  # what the p99 is made of: the requests at or above it, their wait for admission and their run
        ids = [i for i in sorted(res.latency) if res.latency[i] >= out["p99"]]
        queue = float(np.mean([res.queue[i] for i in ids]))
        out.update(p99_queue_s=queue, p99_run_s=float(np.mean([res.latency[i] for i in ids])) - queue,
                   p99_steps=sorted({arr[i].spec.sampler.num_steps for i in ids}))
    return out


def sim_saturation(curve, specs, budget, policy, max_delay, n=2000, seed=0) -> float:
    """Throughput with every request waiting from the start (a permanently full queue)."""
    rng = np.random.default_rng([seed, 41])
    arr = [Arrival(0.0, specs[k], int(k)) for k in rng.integers(0, len(specs), n)]
    res = simulate(arr, curve, budget, policy, max_delay, max_queue=n)
    return len(res.latency) / res.end


def specs_for_preset(preset: str, kinds: list[dict]) -> list[SampleRequest]:
    """The catalog on a model without engines: dp:K becomes K evenly spaced steps (a stand-in: the DP needs
    the model's trajectory; only how many steps recompute, and where, matters for the cost)."""
    cfg = load_config(preset)
    out = []
    for k in kinds:
        req = resolve(cfg, kind_input(k), API)
        n, spec = req.sampler.num_steps, req.schedule
        steps = (sorted({int(v) for v in np.linspace(0, n, spec.value, endpoint=False)})
                 if spec.kind == "dp" else steps_for(spec, n))
        out.append(req.with_steps(steps))
    return out


def load_curve(which: str, preset: str) -> tuple[CostCurve, list[SampleRequest], int]:
    """`gpu` (the FLOP-model assumption), a gpu_check.json (scripts/gpu_check.sh: `results.cost-curve`, seconds
    by rows measured on a GPU), or a JSON written by `measure` (its `curve`)."""
    kinds = catalog(0)
    if which == "gpu":
        f = step_flops(load_config(preset).model)
        return gpu_like_curve(f.encoder, f.decoder, VAE_FLOPS_256), specs_for_preset(preset, kinds), 64
    d = json.loads(Path(which).read_text())
    if "cost-curve" in d.get("results", {}):
        c = d["results"]["cost-curve"]
        pts = {g: tuple(sorted((int(r), float(t)) for r, t in c[g].items())) for g in ("encoder", "decoder",
                                                                                     "vae_decoder") if g in c}
        return (CostCurve(**pts, note=f"measured by gpu_check on {c.get('gpu', 'a GPU')}: {c.get('source', '')}"),
                specs_for_preset(preset, kinds), 64)
    return CostCurve.from_dict(d["curve"]), specs_for_preset(d.get("preset", "ddt-tiny-digits"), kinds), d["budget"]


def gpu_study(curve, specs, budget, loads, n, seed, max_delay) -> dict:
    solo = [simulate([Arrival(0.0, s, k)], curve, budget).latency[0] for k, s in enumerate(specs)]
    sat = {p: sim_saturation(curve, specs, budget, p, max_delay) for p in POLICIES}
    rows, ratios = [], {}
    for i, load in enumerate(loads):
        rate = load * sat["request"]
        trace = poisson_trace(rate, n / rate, len(specs), seed + 100 + i)
        arr = arrivals(trace, specs)
        by = {}
        for p in POLICIES:
            by[p] = sim_stats(arr, simulate(arr, curve, budget, p, max_delay, max_queue=10 ** 6), solo)
            rows.append({"load": load, "rate": rate, "policy": p, **by[p]})
        ratios[f"{load:.0%}"] = {k: by["step"][k] / by["request"][k] for k in ("p50", "p99", "slowdown_p99")}
        ratios[f"{load:.0%}"].update({f"fair_{k}": by["fair"][k] / by["request"][k] for k in ("p50", "p99",
                                                                                          "slowdown_p99")})
    return {"curve": curve.to_dict(), "solo_s": solo, "saturation": sat, "rows": rows, "ratios": ratios,
            "budget": budget}


def gpu_sensitivity(specs, budget, n, seed, max_delay, load=0.7) -> list[dict]:
    """The step/request ratios at `load` as the assumed GPU's small-batch utilization and call overhead vary."""
    f = step_flops(load_config("ddt-xl-256").model)
    out = []
    for half_rows in (4, 8, 16, 32):
        for call_s in (0.25e-3, 1e-3):
            c = gpu_like_curve(f.encoder, f.decoder, VAE_FLOPS_256, half_rows=half_rows, call_s=call_s)
            g = gpu_study(c, specs, budget, [load], n, seed, max_delay)
            out.append({"half_rows": half_rows, "call_ms": call_s * 1e3, "saturation": g["saturation"],
                        **next(iter(g["ratios"].values()))})
    return out
