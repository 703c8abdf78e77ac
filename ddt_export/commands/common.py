"""What every command shares: the stderr console, one-line messages, progress bars."""
from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
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
