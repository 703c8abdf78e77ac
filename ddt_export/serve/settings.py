"""The server's settings and their defaults (what `ddt-export serve`'s flags set), checked once, here: the app's
when `ServeSettings` is made, the listener's (`check_listener`: host, port, lifetime, log level) before anything
binds; the limits that depend on the engines (--max-images-per-request <= batch.max) when the app reads the
manifest, still before the bind. Imports nothing of the [serve] extra, so the CLI reads these defaults without
it installed."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..core.errors import ConfigError
from ..runtime.batching.scheduler import POLICIES
from ..runtime.batching.slo import ADAPT, CHEAPEST, SLO_SCALE
from ..runtime.graphs.backends import CHOICES as BACKENDS

MAX_QUEUE = 64  # waiting requests before 503
MAX_STEPS = 1000  # steps per request
MAX_DELAY_MS = 10.0  # --batching request: how long the oldest waiting request waits for company
CFG_ROWS = 2  # rows per image while guidance is on
AUTO = "auto"  # --batching auto: the policy the simulator predicts best for the cost curve fitted at start-up
BATCHING = AUTO
BATCHINGS = (AUTO, *POLICIES)
LOOPBACK = "127.0.0.1"
PORT = 8000
LOG_LEVEL = "warning"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


@dataclass(frozen=True)
class ServeSettings:
    """What the app needs besides the engine folder."""

    batching: str = BATCHING  # auto | step | fair | slo | request | single (runtime.batching.POLICIES)
    max_delay_ms: float = MAX_DELAY_MS
    max_queue: int = MAX_QUEUE
    max_images_per_request: Optional[int] = None  # None: batch.max / CFG_ROWS
    max_steps: int = MAX_STEPS
    class_names: Optional[Path] = None  # None: the classes are named by their ids
    backend: str = "auto"
    trace: Optional[Path] = None  # a JSON line per iteration: start, seconds, requests, rows (load benchmark)
    slo_scale: float = SLO_SCALE  # a request's SLO: this many times its predicted solo latency
    cost_curve: Optional[Path] = None  # a stored cost curve instead of the timed calls at start-up
    adapt: str = CHEAPEST  # where a late request that allows a trade goes: cheapest | least-dfid

    def __post_init__(self):
        if self.batching not in BATCHINGS:
            raise ConfigError("--batching", " | ".join(BATCHINGS), self.batching)
        if isinstance(self.slo_scale, bool) or not isinstance(self.slo_scale, (int, float)) or not (
                math.isfinite(self.slo_scale) and self.slo_scale >= 1):
            raise ConfigError("--slo-scale", "a finite number >= 1 (the SLO: latency <= this x the predicted solo "
                              "latency)", self.slo_scale)
        if self.adapt not in ADAPT:
            raise ConfigError("--adapt", " | ".join(ADAPT), self.adapt)
        if self.cost_curve is not None and not Path(self.cost_curve).is_file():
            raise ConfigError("--cost-curve", "a cost-curve JSON file", str(self.cost_curve))
        if not self.max_queue >= 1:
            raise ConfigError("--max-queue", ">= 1", self.max_queue)
        if self.max_images_per_request is not None and not self.max_images_per_request >= 1:
            raise ConfigError("--max-images-per-request", ">= 1 (default: the engines' batch.max / 2)",
                              self.max_images_per_request)
        if not self.max_steps >= 1:
            raise ConfigError("--max-steps", ">= 1", self.max_steps)
        if not self.max_delay_ms >= 0:  # NaN too
            raise ConfigError("--max-delay-ms", ">= 0", self.max_delay_ms)
        if self.backend not in BACKENDS:
            raise ConfigError("--backend", " | ".join(BACKENDS), self.backend)


def check_listener(host: str, port: int, lifetime_s: float | None = None, log_level: str = LOG_LEVEL) -> None:
    """The listener's flags, before anything binds: --host, --port (0: any free port), --lifetime, --log-level."""
    if not isinstance(host, str) or not host.strip():
        raise ConfigError("--host", "an address to bind (127.0.0.1, 0.0.0.0, ::1, a host name)", repr(host))
    if not 0 <= port <= 65535:
        raise ConfigError("--port", "0..65535 (0: any free port)", port)
    if lifetime_s is not None and not (math.isfinite(lifetime_s) and lifetime_s > 0):
        raise ConfigError("--lifetime", "a finite number of seconds > 0", lifetime_s)
    if log_level not in LOG_LEVELS:
        raise ConfigError("--log-level", " | ".join(LOG_LEVELS), log_level)
