"""The sampling steps of the GPU check (scripts/gpu_check.py runs them; `check` is its `Check`): the device loop's
kernels against the host loop's arithmetic (nvrtc-kernel), and a fast plan against the model's default plan
(fast-plan). Imports nothing heavy at module level: the dry run on CPU imports this file too.
"""
from __future__ import annotations

FAST_STANDIN = dict(steps=10, solver="adams:3", schedule="uniform:2", forecast=1)  # where a folder stores no `fast`
FAST_BATCHES = (8, 32)


def nvrtc_kernel(check) -> dict:
    """The device loop's kernels as the loop builds them (a cubin for this GPU, `kernel_target`) and launches them
    (`trt_update.update_launch`, `state_ops`), on random data, against the host loop's own float32 arithmetic
    (`step.update`, `step.decoder_feeds`): bit-exact expected for cfg_euler, cfg_adams (1 to 4 velocities) and
    the forecast of s (2 and 3 states, a plain half copied)."""
    import numpy as np

    from ddt_export.core.config import SamplerConfig
    from ddt_export.runtime.graphs import gpu
    from ddt_export.runtime.graphs.trt_update import state_ops, update_launch
    from ddt_export.runtime.sampling.plan import Step
    from ddt_export.runtime.sampling.step import Rows, decoder_feeds, update
    from ddt_export.runtime.sampling.trt_loop import launch, load_kernel

    f, dev = np.float32, gpu.current_device()
    (kernels, target), stream = load_kernel(dev), gpu.create_stream()
    rng, out, bufs = np.random.default_rng(0), {"image": target.kind, "arch": target.arch, "note": target.note}, []

    def put(a) -> int:  # a device copy of the float32 array a (or room for it)
        bufs.append(gpu.DeviceBuffer(a.nbytes))
        gpu.copy(bufs[-1].ptr, a.ctypes.data, a.nbytes, "h2d", stream)
        return bufs[-1].ptr

    def compare(name, ptr, want) -> None:
        got = np.empty_like(want)
        gpu.copy(got.ctypes.data, ptr, got.nbytes, "d2h", stream)
        gpu.synchronize(stream)
        out[name] = {"bit_exact": bool(np.array_equal(got.view(np.uint32), want.view(np.uint32))),
                     "max_abs_diff": float(np.abs(got - want).max())}

    try:
        b, shape = 32, (4, 32, 32)  # 32 XL-256 latents
        for order, k, cfg in ((1, 1, 1), (1, 1, 0), (2, 2, 1), (3, 3, 0), (4, 4, 1), (4, 1, 1)):
            x, v = (rng.standard_normal((r * b, *shape), dtype=f) for r in (1, 2 if cfg else 1))
            older = [rng.standard_normal((b, *shape), dtype=f) for _ in range(k - 1)]
            coeffs = (f(1.0),) if k == 1 else tuple(rng.standard_normal(k).astype(f))
            st = Step(3, f(0.5), f(0.0196), 2.0 if cfg else 1.0, False, False, bool(cfg), False, coeffs)
            rows = Rows(SamplerConfig(solver=f"adams:{order}"), np.arange(b), x.copy(), rng, v=list(older))
            want = update(rows, st, v.copy())  # the host loop's update
            xp, vp = put(x), put(v)
            ring = [put(a) for a in older] + [put(np.zeros_like(x))]
            what = update_launch(st, xp, vp, x.size) if order == 1 else \
                update_launch(st, xp, vp, x.size, ring[-1], ring)
            launch(kernels, what, stream)
            compare(f"{what.kernel} adams:{order} k={k} {'cfg' if cfg else 'cond-only'}", xp, want)
        b, L, D = 8, 256, 1152  # XL-256 encoder states
        for w_cond, w_uncond in (((-1.0, 2.0), (1.0,)), ((0.5, -1.5, 2.0), (-1.0, 2.0)), ((0.3, -1.2, 1.9), None)):
            cond, uncond = ([rng.standard_normal((b, L, D), dtype=f) for _ in range(3)] for _ in range(2))
            rows = Rows(SamplerConfig(forecast=2), np.arange(b), np.zeros((b, *shape), f), rng,
                        s=np.concatenate([uncond[-1], cond[-1]]), s_uncond=True, cond=cond, uncond=uncond)
            st = Step(3, f(0.5), f(0.0196), 2.0, False, False, w_uncond is not None, False, (f(1.0),),
                      tuple(map(f, w_cond)), tuple(map(f, w_uncond or ())))
            want = decoder_feeds(rows, st)["s"]  # the host loop's state
            dst = put(np.zeros_like(want))
            halves = ([(st.s_uncond, uncond)] if st.dec_uncond else []) + [(st.s_cond, cond)]
            for h, (weights, states) in enumerate(halves):
                copies, launches = state_ops(weights, [put(a) for a in states[-len(weights):]],
                                             dst + h * b * L * D * 4, b * L * D * 4)
                for c in copies:
                    gpu.copy(*c, "d2d", stream)
                for what in launches:
                    launch(kernels, what, stream)
            compare(f"forecast cond {len(w_cond)} uncond {len(w_uncond or ())}", dst, want)
    finally:
        gpu.synchronize(stream)
        for buf in bufs:
            buf.free()
        gpu.destroy_stream(stream)
    out["all_bit_exact"] = all(r["bit_exact"] for r in out.values() if isinstance(r, dict))
    return out


def _requests(eng, folder) -> tuple[dict, str]:
    """{"default": the model's own sampler on `all`, "fast": the folder's stored plan or FAST_STANDIN}, resolved
    as `generate` resolves them, and which fast plan that is."""
    from ddt_export.runtime.sampling.plans import FAST, lookup, plan_names
    from ddt_export.runtime.sampling.request import CLI, RequestInput, resolve
    from ddt_export.runtime.sampling.schedules import resolve_schedule

    stored = FAST in plan_names(folder)
    fast = RequestInput(plan=FAST) if stored else RequestInput(**FAST_STANDIN)
    plans = lookup(folder, eng.manifest)
    req = {k: resolve_schedule(resolve(eng.config, given, CLI, plans), eng, lambda m: None)
           for k, given in (("default", RequestInput()), ("fast", fast))}
    return req, ("plans/fast.json (stored)" if stored else
                 f"STAND-IN (this folder stores no fast plan): {FAST_STANDIN}")


def fast_plan(check) -> dict:
    """The fast plan against the model's default plan (its own sampler, `all`), images/s, on the GPU folders the
    earlier steps built (TensorRT: device loop and host loop; onnxruntime CUDA: host loop), and the device loop's
    fast plan against its host loop (same engines: bit-exact where TensorRT is deterministic). The plan is the
    folder's stored `fast` (ddt-export tune), else the fixed STAND-IN `FAST_STANDIN`: the output says which.
    Quality is not measured here: the fast plan's dFID is gated on the digits model by `ddt-export validate
    --plan fast --max-fid-delta D`."""
    import numpy as np

    from ddt_export.core.noise import sample_noise
    from ddt_export.evaluate.bench import timeit
    from ddt_export.runtime import load_engines, sample
    from ddt_export.runtime.sampling.host import sample_host

    out = {"quality": "not measured here: validate --plan fast --max-fid-delta D is the dFID gate (digits)"}
    for name, (folder, kwargs) in check.folders.items():
        with load_engines(folder, **kwargs) as eng:
            req, which = _requests(eng, folder)
            m = eng.config.model
            rec = {"fast_plan": which, "runs": [],
                   "plans": {k: {"solver": r.sampler.solver, "steps": r.sampler.num_steps, "schedule": str(r.schedule),
                                 "forecast": r.sampler.forecast, "encoder_calls": len(r.recompute)}
                             for k, r in req.items()}}
            print(f"[gpu_check]   {name}: fast plan = {which}", flush=True)
            runs = {"device": sample, "host": sample_host} if eng.loop == "device" else {"host": sample_host}
            for b in FAST_BATCHES:
                if check.left() < 15:
                    rec["runs"].append(f"batch {b}: skipped (time budget)")
                    continue
                noise, labels = sample_noise(0, range(b), m.latent_shape), np.arange(b) % m.num_classes
                for loop, run in runs.items():
                    speed = {k: b / timeit(lambda: run(eng, noise, labels, r.sampler, list(r.recompute)), 3).median
                             for k, r in req.items()}
                    rec["runs"].append({"loop": loop, "batch": b, "images_per_s": speed,
                                        "speedup": speed["fast"] / speed["default"]})
                    print(f"[gpu_check]   {name} {loop} loop batch {b}: default {speed['default']:.1f} img/s, "
                          f"fast {speed['fast']:.1f} img/s ({speed['fast'] / speed['default']:.2f}x)", flush=True)
            if eng.loop == "device":
                r, noise = req["fast"], sample_noise(1, range(8), m.latent_shape)
                labels = np.arange(8) % m.num_classes
                dev = sample(eng, noise, labels, r.sampler, list(r.recompute))
                host = sample_host(eng, noise, labels, r.sampler, list(r.recompute))
                rec["fast_device_vs_host"] = {"bit_exact": bool(np.array_equal(dev, host)),
                                              "max_rel_diff": float(np.abs(dev - host).max() / np.abs(host).max())}
            out[name] = rec
    return out
