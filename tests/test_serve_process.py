"""`ddt-export serve` as a real process on 127.0.0.1 (bounded: --lifetime, and the test's timeouts): SIGTERM
finishes the requests in flight, answers new ones 503, exits 0; the server runs with torch unimportable."""
from __future__ import annotations

import signal
import threading

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_helpers import BATCHING_CHOICES, free_port, serve_process, two_held, wait_for, wait_healthy  # noqa: E402
from test_no_torch import BLOCK_TORCH  # noqa: E402


@pytest.mark.timeout(180)
def test_sigterm_finishes_in_flight_refuses_new_exits_0(digits_engines):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_process(digits_engines, port, lifetime=150)
    try:
        wait_healthy(url, proc)
        results = {}
        flights = [threading.Thread(target=lambda k=k: results.__setitem__(k, httpx.post(
            url + "/v1/generate", json={"class": k, "num": 2, "steps": 60}, timeout=120))) for k in (3, 5)]
        for t in flights:
            t.start()
        wait_for(lambda: two_held(url), 30, "two requests in flight")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(url + "/health").status_code == 503, 10, "the drain")
        late = httpx.post(url + "/v1/generate", json={"class": 1, "steps": 2}, timeout=30)
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert late.json()["error"] == "ShuttingDown" and "shutting down" in late.json()["message"]
        for t in flights:
            t.join(120)
        for k, r in results.items():  # the requests in flight when the signal came were finished
            assert r.status_code == 200 and r.json()["labels"] == [k, k] and len(r.json()["images"]) == 2
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "draining" in out and "every request held was answered" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(180)
def test_server_runs_without_torch(digits_engines):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_process(digits_engines, port, prelude=BLOCK_TORCH, lifetime=150)
    try:
        wait_healthy(url, proc)
        r = httpx.post(url + "/v1/generate", json={"class": 6, "num": 2, "steps": 5, "schedule": "uniform:2"},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 2
        with httpx.stream("POST", url + "/v1/generate", json={"class": 6, "steps": 3, "stream": True},
                          timeout=60) as s:
            assert "event: result" in s.read().decode()
        assert "ddt_requests_total" in httpx.get(url + "/metrics").text
        assert httpx.get(url + "/").status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "TORCH_MODULES []" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(60)
def test_bad_flags_fail_on_one_line_before_binding(digits_engines, tmp_path):
    from engines_cache import run_cli

    code, text = run_cli(["serve", "--engines", tmp_path / "nowhere"])
    assert code == 2 and "engine folder: expected an existing folder" in text and "Traceback" not in text
    code, text = run_cli(["serve", "--engines", digits_engines, "--batching", "dynamic"])
    assert code == 2 and f"--batching: expected {BATCHING_CHOICES}, got dynamic" in text
    code, text = run_cli(["serve", "--engines", digits_engines, "--max-images-per-request", "65"])
    assert code == 2 and "--max-images-per-request: expected 1..64" in text
    bad = tmp_path / "names.txt"
    bad.write_text("a\nb\n")
    code, text = run_cli(["serve", "--engines", digits_engines, "--class-names", bad])
    assert code == 2 and "expected 10 labels (the model's classes), got 2" in text
