"""Where `serve` meets signals, ports, flags and odd bodies (issue 24), against a real uvicorn on 127.0.0.1: the
second SIGTERM stops at once (503s, no traceback, exit 143), "serving" only once bound and loaded, a port in use
and every bad flag are one line before anything binds, unparsable bodies in the API's error shape and counted,
the CLI and the API refusing the same values with the same sentence, /docs with no internet."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import cli  # noqa: E402
from engines_cache import run_cli  # noqa: E402
from serve_helpers import (BATCHING_CHOICES, free_port, metric, running, serve_process, sse_events,  # noqa: E402
                           two_held, wait_for, wait_healthy)

from ddt_export.serve.app import create_app  # noqa: E402

ROOT = Path(cli.__file__).parent
pytestmark = pytest.mark.timeout(300)


def post(url, body, **kw):
    return httpx.post(url + "/v1/generate", json=body, timeout=kw.pop("timeout", 120.0), **kw)


@pytest.fixture(scope="module")
def url(digits_engines):
    with running(create_app(digits_engines)) as u:
        yield u


# ------------------------------------------------------------------------------ 7: the second SIGTERM


def test_second_sigterm_stops_at_once_without_a_traceback(digits_engines):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_process(digits_engines, port, lifetime=250)
    try:
        wait_healthy(url, proc)
        got = {}

        def json_client():
            got["json"] = post(url, {"class": 3, "num": 2, "steps": 1000}, timeout=120)

        def stream_client():
            with httpx.stream("POST", url + "/v1/generate", json={"class": 5, "steps": 1000, "stream": True},
                              timeout=120) as r:
                got["stream"] = list(sse_events(r))

        clients = [threading.Thread(target=f) for f in (json_client, stream_client)]
        for t in clients:
            t.start()
        wait_for(lambda: two_held(url), 60, "two requests in flight")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(url + "/health").status_code == 503, 30, "the drain")
        proc.send_signal(signal.SIGTERM)
        for t in clients:
            t.join(120)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    r = got["json"]
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json() == {"error": "ShuttingDown", "message": "server: expected to finish the request, got stopped at "
                        "once (SIGTERM during the drain): this request was not finished"}
    kind, data = got["stream"][-1]
    assert kind == "error" and data["status"] == 503 and data["error"] == "ShuttingDown", got["stream"]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "CancelledError" not in out and "every request held was answered" not in out
    assert "stopped at once (SIGTERM during the drain): 2 requests held were answered 503 unfinished" in out, out


# ------------------------------------------------------------------------------ 8, 9: bound before "serving"


def test_serving_line_comes_once_bound_and_loaded(digits_engines):
    """--port 0: the line names the port the kernel gave, and the server answers there the moment it is said."""
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--engines", str(digits_engines), "--port", "0",
                             "--lifetime", "60"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"serving \S+ at (http://127\.0\.0\.1:(\d+)) \(batching auto: (fair|step|slo); page /, API /docs, "
                         r"metrics /metrics\)\n", line)  # the policy auto chose for the measured cost curve
        assert m and int(m.group(2)) != 0, line
        assert httpx.get(m.group(1) + "/health", timeout=5).json()["status"] == "ok"  # no wait: up already
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped: every request held was answered" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def taken_port():
    """A port held by a listening socket of the test's own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def serve_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "serve", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_port_in_use_is_one_line(digits_engines, taken_port):
    r = serve_cli("--engines", digits_engines, "--port", taken_port)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: ConfigError: --port: expected a free port on 127.0.0.1, got {taken_port}, already in use (stop the "
        "server holding it, or pass another --port (0: any free port))"]


# ------------------------------------------------------------------------------ 12: every flag before the bind


BAD_FLAGS = [
    (["--max-queue", 0], "--max-queue: expected >= 1, got 0"),
    (["--max-queue", -5], "--max-queue: expected >= 1, got -5"),
    (["--backend", "foo"], "--backend: expected auto | onnxruntime | tensorrt, got foo"),
    (["--log-level", "loud"], "--log-level: expected critical | error | warning | info | debug | trace, got loud"),
    (["--max-images-per-request", 0], "--max-images-per-request: expected >= 1 (default: the engines' batch.max / "
                                      "2), got 0"),
    (["--max-images-per-request", 65], "--max-images-per-request: expected 1..64 (the engines' batch.max"),
    (["--max-steps", 0], "--max-steps: expected >= 1, got 0"),
    (["--max-delay-ms", "nan"], "--max-delay-ms: expected >= 0, got nan"),
    (["--lifetime", 0], "--lifetime: expected a finite number of seconds > 0, got 0.0"),
    (["--lifetime", "inf"], "--lifetime: expected a finite number of seconds > 0, got inf"),
    (["--batching", "dynamic"], f"--batching: expected {BATCHING_CHOICES}, got dynamic"),
    (["--host", "nonexistent.invalid"], "--host: expected an address of this machine"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(map(str, f)) for f, _ in BAD_FLAGS])
def test_bad_flags_fail_before_anything_binds(digits_engines, taken_port, flags, message):
    """The port is taken: a flag checked after the bind would fail on the port instead. Each error is the flag's,
    on one line, exit 2, and nothing says "serving"."""
    port = ["--port", taken_port] if flags[0] != "--host" else ["--port", 0]
    r = serve_cli("--engines", digits_engines, *port, *flags)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: (ConfigError|InputError): ", lines[0]), r.stderr
    assert lines[0].split(": ", 2)[2].startswith(message), r.stderr


def test_port_out_of_range_is_one_line():
    r = serve_cli("--port", 70000)
    assert r.returncode == 2 and r.stderr.strip() == ("error: ConfigError: --port: expected 0..65535 (0: any free "
                                                      "port), got 70000")


# ------------------------------------------------------------------------------ 13: bodies FastAPI cannot parse


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000 + b"]" * 100_000, "body: expected a JSON object of the request's fields (nested a few levels), "
                                      "got JSON nested too deep to parse"),
    (b'{"class": "\xff\xfe"}', "body: expected JSON in UTF-8, got bytes that are not UTF-8 (byte 11: b'\\xff')"),
    (b'{"class": 3, "seed": "caf\xe9"}', "body: expected JSON in UTF-8, got bytes that are not UTF-8 (byte 25: "
                                         "b'\\xe9')"),
])
def test_unparsable_bodies_answer_422_in_the_api_shape_and_are_counted(url, raw, message):
    invalid = metric(url, 'ddt_requests_total{status="invalid"}')
    r = httpx.post(url + "/v1/generate", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422 and r.json() == {"error": "InputError", "message": message}, r.text
    assert metric(url, 'ddt_requests_total{status="invalid"}') == invalid + 1
    assert httpx.get(url + "/health").json()["status"] == "ok"  # still up


def test_framework_errors_keep_the_shape(url):
    r = httpx.get(url + "/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "NotFound", "message": "GET /nowhere: Not Found"}
    r = httpx.get(url + "/v1/generate")
    assert r.status_code == 405 and r.json()["error"] == "MethodNotAllowed"


# ------------------------------------------------------------------------------ 14, 15: one validation, two doors


SAME = [  # (CLI flags, API body fields): refused by both with the same sentence, the field named each way
    (["--cfg", "1e308"], {"cfg": 1e308}),
    (["--cfg", "-1"], {"cfg": -1.0}),  # the same value: typer reads --cfg as a float
    (["--cfg", "100.5"], {"cfg": 100.5}),
    (["--seed", str(2 ** 64)], {"seed": 2 ** 64}),
    (["--seed", "-1"], {"seed": -1}),
    (["--class", " 3 "], {"class": " 3 "}),
    (["--class", "03"], {"class": "03"}),
    (["--class", "\u0663"], {"class": "\u0663"}),
    (["--class", "+3"], {"class": "+3"}),
    (["--class", "10"], {"class": "10"}),  # (an int 10 fails the schema's range first, naming GET /v1/info)
    (["--steps", "0"], {"steps": 0}),
    (["--schedule", "dp:0"], {"schedule": "dp:0"}),
]


@pytest.mark.parametrize("flags, body", SAME, ids=[" ".join(f) for f, _ in SAME])
def test_cli_and_api_refuse_the_same_values_with_the_same_sentence(digits_engines, url, tmp_path, flags, body):
    r = post(url, {"class": 1, **body})
    assert r.status_code == 422, r.text
    api = r.json()["message"]
    code, text = run_cli(["generate", "--engines", digits_engines, "--num", 1, "--steps", 2, *flags, "--out",
                          tmp_path / "o"])
    assert code == 2 and not (tmp_path / "o").exists(), text
    cli_line = text.strip().splitlines()[-1]
    field = flags[0][2:]
    assert cli_line.startswith("error: InputError: --" + field + ": "), cli_line
    said = cli_line.split(": ", 2)[2]  # after "error: InputError: "
    # the API's limits are the server's: its steps message names --max-steps' range; the rest is word for word
    if field == "steps":
        assert said.startswith("--steps: expected an integer >= 1, got 0") and api.startswith("steps: expected an "
                                                                                               "integer in [1, 1000]")
    else:
        assert said == "--" + api, (said, api)


def test_cli_and_api_accept_the_edges_of_the_ranges(digits_engines, url, tmp_path):
    body = {"class": "3", "cfg": 100, "seed": 2 ** 63 - 1, "steps": 2}
    r = post(url, body)
    assert r.status_code == 200 and r.json()["settings"]["cfg"] == 100 and r.json()["labels"] == [3], r.text
    code, text = run_cli(["generate", "--engines", digits_engines, "--class", "3", "--cfg", 100, "--seed", 2 ** 63 - 1,
                          "--steps", 2, "--num", 1, "--out", tmp_path / "o"])
    assert code == 0 and (tmp_path / "o" / "00000-class3.png").is_file(), text


# ------------------------------------------------------------------------------ 16: /docs with no internet


def test_docs_load_only_from_the_server(url):
    page = httpx.get(url + "/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert refs and all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, no font service
    sizes = {}
    for ref in refs:
        r = httpx.get(url + ref)
        assert r.status_code == 200, ref
        sizes[ref] = len(r.content)
    assert max(sizes.values()) > 500_000, sizes  # the Swagger UI bundle itself
    redoc = httpx.get(url + "/redoc")
    assert redoc.status_code == 200 and "https://" not in redoc.text and "http://" not in redoc.text
    assert httpx.get(url + "/openapi.json").json()["info"]["title"] == "ddt-export serve"


def test_docs_without_the_viewer_point_at_the_schema(digits_engines, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_viewer(name, *args, **kwargs):
        if name == "fastapi_offline":
            raise ImportError("no fastapi_offline (stand-in for an install without it)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_viewer)
    with running(create_app(digits_engines)) as u:
        page = httpx.get(u + "/docs")
        assert page.status_code == 200 and 'href="/openapi.json"' in page.text and "https://" not in page.text
        assert httpx.get(u + "/openapi.json").status_code == 200
