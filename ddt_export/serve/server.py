"""`ddt-export serve`: the app under uvicorn, with a graceful shutdown that answers 503 while it drains.

SIGTERM (or SIGINT, or the end of `lifetime_s`) starts the drain: new requests get 503 with Retry-After, the
batch loop finishes every request it holds (waiting ones included), then uvicorn stops, the lifespan closes the
engines and the process exits 0. A second signal stops at once (what is still held is lost). uvicorn's own
handler would stop accepting connections at the first signal and re-raise it at exit (exit status 143 for
SIGTERM); this one does neither.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from ..core.errors import BackendError, ConfigError
from .settings import LOOPBACK, PORT

log = logging.getLogger("ddt_export.serve")


def _uvicorn():
    try:
        import uvicorn

        return uvicorn
    except ImportError as e:
        raise BackendError("serve", "fastapi, uvicorn and prometheus-client (pip install 'ddt-export[serve]')",
                           repr(e))


def make_server(app, host: str = LOOPBACK, port: int = PORT, *, lifetime_s: float | None = None,
                log_level: str = "warning"):
    """A uvicorn Server for `app` (from `create_app`) that drains on SIGTERM/SIGINT or after `lifetime_s`."""
    uvicorn = _uvicorn()

    class DrainingServer(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            self.drain_started: float | None = None
            self.born = time.monotonic()

        def handle_exit(self, sig, frame) -> None:  # signal handler: no re-raise at exit, a drain first
            if self.drain_started is None:
                self.drain_started = time.monotonic()
                log.warning("signal %s: draining (new requests get 503)", signal.Signals(sig).name)
            else:
                self.should_exit = self.force_exit = True

        async def on_tick(self, counter: int) -> bool:
            service = getattr(app.state, "service", None)
            if lifetime_s is not None and self.drain_started is None and time.monotonic() - self.born > lifetime_s:
                self.drain_started = time.monotonic()
                log.warning("lifetime of %.0f s reached: draining", lifetime_s)
            if self.drain_started is not None and service is not None:
                service.drain()
                if service.idle:
                    self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level in ("debug", "info"),
                            lifespan="on", timeout_graceful_shutdown=30)
    return DrainingServer(config)


def serve(engines_dir: Path, settings, host: str = LOOPBACK, port: int = PORT, *, lifetime_s: float | None = None,
          log_level: str = "warning", say=print) -> None:
    """Run the server until it is told to stop (SIGTERM, SIGINT, `lifetime_s`); returns after a clean drain."""
    from .app import create_app

    if not 0 <= port <= 65535:
        raise ConfigError("--port", "0..65535", port)
    if lifetime_s is not None and not lifetime_s > 0:
        raise ConfigError("--lifetime", "> 0 seconds", lifetime_s)
    app = create_app(engines_dir, settings)  # bad folders and flags fail here, before a port is bound
    server = make_server(app, host, port, lifetime_s=lifetime_s, log_level=log_level)
    say(f"serving {engines_dir} at http://{host}:{port} (batching {settings.batching}; page /, API /docs, "
        f"metrics /metrics)")
    server.run()
    if not server.started:
        raise BackendError(f"serve {host}:{port}", "the engines loaded and the port bound",
                           "startup failed (see the log above)")
    say("stopped: every request held was answered")
