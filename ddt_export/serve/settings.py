"""The server's settings and their defaults (what `ddt-export serve`'s flags set). Imports nothing heavy, so the
CLI reads these defaults without the [serve] extra installed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MAX_QUEUE = 64  # waiting requests before 503
MAX_STEPS = 1000  # steps per request
MAX_DELAY_MS = 10.0  # --batching request: how long the oldest waiting request waits for company
CFG_ROWS = 2  # rows per image while guidance is on
BATCHING = "step"
LOOPBACK = "127.0.0.1"
PORT = 8000


@dataclass(frozen=True)
class ServeSettings:
    """What the app needs besides the engine folder."""

    batching: str = BATCHING  # step | fair | request | single (runtime.batching.POLICIES)
    max_delay_ms: float = MAX_DELAY_MS
    max_queue: int = MAX_QUEUE
    max_images_per_request: Optional[int] = None  # None: batch.max / CFG_ROWS
    max_steps: int = MAX_STEPS
    class_names: Optional[Path] = None  # None: the classes are named by their ids
    backend: str = "auto"
    trace: Optional[Path] = None  # a JSON line per iteration: start, seconds, requests, rows (load benchmark)
