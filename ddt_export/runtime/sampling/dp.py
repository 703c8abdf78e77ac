"""The statistical DP that chooses the encoder's recompute steps, and its heatmap. Torch-free (numpy; matplotlib
for the plot).

Restates the official `sharing_sampling.py` `sharing_dp`: from encoder states recorded at every step of a
template trajectory, sim[i][j] = mean over samples and tokens of cosine(s_i, s_j); err = 1 - sim, accumulated
down each column (err[i][j] = cost of serving steps j..i from the state of step j); cost[k][i] = least total
error covering steps 0..i-1 with k recompute steps, the first forced to 0. Vectorized in float64 with the same
summation order and tie-breaking (the first minimum) as the official loops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.artifacts import atomic_path
from ...core.errors import InputError, NumericsError

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
