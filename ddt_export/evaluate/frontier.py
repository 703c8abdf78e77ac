"""The frontier `tune` writes: Pareto sets, plan names, the plans and the plot. Torch-free.

A point is (network GFLOP per image, error): the error is the trajectory error of the probe stage or |dFID| of
the confirmation stage, smaller is better on both axes. A point is on the frontier when no other point is at
most as costly and at most as far from the reference, and strictly better in one of the two.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Hashable, Sequence, TypeVar

from ..core.artifacts import atomic_path
from ..runtime.sampling.plans import FAST, FRONTIER, PLANS_DIR

T = TypeVar("T")
REFERENCE = "reference"  # the model's own trajectory, written as a plan beside the frontier


def pareto(points: Sequence[T], key: Callable[[T], tuple[float, float]]) -> list[T]:
    """The points no other point dominates, cheapest first (equal points: the first one given is kept)."""
    order = sorted(range(len(points)), key=lambda i: (key(points[i]), i))
    out, best = [], float("inf")
    for i in order:
        cost, err = key(points[i])
        if err < best:  # cheaper ones are all worse: nothing dominates this one
            out.append(points[i])
            best = err
    return out


def spread(items: Sequence[T], count: int) -> list[T]:
    """`count` items evenly spaced along `items` (its first and last included), in order."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def cheapest_first(points: Sequence[T], cost: Callable[[T], float], error: Callable[[T], float],
                   same: Callable[[T], Hashable]) -> list[T]:
    """The points cheapest first (equal cost: smaller error first), one of each group with the same `same` key
    (tune: identical probe results, the same trajectory under another name)."""
    out, seen = [], set()
    for p in sorted(points, key=lambda p: (cost(p), error(p))):
        k = same(p)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def walk(order: Sequence[T], measure: Callable[[T], bool], limit: int) -> tuple[list[T], T | None]:
    """`measure` (True: it passes) each of `order` in turn until one passes or `limit` are measured; returns
    (the measured ones, the passing one or None). With `order` cheapest first, the passing one is the cheapest
    of `order` that passes whenever it is among the first `limit`."""
    done: list[T] = []
    for p in order[:max(limit, 0)]:
        done.append(p)
        if measure(p):
            return done, p
    return done, None


def plan_name(solver: str, steps: int, schedule: str, forecast: int, timeshift: float,
              interval: tuple[float, float], reference_interval: tuple[float, float]) -> str:
    """A plan name that says what the plan is: `adams2-10-uniform2-f1`, `euler-12-all-shift1p5-cfg0p4-1`."""
    def num(v: float) -> str:
        return f"{v:g}".replace(".", "p").replace("-", "m")

    parts = [solver.replace(":", ""), str(steps), schedule.replace(":", "")]
    if forecast:
        parts.append(f"f{forecast}")
    if timeshift != 1.0:
        parts.append(f"shift{num(timeshift)}")
    if tuple(interval) != tuple(reference_interval):
        parts.append(f"cfg{num(interval[0])}-{num(interval[1])}")
    return "-".join(parts)


def plot_frontier(probed: list[dict], confirmed: list[dict], budget: float, path: Path, metric: str,
                  title: str) -> Path:
    """plans/frontier.png: the probe's metric (named `metric`) of every probed candidate and |dFID| of the
    confirmed ones against network GFLOP per image, each stage's frontier drawn, the budget and `fast` marked.
    Rows are tune's records (`gflop`, `metric`, `dfid`, `name`, `frontier`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ref = next(r for r in probed if r["name"] == REFERENCE)
    pts = [r for r in probed if r["name"] != REFERENCE and r["metric"] is not None]
    floor = min([r["metric"] for r in pts if r["metric"] > 0] or [1e-6]) / 2
    for ax in (ax1, ax2):
        ax.axvline(ref["gflop"], color="grey", lw=0.8, ls=":")
        ax.axvline(ref["gflop"] / 5, color="tab:green", lw=0.8, ls=":", label="5x (20% of the reference)")
        ax.set_xscale("log")
        ax.set_xlabel("network GFLOP per image")
    ax1.scatter([r["gflop"] for r in pts], [max(r["metric"], floor) for r in pts], s=10, c="lightgrey",
                label="probed")
    front = sorted((r for r in pts if r.get("frontier")), key=lambda r: r["gflop"])
    ax1.plot([r["gflop"] for r in front], [max(r["metric"], floor) for r in front], "o-", ms=4,
             c="tab:blue", label="probe frontier")
    ax1.set_yscale("log")
    ax1.set_ylabel(metric)
    ax1.legend(fontsize=7)
    ax2.axhline(budget, color="tab:red", lw=0.8, ls="--", label=f"budget |dFID| <= {budget:g}")
    ax2.scatter([r["gflop"] for r in confirmed], [abs(r["dfid"]) for r in confirmed], s=16, c="tab:blue",
                label="confirmed (FID)")
    cf = sorted((r for r in confirmed if r.get("frontier")), key=lambda r: r["gflop"])
    ax2.plot([r["gflop"] for r in cf], [abs(r["dfid"]) for r in cf], "-", c="tab:blue", lw=1)
    for r in confirmed:
        if r.get("plan") == FAST:
            ax2.scatter([r["gflop"]], [abs(r["dfid"])], s=120, marker="*", c="tab:orange", zorder=3,
                        label=f"{FAST}: {r['name']}")
    ax2.set_yscale("symlog", linthresh=max(budget, 1e-3))  # linear up to the budget, logarithmic beyond
    ax2.set_ylabel("|FID(plan, data) - FID(reference, data)|")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), format="png")
    return path


def frontier_paths(folder: Path) -> tuple[Path, Path]:
    d = Path(folder) / PLANS_DIR
    return d / f"{FRONTIER}.json", d / f"{FRONTIER}.png"
