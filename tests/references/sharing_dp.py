"""The official sharing_sampling.py DP (`sharing_dp`), restated as plain loops over Python lists, for tests only
(no torch)."""
from __future__ import annotations

import numpy as np


def official_dp(sim: np.ndarray, k: int) -> list[int]:
    """Plain loops, as the official sharing_dp after `error_map = (1 - sim).tolist()`."""
    n = len(sim)
    err = (1 - np.asarray(sim, np.float64)).tolist()
    for i in range(1, n):
        for j in range(0, i):
            err[i][j] = err[i - 1][j] + err[i][j]
    cost = [[0.0] * (n + 1) for _ in range(k + 1)]
    par = [[-1] * (n + 1) for _ in range(k + 1)]
    for i in range(1, n + 1):
        cost[1][i] = err[i - 1][0]
        par[1][i] = 0
    for step in range(2, k + 1):
        for i in range(step, n + 1):
            best, arg = 99999, -1
            for j in range(step - 1, i):
                value = cost[step - 1][j] + err[i - 1][j]
                if value < best:
                    best, arg = value, j
            cost[step][i] = best
            par[step][i] = arg
    out = [n]
    for step in range(k, 0, -1):
        out.append(par[step][out[-1]])
    out.reverse()
    return out[:-1]
