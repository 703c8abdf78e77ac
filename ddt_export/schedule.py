"""Encoder schedules: which steps recompute the encoder state. Torch-free (numpy, matplotlib for the heatmap).

Specs: `all` (every step), `uniform:R` (every R-th step from 0, the official state_refresh_rate), `dp:K` (K
steps chosen by the statistical DP; resolved against engines by `ddt_export.generate`), or a JSON file
`{"recompute_steps": [...], ...}`. Every schedule contains step 0: the first step has no state to reuse.

The statistical DP restates the official `sharing_sampling.py` `sharing_dp`: from encoder states recorded at
every step of a template trajectory, sim[i][j] = mean over samples and tokens of cosine(s_i, s_j);
err = 1 - sim, accumulated down each column (err[i][j] = cost of serving steps j..i from the state of step j);
cost[k][i] = least total error covering steps 0..i-1 with k recompute steps, the first forced to 0. Vectorized
in float64 with the same summation order and tie-breaking (the first minimum) as the official loops.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError, NumericsError
from .manifest import write_json

SCHEDULE_KINDS = ("all", "uniform:R", "dp:K", "FILE.json")


@dataclass(frozen=True)
class ScheduleSpec:
    kind: str  # all | uniform | dp | file
    value: int | None = None  # R for uniform, K for dp
    path: Path | None = None


def parse_spec(text: str) -> ScheduleSpec:
    """`all`, `uniform:R`, `dp:K` or a path to a schedule JSON."""
    text = str(text).strip()
    if text == "all":
        return ScheduleSpec("all")
    head, sep, tail = text.partition(":")
    if sep and head in ("uniform", "dp"):
        try:
            value = int(tail)
        except ValueError:
            raise InputError("--schedule", f"{head}:<positive integer>", text)
        if value < 1:
            raise InputError("--schedule", f"{head}:<positive integer>", text)
        return ScheduleSpec(head, value)
    path = Path(text)
    if path.suffix == ".json":
        if not path.is_file():
            raise InputError("--schedule", "an existing schedule JSON file", text)
        return ScheduleSpec("file", path=path)
    raise InputError("--schedule", " | ".join(SCHEDULE_KINDS), text)


def validate_steps(steps: Sequence[int], num_steps: int, where: str = "schedule") -> list[int]:
    """Recompute steps as a sorted list of distinct ints in [0, N) starting at 0, else InputError."""
    try:
        out = [int(s) for s in steps]
    except (TypeError, ValueError):
        raise InputError(where, "a list of integer steps", repr(steps)[:80])
    if any(o != s for o, s in zip(out, steps) if isinstance(s, float)):
        raise InputError(where, "integer steps", repr(list(steps))[:80])
    if not out:
        raise InputError(where, "at least one recompute step (step 0)", "none")
    if out != sorted(set(out)):
        raise InputError(where, "strictly increasing steps", out)
    if out[0] != 0:
        raise InputError(where, "step 0 first (the first step has no state to reuse)", out[0])
    if out[-1] >= num_steps:
        raise InputError(where, f"steps in [0, {num_steps}) for {num_steps} sampling steps", out[-1])
    return out


def uniform_steps(num_steps: int, rate: int) -> list[int]:
    """Every rate-th step from 0: the official `i % state_refresh_rate == 0`."""
    if rate < 1:
        raise InputError("uniform:R", "R >= 1", rate)
    return list(range(0, num_steps, rate))


def read_schedule_json(path: Path, num_steps: int) -> list[int]:
    """Recompute steps from a schedule JSON; its num_steps, when recorded, must equal N."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"schedule {path}", "a readable JSON file", str(e))
    if not isinstance(doc, dict) or "recompute_steps" not in doc:
        raise InputError(f"schedule {path}", '{"recompute_steps": [...], ...}', type(doc).__name__ if not
                         isinstance(doc, dict) else f"keys {sorted(doc)}")
    if "num_steps" in doc and doc["num_steps"] != num_steps:
        raise InputError(f"schedule {path}: num_steps", num_steps, doc["num_steps"],
                         "the schedule was computed for another step count")
    return validate_steps(doc["recompute_steps"], num_steps, f"schedule {path}: recompute_steps")


def steps_for(spec: ScheduleSpec, num_steps: int) -> list[int]:
    """Steps for every kind but `dp`, which needs the engines (see ddt_export.generate.resolve_schedule)."""
    if spec.kind == "all":
        return list(range(num_steps))
    if spec.kind == "uniform":
        return uniform_steps(num_steps, spec.value)
    if spec.kind == "file":
        return read_schedule_json(spec.path, num_steps)
    raise AssertionError(f"{spec.kind} schedules are resolved against engines")


# ------------------------------------------------------------------------------------------------- the DP


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


def schedule_record(steps: list[int], num_steps: int, **settings) -> dict:
    return {"recompute_steps": list(map(int, steps)), "num_steps": num_steps, "recompute": len(steps), **settings}


def write_schedule(path: Path, record: dict) -> Path:
    write_json(Path(path), record)
    return Path(path)


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return Path(path)


def _rect(j: int, end: int):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, j - 0.5), end - j, end - j, fill=False, edgecolor="red", linewidth=0.8)
