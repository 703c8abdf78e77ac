"""How the library talks to its caller: `Say` for one-line messages, `Progress` for counters. Torch-free.

Library functions take `say` and `progress` callables instead of printing, so the CLI decides where messages go
(stderr, a rich progress bar) and tests and the server can collect or drop them.
"""
from __future__ import annotations

from typing import Callable

Say = Callable[[str], None]  # one line for the user
Progress = Callable[[int, int], None]  # (done, total)


def silent(message: str) -> None:
    """A `Say` that drops everything."""
