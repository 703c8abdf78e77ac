"""`ddt-export serve`: the app under uvicorn, with a graceful shutdown that answers 503 while it drains.

Order: every flag is checked (`settings.check_listener`, `ServeSettings`, the app's manifest limits), then the
port is bound here (`bind`: a port in use is one line, exit 2, before any engine is opened), then uvicorn
starts the app on that socket, and only once the engines are loaded and the server accepts connections does it
say "serving ... at URL" (with the real port when --port 0).

SIGTERM (or SIGINT, or the end of `lifetime_s`) starts the drain: new requests get 503 with Retry-After, the
batch loop finishes every request it holds (waiting ones included), then uvicorn stops, the lifespan closes the
engines and the process exits 0 ("stopped: every request held was answered"). A second signal stops at once:
every request still held is answered 503 ShuttingDown (JSON, or the stream's `error` event) after at most the
iteration in progress, the engines are closed, and `serve` returns 128 + the signal's number (143 for SIGTERM,
130 for SIGINT), saying how many requests it gave up. A third signal is uvicorn's own immediate exit. uvicorn's
handler would stop accepting connections at the first signal and re-raise it at exit; this one does neither.
"""
from __future__ import annotations

import errno
import logging
import signal
import socket
import time
from pathlib import Path

from ..core.errors import BackendError, ConfigError
from .settings import LOG_LEVEL, LOOPBACK, PORT, check_listener

log = logging.getLogger("ddt_export.serve")


def _uvicorn():
    try:
        import uvicorn

        return uvicorn
    except ImportError as e:
        raise BackendError("serve", "fastapi, uvicorn and prometheus-client (pip install 'ddt-export[serve]')",
                           repr(e))


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (as uvicorn binds: SO_REUSEADDR, IPv6 for an IPv6 address);
    ConfigError naming --port or --host when the system refuses."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError("--port", f"a free port on {host}", f"{port}, already in use",
                              "stop the server holding it, or pass another --port (0: any free port)") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError("--port", "a port this user may bind (ports below 1024 need privileges)",
                              f"{port}, {e.strerror}") from None
        raise ConfigError("--host", "an address of this machine (127.0.0.1, 0.0.0.0, ::1, a host name)",
                          f"{host}, {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def make_server(app, host: str = LOOPBACK, port: int = PORT, *, lifetime_s: float | None = None,
                log_level: str = LOG_LEVEL, announce=None):
    """A uvicorn Server for `app` (from `create_app`) that drains on SIGTERM/SIGINT or after `lifetime_s`, stops
    at once on a second signal, and calls `announce(port)` once it has started."""
    uvicorn = _uvicorn()

    class DrainingServer(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            self.drain_started: float | None = None
            self.halt_signal: int | None = None  # the second signal: stop at once
            self.given_up: int | None = None  # requests answered 503 unfinished by the immediate stop
            self.born = time.monotonic()

        def handle_exit(self, sig, frame) -> None:  # signal handler: no re-raise at exit, a drain first
            if self.drain_started is None:
                self.drain_started = time.monotonic()
                log.warning("signal %s: draining (new requests get 503)", signal.Signals(sig).name)
            elif self.halt_signal is None:
                self.halt_signal = sig  # acted on at the next tick, on the event loop (not in a signal handler)
            else:
                self.should_exit = self.force_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and announce is not None:
                announce(self.servers[0].sockets[0].getsockname()[1] if self.servers else port)

        async def on_tick(self, counter: int) -> bool:
            service = getattr(app.state, "service", None)
            if lifetime_s is not None and self.drain_started is None and time.monotonic() - self.born > lifetime_s:
                self.drain_started = time.monotonic()
                log.warning("lifetime of %.0f s reached: draining", lifetime_s)
            if self.halt_signal is not None and self.given_up is None and service is not None:
                self.given_up = service.halt(f"stopped at once ({signal.Signals(self.halt_signal).name} during "
                                             "the drain): this request was not finished")
                self.should_exit = True
            elif self.drain_started is not None and service is not None:
                service.drain()
                if service.idle:
                    self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level in ("debug", "info"),
                            lifespan="on", timeout_graceful_shutdown=30)
    return DrainingServer(config)


def serve(engines_dir: Path, settings, host: str = LOOPBACK, port: int = PORT, *, lifetime_s: float | None = None,
          log_level: str = LOG_LEVEL, say=print) -> int:
    """Run the server until it is told to stop (SIGTERM, SIGINT, `lifetime_s`). Returns 0 after a clean drain,
    128 + the signal's number after an immediate stop (a second signal)."""
    from .app import create_app

    check_listener(host, port, lifetime_s, log_level)
    app = create_app(engines_dir, settings)  # bad folders and flags fail here, before a port is bound
    sock = bind(host, port)

    def announce(bound: int) -> None:  # once bound and loaded: the policy auto chose is known
        levels = getattr(app.state, "levels", None)
        policy = settings.batching if levels is None or levels.policy == settings.batching else \
            f"{settings.batching}: {levels.policy}"
        say(f"serving {engines_dir} at http://{host}:{bound} (batching {policy}; page /, API /docs, "
            f"metrics /metrics)")

    server = make_server(app, host, port, lifetime_s=lifetime_s, log_level=log_level, announce=announce)
    try:
        server.run(sockets=[sock])
    except SystemExit as e:  # uvicorn's own exit when the lifespan (opening the engines) failed
        if server.started:
            raise
        raise BackendError(f"serve {engines_dir}", "the engines opened", f"startup failed (exit {e.code}; see the "
                           "log above)") from None
    finally:
        sock.close()
    if not server.started:
        raise BackendError(f"serve {host}:{port}", "the engines loaded and the server started",
                           "startup failed (see the log above)")
    if server.halt_signal is not None:
        name = signal.Signals(server.halt_signal).name
        n = server.given_up or 0
        say(f"stopped at once ({name} during the drain): {n} request{'s' if n != 1 else ''} held "
            f"{'were' if n != 1 else 'was'} answered 503 unfinished")
        return 128 + int(server.halt_signal)
    say("stopped: every request held was answered")
    return 0
