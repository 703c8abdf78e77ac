"""What every command shares: the stderr console, one-line messages, progress bars."""
from __future__ import annotations

import math

from rich.console import Console

from ..core.config import MAX_ADAMS_ORDER

console = Console(stderr=True)
SEED_HELP = "noise seed: image i from numpy default_rng([seed, i]) (core.noise)"
SOLVER_HELP = f"euler | adams:K (K = 1..{MAX_ADAMS_ORDER}, the official AdamLMSampler; default: the manifest's)"
FORECAST_HELP = ("encoder state at the steps that skip the encoder: 0 reuses the last one (official), 1 | 2 "
                 "extrapolate it from the last 2 | 3 recomputed states")
PLAN_HELP = ("a plan stored with the engines (`ddt-export tune`): fixes steps, solver, forecast, schedule, shift, "
             "interval")
DEVICE_LOOP_HELP = "on a TensorRT folder, keep x and s on the GPU (the default); --no-device-loop: the numpy host loop"


def say(message: str) -> None:
    """Progress messages of the library, on stderr (stdout keeps the results)."""
    console.print(message, highlight=False, soft_wrap=True)


def step_progress(label: str, unit: str = ""):
    """A rich progress bar; returns (context manager, callback(done, total)). Hidden when stderr is no terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                   transient=True, disable=not console.is_terminal)
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def duration(seconds: float) -> str:
    """HH:MM:SS, with the days in front past 24 h ("412d 03:00:00"): a clock format would wrap at a day."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-:--:--"
    days, rest = divmod(int(round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    return (f"{days}d " if days else "") + f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def image_progress(label: str, unit: str = "images"):
    """A rich bar over `unit`s (images; tune: sample-steps) with the rate and the ETA of this run: units already
    done when it starts (a resumed run) count as done but not in the rate; a total that grows (tune's estimate
    of its later stages) moves the ETA. Returns (context manager, callback(done, total)). Without a terminal
    (logs, CI) it prints a line at every tenth of the run instead."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    state = {"t0": None, "start": 0, "logged": -1}

    def rate(done: int) -> float:
        dt = time.perf_counter() - state["t0"] if state["t0"] is not None else 0.0
        return (done - state["start"]) / dt if dt > 0 else 0.0

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            r = rate(int(task.completed))
            left = (task.total - task.completed) / r if r > 0 and task.total else None
            eta = "-:--:--" if left is None else duration(left)
            return Text(f"{r:.2f} {unit}/s  ETA {eta}")

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        if state["t0"] is None:
            state["t0"], state["start"] = time.perf_counter(), done
        bar.update(task, completed=done, total=total)
        tenth = 10 * done // max(total, 1)
        if not console.is_terminal and tenth > state["logged"] and done > state["start"]:
            state["logged"] = tenth
            r = rate(done)
            eta = f", ETA {duration((total - done) / r)}" if r > 0 else ""
            say(f"{label}: {done}/{total} {unit}, {r:.2f} {unit}/s{eta}")

    return bar, update
