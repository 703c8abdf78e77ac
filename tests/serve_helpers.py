"""What the server tests share: the app under a real uvicorn server on 127.0.0.1 (in a thread, or a subprocess
that stops itself), requests, PNG decoding, one metric's value."""
from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running(app, timeout: float = 60.0):
    """Serve `app` on 127.0.0.1 (a free port) in a thread; yields the base URL; stops it at the end."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True, name="test-uvicorn")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        assert not thread.is_alive(), "the test server did not stop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(engines: Path, port: int, *args: str, prelude: str = "", lifetime: float = 120.0):
    """`ddt-export serve` in a subprocess on 127.0.0.1:port that drains and exits by itself after `lifetime` s.
    `prelude`: Python run before the CLI (e.g. making torch unimportable); afterwards the child prints the torch
    modules it loaded on a `TORCH_MODULES` line."""
    argv = ["serve", "--engines", str(engines), "--port", str(port), "--lifetime", str(lifetime), *args]
    code = (prelude + "\nimport sys, cli\ntry:\n    cli.main(%r)\nexcept SystemExit as e:\n    code = e.code or 0\n"
            "else:\n    code = 0\nprint('TORCH_MODULES', sorted(m for m in sys.modules if m == 'torch' or "
            "m.startswith('torch.')), flush=True)\nsys.exit(code)\n") % (argv,)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_healthy(url: str, proc=None, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become healthy")


def png_pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def file_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


# --batching's choices as its error message lists them: a literal, not built from POLICIES, so that it stays an
# independent expected value (one place to change when a policy is added)
BATCHING_CHOICES = "auto | step | fair | slo | request | single"


def metrics(url: str, *names: str) -> tuple[float, ...]:
    """Samples of one GET /metrics (read together), e.g. metrics(url, 'ddt_requests_total{status="ok"}')."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=5.0).text
    out = []
    for name in names:
        m = re.search(r"^" + re.escape(name) + r" (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        out.append(float(m.group(1)))
    return tuple(out)


def metric(url: str, name: str) -> float:
    """One sample of GET /metrics, e.g. metric(url, 'ddt_requests_total{status="ok"}')."""
    return metrics(url, name)[0]


def two_held(url: str) -> bool:
    """Two requests in flight: running, or waiting for their first step (`slo`, auto's choice on a linear curve,
    admits a request when it first steps, so the second may wait behind the first), at least one running."""
    active, waiting = metrics(url, "ddt_active_requests", "ddt_waiting_requests")
    return active + waiting == 2 and active >= 1


def wait_for(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sse_events(response):
    """(event, data) pairs of an httpx streaming response, as they arrive."""
    import json

    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])
