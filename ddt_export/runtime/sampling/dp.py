"""The statistical DP that chooses the encoder's recompute steps, and its heatmap. Torch-free (numpy; matplotlib
for the plot).

Restates the official `sharing_sampling.py` `sharing_dp`: from encoder states recorded at every step of a
template trajectory, sim[i][j] = mean over samples and tokens of cosine(s_i, s_j); err = 1 - sim, accumulated
down each column (err[i][j] = cost of serving steps j..i from the state of step j); cost[k][i] = least total
error covering steps 0..i-1 with k recompute steps, the first forced to 0. Vectorized in float64 with the same
summation order and tie-breaking (the first minimum) as the official loops.

The forecast-aware DP (`forecast_errors`, `solve_forecast_dp`) chooses the recompute steps on the error of the
state a step actually gets under encoder forecasting (`SamplerConfig.forecast`): at a step k that does not
recompute, the line in t through the states of the last two recompute steps p < q, evaluated at t_k (forecast 1;
at the first recompute step alone, reuse). Same error measure as the official, 1 - the mean over tokens of the
cosine similarity of the state used and the state the encoder would give, summed over every step; the cost of a
segment now depends on the last two recompute steps, so the DP runs over (previous, current) pairs: O(K N^3).
With forecast order 0 it is the official DP's objective (`tests/test_schedules.py` checks both against a
brute-force search).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.artifacts import atomic_path
from ...core.errors import InputError, NumericsError

EPS = 1e-12  # F.normalize's eps: a norm below it counts as EPS
FORECAST_DP_ORDERS = (0, 1)  # the state forecasts whose error `forecast_errors` states exactly

def similarity(states: np.ndarray, chunk_tokens: int = 4096) -> np.ndarray:
    """states (N, B, L, D) -> sim (N, N) float64: mean over the B*L tokens of cosine(s_i, s_j).

    Equal to the official bmm over normalized token vectors averaged over tokens: with A the (N, T*D) matrix
    of unit token vectors, sim = A A^T / T. Accumulated over token chunks to bound memory.
    """
    if states.ndim != 4:
        raise InputError("encoder states", "(N, B, L, D)", states.shape)
    n, _, _, d = states.shape
    flat = states.reshape(n, -1, d)  # N T D
    tokens = flat.shape[1]
    sim = np.zeros((n, n), np.float64)
    for lo in range(0, tokens, chunk_tokens):
        a = flat[:, lo:lo + chunk_tokens].astype(np.float64)  # N t D
        a /= np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)  # F.normalize's eps
        a = a.reshape(n, -1)  # N t*D
        sim += a @ a.T
    return sim / tokens


def cumulative_error(sim: np.ndarray) -> np.ndarray:
    """err = 1 - sim; below the diagonal each column accumulated downward: err[i][j] = sum_{k=j..i} (1 - sim[k][j]).

    np.cumsum adds in the official loop's order (err[i-1][j] + err[i][j]), so the result is bitwise the same.
    """
    err = 1.0 - np.asarray(sim, np.float64)
    n = err.shape[0]
    below = np.tril(np.ones((n, n), bool), k=-1)
    return np.where(below, np.cumsum(np.tril(err), axis=0), err)


def check_similarity(sim: np.ndarray, where: str = "similarity matrix") -> np.ndarray:
    sim = np.asarray(sim)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 1:
        raise InputError(where, "a square (N, N) matrix", sim.shape)
    if not np.isfinite(sim).all():
        raise NumericsError(where, "finite values", f"{int((~np.isfinite(sim)).sum())} non-finite")
    return sim.astype(np.float64)


def solve_dp(sim: np.ndarray, k: int) -> tuple[list[int], float]:
    """The official sharing DP: K recompute steps (the first forced to 0) and their total cumulative error."""
    sim = check_similarity(sim)
    n = sim.shape[0]
    if not 1 <= k <= n:
        raise InputError("--recompute K", f"1 <= K <= N = {n}", k)
    err = cumulative_error(sim)
    cost = np.zeros((k + 1, n + 1))  # cost[step][i]: steps 0..i-1 covered with `step` recompute steps
    parent = np.full((k + 1, n + 1), -1, np.int64)
    cost[1, 1:] = err[:, 0]  # one recompute step: step 0 serves everything
    parent[1, 1:] = 0
    i_idx = np.arange(n + 1)[:, None]  # candidate end i (rows), last recompute step j (columns)
    j_idx = np.arange(n + 1)[None, :]
    err_pad = np.zeros((n + 1, n + 1))
    err_pad[1:, :n] = err  # err_pad[i][j] = err[i-1][j]
    for step in range(2, k + 1):
        valid = (j_idx >= step - 1) & (j_idx < i_idx)  # j in [step-1, i)
        value = np.where(valid, cost[step - 1][None, :] + err_pad, np.inf)  # (n+1, n+1)
        best = np.argmin(value, axis=1)  # the first minimum, as the official strict `<`
        rows = np.arange(step, n + 1)
        cost[step, rows] = value[rows, best[rows]]
        parent[step, rows] = best[rows]
    steps = [n]
    for step in range(k, 0, -1):
        steps.append(int(parent[step][steps[-1]]))
    steps.reverse()
    assert steps[0] == 0 and all(a < b for a, b in zip(steps, steps[1:])), steps
    return steps[:-1], float(cost[k, n])


def schedule_cost(sim: np.ndarray, steps: Sequence[int]) -> float:
    """Total cumulative error of any schedule (the DP's objective): comparable across uniform and dp."""
    err = cumulative_error(check_similarity(sim))
    n = err.shape[0]
    ends = list(steps[1:]) + [n]
    return float(sum(err[end - 1][j] for j, end in zip(steps, ends)))


def _token_grams(states: np.ndarray, chunk_tokens: int):
    """Per-token Gram matrices of the states (N, B, L, D), chunk by chunk: (t, N, N) float64,
    g[τ, i, j] = s_i(τ).s_j(τ)."""
    n, d = states.shape[0], states.shape[-1]
    flat = states.reshape(n, -1, d)  # N T D
    for lo in range(0, flat.shape[1], chunk_tokens):
        a = flat[:, lo:lo + chunk_tokens].astype(np.float64)  # N t D
        yield np.einsum("itd,jtd->tij", a, a)


def forecast_errors(states: np.ndarray, times: Sequence[float], order: int = 1,
                    chunk_tokens: int | None = None) -> np.ndarray:
    """e (N, N, N) float64: e[p, q, k] = 1 - mean over tokens of cos(state used at step k, s_k) when the last
    recompute steps before or at k are p <= q (p == q: q alone). The state used: s_q (reuse: order 0, or p == q),
    else (order 1) the line through (t_p, s_p), (t_q, s_q) evaluated at t_k, the forecast `plan.plan_steps`
    feeds the decoder. Entries with not p <= q <= k are +inf.

    states (N, B, L, D): the encoder's output at every step of a template trajectory; times (N,): each step's t.
    Computed from per-token dot products (a chunk of tokens at a time), O(N^3) per token."""
    if states.ndim != 4:
        raise InputError("encoder states", "(N, B, L, D)", states.shape)
    if order not in FORECAST_DP_ORDERS:
        raise InputError("forecast order of the DP", " | ".join(map(str, FORECAST_DP_ORDERS)), order)
    n = states.shape[0]
    t = np.asarray(times, np.float64)
    if t.shape != (n,) or not np.all(np.diff(t) > 0):
        raise InputError("step times", f"({n},) increasing", t.shape)
    chunk = chunk_tokens or max(1, 2 ** 22 // (n * n))
    total = np.zeros((n, n, n))
    tokens = 0
    for g in _token_grams(states, chunk):  # g: t N N
        tokens += len(g)
        norm = np.maximum(np.sqrt(np.maximum(np.einsum("tii->ti", g), 0.0)), EPS)  # t N
        for q in range(n):
            ks = slice(q, n)
            reuse = g[:, q, ks] / (norm[:, q, None] * norm[:, ks])  # t (N-q)
            total[q, q, ks] += reuse.sum(0)
            if q == 0:
                continue
            if order == 0:
                total[:q, q, ks] += reuse.sum(0)[None, :]
                continue
            p = np.arange(q)
            wp = (t[None, q:] - t[q]) / (t[p, None] - t[q])  # q (N-q): the line through p and q at t_k
            wq = (t[None, q:] - t[p, None]) / (t[q] - t[p, None])
            dot = wp * g[:, :q, ks] + wq * g[:, q, None, ks]  # t q (N-q)
            sq = (wp ** 2 * g[:, p, p][:, :, None] + 2 * wp * wq * g[:, :q, q][:, :, None]
                  + wq ** 2 * g[:, q, q][:, None, None])
            fnorm = np.maximum(np.sqrt(np.maximum(sq, 0.0)), EPS)
            total[:q, q, ks] += (dot / (fnorm * norm[:, None, ks])).sum(0)
    err = 1.0 - total / tokens
    p, q, k = np.ogrid[:n, :n, :n]
    return np.where((p <= q) & (q <= k), err, np.inf)


def _segment_costs(errors: np.ndarray) -> np.ndarray:
    """C (N, N, N + 1): C[p, q, r] = sum_{k=q}^{r-1} e[p, q, k], the cost of serving steps q..r-1 from the
    recompute steps p <= q (+inf unless p <= q < r)."""
    n = errors.shape[0]
    finite = np.where(np.isfinite(errors), errors, 0.0)
    c = np.concatenate([np.zeros((n, n, 1)), np.cumsum(finite, axis=2)], axis=2)  # c[..., r] = sum_{k<r}
    p, q, r = np.ogrid[:n, :n, :n + 1]
    return np.where((p <= q) & (q < r), c, np.inf)


def solve_forecast_dp(errors: np.ndarray, k: int) -> tuple[list[int], float]:
    """K recompute steps (the first 0) with the least total error when each step gets the state the forecast
    makes from the last two recompute steps (`forecast_errors`), and that total. A DP over (number of recompute
    steps, the last two of them): O(K N^3) time, O(K N^2) memory; ties go to the first minimum in index order."""
    errors = np.asarray(errors, np.float64)
    n = errors.shape[0]
    if errors.shape != (n, n, n) or n < 1:
        raise InputError("forecast errors", "an (N, N, N) array", errors.shape)
    if not 1 <= k <= n:
        raise InputError("--recompute K", f"1 <= K <= N = {n}", k)
    c = _segment_costs(errors)  # p q r
    cost = np.full((n, n), np.inf)  # cost[q, p]: steps 0..q-1 covered, last recompute steps p <= q
    cost[0, 0] = 0.0
    parents = []
    later = np.arange(n)[None, :] > np.arange(n)[:, None]  # (q, r): r after q
    for _ in range(2, k + 1):
        value = cost[:, :, None] + c.transpose(1, 0, 2)[:, :, :n]  # (q, p, r): then recompute at r
        best = np.argmin(value, axis=1)  # (q, r)
        new = np.where(later, np.take_along_axis(value, best[:, None, :], 1)[:, 0, :], np.inf)  # (q, r)
        parents.append(best)
        cost = new.T  # (r, q): the new last pair
    total = cost + c[:, :, n].T  # (q, p): steps q..N-1 served last
    q, p = np.unravel_index(int(np.argmin(total)), total.shape)
    value = float(total[q, p])
    assert np.isfinite(value), (n, k)
    steps = [int(q)] if k == 1 else [int(q), int(p)]
    for best in reversed(parents[1:]):  # layers K..3: the pair (p, q) came from (best[p, q], p)
        q, p = p, best[p, q]
        steps.append(int(p))
    steps.reverse()
    assert steps[0] == 0 and len(steps) == k and all(a < b for a, b in zip(steps, steps[1:])), steps
    return steps, value


def forecast_schedule_cost(errors: np.ndarray, steps: Sequence[int]) -> float:
    """Total forecast error of any schedule (`solve_forecast_dp`'s objective)."""
    n = errors.shape[0]
    steps = list(steps)
    prev = [steps[0]] + steps[:-1]  # the step before each recompute step (itself for the first)
    ends = steps[1:] + [n]
    return float(sum(errors[p, q, q:end].sum() for p, q, end in zip(prev, steps, ends)))


def plot_heatmap(sim: np.ndarray, steps: Sequence[int], path: Path, title: str = "") -> Path:
    """PNG of 1 - sim (N x N) with the recompute steps marked on the diagonal (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    err = 1.0 - check_similarity(sim)
    n = err.shape[0]
    fig = Figure(figsize=(6.4, 5.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(err, cmap="viridis", origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="1 - mean cosine similarity of encoder states")
    ends = list(steps[1:]) + [n]
    for j, end in zip(steps, ends):  # the block of steps served by the state computed at j
        ax.add_patch(_rect(j, end))
    ax.scatter(list(steps), list(steps), s=14, c="red", marker="o", zorder=3, label=f"recompute ({len(steps)})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step j (state computed)")
    ax.set_ylabel("step i (state used)")
    ax.set_title(title or f"encoder state distance, {n} steps, {len(steps)} recompute steps", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(str(tmp), format="png")
    return Path(path)


def _rect(j: int, end: int):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, j - 0.5), end - j, end - j, fill=False, edgecolor="red", linewidth=0.8)
