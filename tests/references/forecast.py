"""Encoder forecasting restated in float64, for tests only: Euler with the encoder on the recompute steps and, at
every other step, each CFG half's state extrapolated from its last recomputed (t, s) points by Newton's divided
differences (written from the definition, not from ddt_export's weights)."""
from __future__ import annotations

import numpy as np
import torch


def timesteps(num_steps, last_step, shift):
    """The official Euler sampler's times: linspace(0, 1 - last_step, N), then 1.0, then the shift."""
    t = np.concatenate([np.linspace(0.0, 1.0 - last_step, num_steps), [1.0]])
    return t / (t + (1 - t) * shift)


def _newton(ts, ss, t):
    """Newton's divided differences through (ts[j], ss[j]), evaluated at t (float64)."""
    c = [np.asarray(v, np.float64) for v in ss]
    n = len(ts)
    for j in range(1, n):
        for i in range(n - 1, j - 1, -1):
            c[i] = (c[i] - c[i - 1]) / (ts[i] - ts[i - j])
    out = c[n - 1]
    for i in range(n - 2, -1, -1):
        out = out * (t - ts[i]) + c[i]
    return out


def forecast_reference(model, x, y, sampler, recompute, uncond_steps, forecast):
    """Euler with encoder forecasting, float64 bookkeeping: the encoder runs on `recompute` steps (both halves on
    `uncond_steps`, the conditional half on the others); at every other step each half's state is the
    polynomial through its last forecast + 1 recomputed (t, s) points, at this step's t."""
    t_all = timesteps(sampler.num_steps, sampler.last_step, sampler.timeshift)
    b, null = len(y), model.cfg.null_class
    x = torch.from_numpy(x).double()
    yy = torch.from_numpy(y)
    hist = {"u": [], "c": []}
    for i in range(sampler.num_steps):
        t32 = np.float32(t_all[i])
        guided = sampler.guidance_interval[0] < t32 < sampler.guidance_interval[1]
        if i in recompute:
            halves = ("u", "c") if i in uncond_steps else ("c",)
            for h in halves:
                lab = torch.full((b,), null) if h == "u" else yy
                s = model.encode(x.float(), torch.full((b,), float(t32)), lab).double()
                hist[h].append((float(t32), s))
        s_now = {}
        for h in (("u", "c") if guided else ("c",)):
            pts = hist[h][-(forecast + 1):]
            s_now[h] = pts[-1][1] if pts[-1][0] == float(t32) or forecast == 0 else \
                torch.from_numpy(_newton([p[0] for p in pts], [p[1].numpy() for p in pts], float(t32)))
        vc = model.decode(x.float(), s_now["c"].float()).double()
        v = vc
        if guided:
            vu = model.decode(x.float(), s_now["u"].float()).double()
            v = vu + sampler.guidance * (vc - vu)
        x = x + v * (t_all[i + 1] - t_all[i])
    return x.numpy()
