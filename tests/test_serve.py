"""The HTTP app on the bundled digits engines under a real uvicorn server on 127.0.0.1: the API, the OpenAPI
schema, the metrics, and every fault: 422s naming field/expected/actual, a full queue (503 + Retry-After), a
client that disconnects, a NaN in one request, an engine failure. (Pixel equality with `generate`:
test_serve_equal.py; SIGTERM and no torch: test_serve_process.py; the page: test_serve_page.py.)"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_helpers import metric, png_pixels, running, sse_events, wait_for  # noqa: E402

from ddt_export.runtime import load_engines  # noqa: E402
from ddt_export.serve.app import create_app  # noqa: E402
from ddt_export.serve.schemas import GenerateResponse  # noqa: E402
from ddt_export.serve.settings import ServeSettings  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def url(digits_engines):
    with running(create_app(digits_engines)) as u:
        yield u


def post(url, body, **kw):
    return httpx.post(url + "/v1/generate", json=body, timeout=kw.pop("timeout", 120.0), **kw)


def test_generate_json_and_openapi(url):
    r = post(url, {"class": 3, "num": 2, "seed": 5, "steps": 8, "schedule": "uniform:2"})
    assert r.status_code == 200, r.text
    body = GenerateResponse.model_validate(r.json())  # the documented response model is what comes back
    assert body.labels == [3, 3] and len(body.images) == 2
    assert body.batching == httpx.get(url + "/v1/info").json()["batching"] in ("step", "fair", "slo")  # auto's
    s = body.settings
    assert (s.class_, s.class_name, s.num, s.seed, s.steps, s.schedule) == (3, "3", 2, 5, 8, "uniform:2")
    assert s.recompute_steps == [0, 2, 4, 6] and s.cfg == 1.5 and s.interval == [0.3, 1.0]  # manifest defaults
    assert 0 <= body.timings.queue_s <= body.timings.total_s and body.timings.sampling_s > 0
    assert png_pixels(body.images[0]).shape == (16, 16) and not np.array_equal(*map(png_pixels, body.images))
    api = httpx.get(url + "/openapi.json").json()
    req = api["components"]["schemas"]["GenerateRequest"]
    assert req["additionalProperties"] is False and req["required"] == ["class"]
    assert req["properties"]["num"]["maximum"] == 32  # batch.max 64 / 2 CFG rows
    assert req["properties"]["class"]["anyOf"][0]["exclusiveMaximum"] == 10
    assert "all | uniform:R | dp:K" in req["properties"]["schedule"]["description"]  # checked when resolved
    responses = api["paths"]["/v1/generate"]["post"]["responses"]
    assert {"200", "422", "500", "503"} <= set(responses) and "text/event-stream" in responses["200"]["content"]


def test_health_info_page(url):
    assert httpx.get(url + "/health").json()["status"] == "ok"
    info = httpx.get(url + "/v1/info").json()
    assert info["classes"] == [str(i) for i in range(10)] and info["row_budget"] == 64
    assert info["defaults"]["steps"] == 50 and info["limits"]["max_images"] == 32
    cal = info["cost_calibration"]  # the curve measured at start-up, corrected while serving
    assert cal["k"] > 0 and cal["iterations"] >= 0 and cal["half_life"] == 200
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/generate" in page.text


def test_stream_progress_then_result(url):
    with httpx.stream("POST", url + "/v1/generate", json={"class": "7", "steps": 6, "stream": True},
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    kinds = [e for e, _ in events]
    assert kinds == ["queued"] + ["progress"] * 6 + ["result"]
    assert [d["step"] for e, d in events if e == "progress"] == [1, 2, 3, 4, 5, 6]
    result = events[-1][1]
    assert result["labels"] == [7] and result["settings"]["steps"] == 6
    same = post(url, {"class": 7, "steps": 6}).json()  # the stream's images are the JSON answer's
    assert np.array_equal(png_pixels(result["images"][0]), png_pixels(same["images"][0]))


BAD = [  # (body, the message's start): each names the field, the expected value and the actual one
    ({"class": 10}, "class: expected a class id in [0, 10) or a class name (GET /v1/info lists them), got 10"),
    ({"class": "seven"}, "class: expected a class id in [0, 10) or a class name, got 'seven'"),
    ({"class": 1, "num": 33}, "num: expected an integer in [1, 32] (--max-images-per-request), got 33"),
    ({"class": 1, "num": 0}, "num: expected an integer in [1, 32]"),
    ({"class": 1, "steps": 0}, "steps: expected an integer in [1, 1000] (--max-steps), got 0"),
    ({"class": 1, "steps": 1001}, "steps: expected an integer in [1, 1000] (--max-steps), got 1001"),
    ({"class": 1, "schedule": "uniform:0"}, "schedule: expected uniform:<integer in [1, 1000000]>, got uniform:0"),
    ({"class": 1, "schedule": "every"}, "schedule: expected all | uniform:R | dp:K"),
    ({"class": 1, "steps": 4, "schedule": "dp:5"}, "schedule: expected dp:K with K <= 4 (the steps), got dp:5"),
    ({"class": 1, "schedule": "/tmp/schedule.json"}, "schedule: expected all | uniform:R | dp:K"),  # no file paths
    ({"class": 1, "schedule": "../engines/default/schedule-50-10.json"}, "schedule: expected all | uniform:R"),
    ({"class": 1, "interval": [0.9, 0.1]}, "interval: expected [lo, hi] with 0 <= lo <= hi <= 1 (guidance applies "
                                           "where lo < t < hi), got [0.9, 0.1]"),
    ({"class": 1, "interval": [0.1]}, "interval: expected [lo, hi] with 0 <= lo <= hi <= 1"),
    ({"class": 1, "timeshift": 0}, "timeshift: expected a finite number in (0, 100]"),
    ({"class": 1, "cfg": 1e6}, "cfg: expected a finite number in [0, 100] (the CFG scale inside the guidance "
                               "interval), got 1000000.0"),
    ({"class": 1, "seed": -1}, "seed: expected an integer in [0, 9223372036854775807], got -1"),
    ({"class": 1, "num": "2"}, "num: expected an integer in [1, 32] (--max-images-per-request), got '2'"),
    ({"class": 1, "nmu": 2}, "nmu: expected no such field (the fields: class, num, seed"),
    ({"class": 1, "engines": "/etc"}, "engines: expected no such field"),
    ({"num": 2}, "class: expected a class id in [0, 10) or a class name (GET /v1/info lists them), got nothing"),
]


@pytest.mark.parametrize("body, message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_invalid_requests_answer_422_naming_the_field(url, body, message):
    r = post(url, body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "InputError" and r.json()["message"].startswith(message), r.json()["message"]


@pytest.mark.parametrize("raw, message", [
    ('{"class": 1, "cfg": NaN}', "cfg: expected a finite number in [0, 100]"),
    ('{"class": 1, "cfg": Infinity}', "cfg: expected a finite number in [0, 100]"),
    ('{"class": 1, "timeshift": -Infinity}', "timeshift: expected a finite number"),
    ('{"class": 1, "interval": [0.1, NaN]}', "interval: expected [lo, hi]"),
    ('{"class": 1, "num": ', "body: expected valid JSON, got"),
    ('[1, 2]', "body: expected a JSON object with the fields class, num"),
])
def test_nan_inf_and_malformed_json_answer_422(url, raw, message):
    r = httpx.post(url + "/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["message"].startswith(message), r.text


def test_server_stays_up_and_counts_outcomes(url):
    invalid = metric(url, 'ddt_requests_total{status="invalid"}')
    post(url, {"class": 99})
    assert metric(url, 'ddt_requests_total{status="invalid"}') == invalid + 1
    ok = metric(url, 'ddt_requests_total{status="ok"}')
    assert post(url, {"class": 2, "steps": 3}).status_code == 200
    assert metric(url, 'ddt_requests_total{status="ok"}') == ok + 1
    text = httpx.get(url + "/metrics").text
    for name in ("ddt_request_seconds_bucket", "ddt_queue_seconds_bucket", "ddt_active_requests",
                 'ddt_iteration_requests_bucket', 'ddt_iteration_rows_bucket{graph="decoder"',
                 'ddt_iteration_rows_bucket{graph="encoder"'):
        assert name in text, name


def test_full_queue_answers_503_with_retry_after(digits_engines):
    app = create_app(digits_engines, ServeSettings(batching="single", max_queue=1))
    with running(app) as url:
        with httpx.stream("POST", url + "/v1/generate", json={"class": 1, "steps": 60, "stream": True},
                          timeout=120) as a:
            ea = sse_events(a)
            assert next(ea)[0] == "queued" and next(ea)[0] == "progress"  # a runs alone (single) ...
            with httpx.stream("POST", url + "/v1/generate", json={"class": 2, "steps": 2, "stream": True},
                              timeout=120) as b:
                eb = sse_events(b)
                assert next(eb) == ("queued", {"id": "req-1", "waiting": 1, "plan": None,  # ... b waits: the
                                               "fid_delta": None})  # queue is full
                r = post(url, {"class": 3, "steps": 2})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"] == "QueueFull" and "fewer than 1 waiting requests (--max-queue)" in r.text
                assert [e for e, _ in ea][-1] == "result" and [e for e, _ in eb][-1] == "result"
        assert metric(url, 'ddt_requests_total{status="rejected"}') == 1
        assert metric(url, 'ddt_requests_total{status="ok"}') == 2


def _iterations(url):
    return metric(url, "ddt_iteration_requests_count")


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_frees_the_batch_at_the_next_step(digits_engines, stream):
    with running(create_app(digits_engines)) as url:
        body = {"class": 4, "steps": 1000, "stream": stream}  # minutes of work if nobody cancelled it
        if stream:
            with httpx.stream("POST", url + "/v1/generate", json=body, timeout=60) as r:
                ev = sse_events(r)
                assert [next(ev)[0] for _ in range(4)] == ["queued", "progress", "progress", "progress"]
        else:  # the client gives up waiting and closes the connection
            with pytest.raises(httpx.ReadTimeout):
                post(url, body, timeout=httpx.Timeout(60, read=1.5))
        wait_for(lambda: metric(url, 'ddt_requests_total{status="cancelled"}') == 1, 10, "the cancellation")
        assert metric(url, "ddt_active_requests") == 0
        n = _iterations(url)
        assert (3 if stream else 0) <= n < 1000  # it was cancelled long before its 1000 steps
        # the server serves on, and nothing else runs: a 2-step request alone takes exactly 2 more iterations
        assert post(url, {"class": 4, "steps": 2}).status_code == 200
        assert _iterations(url) == n + 2


class NanFor:
    """The real engines; the encoder's state turns NaN on the rows of class `label` once t > 0.5 (an injected
    fault in one request's rows, halfway through its trajectory)."""

    def __init__(self, engines, label):
        self.engines, self.label = engines, label

    def __getattr__(self, name):
        return getattr(self.engines, name)

    def run(self, graph, feeds):
        out = self.engines.run(graph, feeds)
        if graph == "encoder":
            rows = (feeds["y"] == self.label) & (feeds["t"] > 0.5)
            if rows.any():
                out = {"s": out["s"].copy()}
                out["s"][rows] = np.nan
        return out


def test_nan_in_one_request_fails_that_request_only(digits_engines, tmp_path):
    good = [{"class": c, "num": 2, "seed": c, "steps": 30, "schedule": "uniform:2"} for c in (1, 8)]
    bad = {"class": 5, "num": 2, "steps": 30}
    results, trace = {}, tmp_path / "trace.jsonl"
    # the request policy groups what arrives within 2 s and runs the group together: all three share every
    # iteration up to the fault (a gate, not a timing bet)
    settings = ServeSettings(batching="request", max_delay_ms=2000.0, trace=trace)
    with running(create_app(digits_engines, settings, open_engines=lambda f: NanFor(load_engines(f), 5))) as url:

        def go(k, b):
            results[k] = post(url, b)

        threads = [threading.Thread(target=go, args=(k, b)) for k, b in enumerate([good[0], bad, good[1]])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alone = {k: post(url, b).json() for k, b in ((0, good[0]), (2, good[1]))}
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    failing = [rec for rec in records if rec["failed"]]
    assert len(failing) == 1 and failing[0]["requests"] == 3  # it failed in an iteration shared with both others
    r = results[1]
    assert r.status_code == 500 and r.json()["error"] == "NumericsError", r.text
    assert r.json()["message"].startswith("step ") and "expected finite values" in r.json()["message"]
    assert any(t in r.json()["message"] for t in ("encoder output s", "decoder output v", "latents x"))
    for k in (0, 2):
        assert results[k].status_code == 200
        for x, y in zip(results[k].json()["images"], alone[k]["images"]):
            assert np.array_equal(png_pixels(x), png_pixels(y))  # unchanged by the failure beside them


class Flaky:
    """The real engines; the next decoder call raises once `armed` is set (an injected engine fault)."""

    def __init__(self, engines):
        self.engines, self.armed = engines, threading.Event()

    def __getattr__(self, name):
        return getattr(self.engines, name)

    def run(self, graph, feeds):
        if graph == "decoder" and self.armed.is_set():
            self.armed.clear()
            raise RuntimeError("injected decoder failure")
        return self.engines.run(graph, feeds)


def test_engine_failure_fails_the_iteration_and_the_server_stays_up(digits_engines):
    holder = {}

    def open_engines(folder):
        holder["e"] = Flaky(load_engines(folder))
        return holder["e"]

    # `step`: both requests run in every iteration (under `auto` = `slo` on this CPU the more urgent one runs
    # alone, and whether the other has started by then depends on the machine's speed)
    with running(create_app(digits_engines, ServeSettings(batching="step"), open_engines=open_engines)) as url:
        results = {}
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(
            k, post(url, {"class": k, "steps": 200}))) for k in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: metric(url, "ddt_active_requests") == 2, 30, "both requests in the batch")
        holder["e"].armed.set()
        for t in threads:
            t.join()
        for r in results.values():
            assert r.status_code == 500 and r.json()["error"] == "BackendError"
            assert r.json()["message"] == ("engine call (encoder/decoder): expected a successful graph call, got "
                                           "RuntimeError: injected decoder failure")
        assert httpx.get(url + "/health").status_code == 200
        assert post(url, {"class": 0, "steps": 3}).status_code == 200
        assert metric(url, 'ddt_requests_total{status="failed"}') == 2


def test_class_names_file(digits_engines, tmp_path):
    names = tmp_path / "labels.txt"  # the official imagenet_classlabels.txt format, for the 10 digits
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    names.write_text("\n".join(f"| {i}        | {w}, digit {w} |" for i, w in enumerate(words)))
    with running(create_app(digits_engines, ServeSettings(class_names=names))) as url:
        assert httpx.get(url + "/v1/info").json()["classes"][7] == "seven, digit seven"
        r = post(url, {"class": "Seven", "steps": 2})  # one spelling: the label's case counts
        assert r.status_code == 422 and "got 'Seven' (did you mean 'seven'?" in r.json()["message"], r.text
        r = post(url, {"class": "seven", "steps": 2})
        assert r.status_code == 200 and r.json()["labels"] == [7] and r.json()["settings"]["class_name"] == (
            "seven, digit seven")
        assert post(url, {"class": "digit three", "steps": 2}).json()["labels"] == [3]
        assert post(url, {"class": "7", "steps": 2}).json()["labels"] == [7]  # an id as text
        r = post(url, {"class": "ten", "steps": 2})
        assert r.status_code == 422 and str(names) in r.json()["message"]
