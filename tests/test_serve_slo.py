"""Service levels over HTTP, on the bundled digits engines under a real uvicorn server on 127.0.0.1: a request moved
to a cheaper stored plan equals `ddt-export generate --plan` for that plan (the PNGs compared), the response and
the SSE events say which plan ran and its dFID, 503 only when no plan within the budget fits, /metrics counts SLO
met and missed, the 422s of the new fields, a folder with no frontier, --batching auto, the flags checked before
binding, and the measured-run driver against the simulator.

The plans are written by hand (`plans.write_plan`), their measurements stated here, not measured: `mid` (10
steps, dFID 0.5) and `fast` (4 steps, dFID 2.0). The servers read a stated cost curve (--cost-curve: 0.01 s per
encoder row and per decoder row), so every decision below is derived by hand, whatever this machine's speed:
the folder's own plan (50 steps, cfg 1.5, guided from step 16) for 2 images costs 16 x 0.04 + 34 x 0.08 = 3.36
s alone; `mid` (guided from step 3 of 10) 3 x 0.04 + 7 x 0.08 = 0.68 s; `fast` (guided from step 1 of 4)
0.04 + 3 x 0.08 = 0.28 s. A request alone (each test waits for its answers) is projected to finish after those."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from engines_cache import run_cli  # noqa: E402
from serve_helpers import BATCHING_CHOICES, file_pixels, metric, png_pixels, running, sse_events  # noqa: E402

from ddt_export.core.errors import ConfigError  # noqa: E402
from ddt_export.core.manifest import read_manifest  # noqa: E402
from ddt_export.runtime import load_engines  # noqa: E402
from ddt_export.runtime.batching.costs import CostCurve  # noqa: E402
from ddt_export.runtime.batching.report import compare  # noqa: E402
from ddt_export.runtime.batching.simulate import Arrival, simulate  # noqa: E402
from ddt_export.runtime.sampling.plans import Plan, write_plan  # noqa: E402
from ddt_export.runtime.sampling.request import API, RequestInput, resolve  # noqa: E402
from ddt_export.runtime.sampling.schedules import resolve_schedule  # noqa: E402
from ddt_export.serve.app import create_app  # noqa: E402
from ddt_export.serve.load import Shot, measured_run  # noqa: E402
from ddt_export.serve.schemas import GenerateResponse  # noqa: E402
from ddt_export.serve.settings import ServeSettings  # noqa: E402

pytestmark = pytest.mark.timeout(600)
ROWS = (1, 2, 4, 8, 16, 32, 64)
LINEAR = CostCurve(tuple((r, 0.01 * r) for r in ROWS), tuple((r, 0.01 * r) for r in ROWS), note="stated for tests")


@pytest.fixture(scope="module")
def curve_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("curve") / "curve.json"
    path.write_text(json.dumps(LINEAR.to_dict()))
    return path


@pytest.fixture(scope="module")
def planned(digits_engines, tmp_path_factory):
    """A copy of the digits engines with two hand-written plans (measurements stated, not measured)."""
    d = tmp_path_factory.mktemp("planned") / "fp16"
    shutil.copytree(digits_engines, d)
    prov = read_manifest(d).provenance
    write_plan(d, Plan("mid", 10, schedule="all", interval=(0.3, 1.0), measured={"dfid": 0.5}), prov)
    write_plan(d, Plan("fast", 4, schedule="all", interval=(0.3, 1.0), measured={"dfid": 2.0}), prov)
    write_plan(d, Plan("unmeasured", 6, schedule="all", interval=(0.3, 1.0)), prov)  # no dFID: not on the frontier
    return d


@pytest.fixture(scope="module")
def url(planned, curve_file):
    with running(create_app(planned, ServeSettings(cost_curve=curve_file))) as u:
        yield u


def post(url, body, timeout=120.0):
    return httpx.post(url + "/v1/generate", json=body, timeout=timeout)


def generated(engines, tmp_path, plan, cls, num, seed):
    out = tmp_path / f"gen-{plan}"
    code, text = run_cli(["generate", "--engines", engines, "--plan", plan, "--class", cls, "--num", num, "--seed",
                          seed, "--out", out])
    assert code == 0, text
    return [file_pixels(out / f"{k:05d}-class{cls}.png") for k in range(num)]


def test_info_lists_the_frontier_and_auto_chooses_for_the_curve(url):
    info = httpx.get(url + "/v1/info").json()
    assert [(p["name"], p["dfid"]) for p in info["frontier"]] == [("mid", 0.5), ("fast", 2.0)]
    assert info["adaptive_budget"] == 2.0 and info["frontier_note"] is None and info["slo_scale"] == 3.0
    assert info["adapt"] == "cheapest"
    assert info["priorities"] == ["low", "normal", "high"] and info["cost_curve"]["encoder"][0] == [1, 0.01]
    assert info["cost_calibration"] is None  # a stated curve is used as given, never corrected
    # the stated curve is linear in rows: auto takes slo (deadline order), and says why: the best simulated
    # attainment; among the processor-sharing policies fair beats step there
    assert (info["batching_asked"], info["batching"]) == ("auto", "slo")
    scores = info["batching_choice"]["scores"]
    assert scores["slo"]["slo_attainment"] == max(s["slo_attainment"] for s in scores.values())
    assert scores["fair"]["p99_slowdown"] < scores["step"]["p99_slowdown"]


def test_a_moved_request_equals_generate_for_the_plan_it_ran(url, planned, tmp_path):
    # deadline 1 s: its own plan (3.36 s) misses; within a budget of 0.5, mid (0.68 s) is the cheapest: moved
    # before its first step
    r = post(url, {"class": 3, "num": 2, "seed": 7, "deadline_ms": 1000, "max_fid_delta": 0.5})
    assert r.status_code == 200, r.text
    body = GenerateResponse.model_validate(r.json())
    s = body.served
    assert (s.plan, s.fid_delta, s.degraded, s.asked_plan, s.switched_at_step) == ("mid", 0.5, True, None, 0)
    assert s.slo.target_s == pytest.approx(1.0) and s.slo.solo_s == pytest.approx(3.36)
    assert (body.settings.plan, body.settings.steps) == ("mid", 10)
    want = generated(planned, tmp_path, "mid", 3, 2, 7)
    assert all(np.array_equal(png_pixels(g), w) for g, w in zip(body.images, want))
    # within the fast plan's budget the cheapest is fast (0.28 s); its SLO is judged by the server's clock (not
    # asserted: timing)
    r = post(url, {"class": 3, "num": 2, "seed": 7, "deadline_ms": 1000, "quality": "adaptive"})
    assert r.json()["served"]["plan"] == "fast" and r.json()["settings"]["steps"] == 4
    want = generated(planned, tmp_path, "fast", 3, 2, 7)
    assert all(np.array_equal(png_pixels(g), w) for g, w in zip(r.json()["images"], want))


def test_the_stream_reports_the_plan_it_runs(url):
    with httpx.stream("POST", url + "/v1/generate", json={"class": 5, "num": 2, "deadline_ms": 1000,
                                                         "quality": "adaptive", "stream": True}, timeout=60) as r:
        events = list(sse_events(r))
    assert events[0][0] == "queued" and (events[0][1]["plan"], events[0][1]["fid_delta"]) == ("fast", 2.0)
    progress = [d for e, d in events if e == "progress"]
    assert [d["step"] for d in progress] == list(range(1, 5)) and {d["steps"] for d in progress} == {4}
    assert {(d["plan"], d["fid_delta"]) for d in progress} == {("fast", 2.0)}
    assert events[-1][0] == "result" and events[-1][1]["served"]["plan"] == "fast"


def test_503_only_when_no_plan_within_the_budget_fits(url):
    missed, rejected = metric(url, "ddt_slo_missed_total"), metric(url, 'ddt_requests_total{status="rejected"}')
    # budget 0.5: only mid (0.68 s) may be run, and a deadline of 0.6 s is out of its reach
    r = post(url, {"class": 1, "num": 2, "deadline_ms": 600, "max_fid_delta": 0.5})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"] == "SloUnreachable"
    assert r.json()["message"].startswith("latency: expected <= 0.600 s (its SLO) on a plan within its budget, got "
                                          "0.68"), r.text
    assert metric(url, 'ddt_requests_total{status="rejected"}') == rejected + 1
    assert metric(url, "ddt_slo_missed_total") == missed + 1  # a refusal misses its SLO
    # the same deadline without a trade: served as asked, never moved, late
    r = post(url, {"class": 1, "num": 2, "deadline_ms": 1, "priority": "high"})
    assert r.status_code == 200
    s = r.json()["served"]
    assert (s["plan"], s["degraded"], s["fid_delta"], s["slo"]["met"], s["slo"]["priority"]) == (
        None, False, 0.0, False, "high")
    assert r.json()["settings"]["steps"] == 50
    assert httpx.get(url + "/health").status_code == 200


def test_metrics_count_slo_met_and_missed_and_the_fid_served(url):
    before = {n: metric(url, n) for n in ("ddt_slo_met_total", "ddt_slo_missed_total", "ddt_degraded_total",
                                          "ddt_served_fid_delta_sum", "ddt_served_fid_delta_count")}
    answers = [post(url, b).json() for b in ({"class": 2, "num": 1, "deadline_ms": 1},
                                             {"class": 2, "num": 2, "deadline_ms": 1000, "quality": "adaptive"},
                                             {"class": 2, "steps": 3, "deadline_ms": 600000})]
    met = sum(a["served"]["slo"]["met"] for a in answers)
    assert answers[0]["served"]["slo"]["met"] is False and answers[2]["served"]["slo"]["met"] is True
    assert metric(url, "ddt_slo_met_total") == before["ddt_slo_met_total"] + met
    assert metric(url, "ddt_slo_missed_total") == before["ddt_slo_missed_total"] + 3 - met
    assert metric(url, "ddt_degraded_total") == before["ddt_degraded_total"] + 1
    # dFIDs known: the folder's own sampler (0.0) and fast (2.0); steps 3 is no stored plan (unknown)
    assert metric(url, "ddt_served_fid_delta_count") == before["ddt_served_fid_delta_count"] + 2
    assert metric(url, "ddt_served_fid_delta_sum") == pytest.approx(before["ddt_served_fid_delta_sum"] + 2.0)
    assert metric(url, "ddt_goodput") > 0


BAD = [
    ({"class": 1, "deadline_ms": 0}, "deadline_ms: expected a finite number > 0 (milliseconds from arrival to the "
                                     "images; default --slo-scale x the predicted solo latency), got 0"),
    ({"class": 1, "deadline_ms": -5}, "deadline_ms: expected a finite number > 0"),
    ({"class": 1, "deadline_ms": "soon"}, "deadline_ms: expected a finite number > 0"),
    ({"class": 1, "max_fid_delta": -1}, "max_fid_delta: expected a finite number >= 0 (the most dFID of a cheaper "
                                        "stored plan the request accepts under load), got -1"),
    ({"class": 1, "priority": "urgent"}, "priority: expected low | normal | high"),
    ({"class": 1, "priority": 2}, "priority: expected low | normal | high"),
    ({"class": 1, "quality": "best"}, "quality: expected exact | adaptive"),
    ({"class": 1, "quality": "adaptive", "max_fid_delta": 1}, "max_fid_delta: expected either max_fid_delta or "
                                                              "quality: adaptive"),
]


@pytest.mark.parametrize("body, message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_terms_answer_422_naming_the_field(url, body, message):
    r = post(url, body)
    assert r.status_code == 422 and r.json()["message"].startswith(message), r.text


@pytest.mark.parametrize("raw", ['{"class": 1, "max_fid_delta": NaN}', '{"class": 1, "deadline_ms": Infinity}'])
def test_nan_terms_answer_422(url, raw):
    r = httpx.post(url + "/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["message"].split(":")[0] in ("max_fid_delta", "deadline_ms"), r.text
    assert "expected a finite number" in r.json()["message"]


def test_a_folder_with_no_frontier_serves_as_today_and_says_so(digits_engines, curve_file):
    with running(create_app(digits_engines, ServeSettings(batching="step", cost_curve=curve_file))) as url:
        info = httpx.get(url + "/v1/info").json()
        assert info["frontier"] == [] and "no stored plan with a measured dFID" in info["frontier_note"]
        assert (info["batching_asked"], info["batching"], info["batching_choice"]) == ("step", "step", None)
        for body in ({"class": 1, "quality": "adaptive"}, {"class": 1, "max_fid_delta": 3.0}):
            r = post(url, body)
            field = next(iter(k for k in body if k != "class"))
            assert r.status_code == 422 and r.json()["message"].startswith(
                f"{field}: expected a folder with stored plans with a measured dFID"), r.text
        r = post(url, {"class": 1, "steps": 3, "priority": "low"})
        assert r.status_code == 200 and r.json()["served"]["plan"] is None and r.json()["batching"] == "step"


def test_flags_checked_before_binding(digits_engines, tmp_path):
    for kw, message in (({"batching": "fifo"}, f"--batching: expected {BATCHING_CHOICES}"),
                        ({"slo_scale": 0.5}, "--slo-scale: expected a finite number >= 1"),
                        ({"slo_scale": float("nan")}, "--slo-scale: expected a finite number >= 1"),
                        ({"adapt": "best"}, "--adapt: expected cheapest | least-dfid, got best"),
                        ({"cost_curve": tmp_path / "none.json"}, "--cost-curve: expected a cost-curve JSON file")):
        with pytest.raises(ConfigError, match="^" + message.replace("|", r"\|")):
            ServeSettings(**kw)
    bad = tmp_path / "bad.json"
    bad.write_text('{"encoder": [[0, 1]]}')
    with pytest.raises(ConfigError, match="^--cost-curve: expected a cost-curve JSON"):
        create_app(digits_engines, ServeSettings(cost_curve=bad))
    code, text = run_cli(["serve", "--engines", digits_engines, "--slo-scale", "0"])
    assert code == 2 and "--slo-scale: expected a finite number >= 1" in text and "Traceback" not in text


def test_measured_run_reports_as_the_simulator(url, planned):
    """The measured-run driver on a tiny open-loop trace, its report beside the simulator's on the server's own
    curve (no speed asserted: the numbers' agreement is the benchmark's to measure)."""
    bodies = [{"class": k, "num": 1, "seed": k, "steps": 4 + k} for k in range(3)]
    shots = [Shot(0.05 * k, b) for k, b in enumerate(bodies)]
    before = metric(url, "ddt_slo_met_total") + metric(url, "ddt_slo_missed_total")
    run = measured_run(url, shots, timeout=120)
    got = run.summary()
    assert (got["offered"], got["answered"], got["rejected_503"], got["failed"]) == (3, 3, 0, 0)
    assert metric(url, "ddt_slo_met_total") + metric(url, "ddt_slo_missed_total") == before + 3
    assert got["slo_met"] == sum(a.payload["served"]["slo"]["met"] for a in run.answers)
    assert got["p50"] > 0 and got["throughput"] > 0
    info = httpx.get(url + "/v1/info").json()
    curve = CostCurve.from_dict(info["cost_curve"])
    with load_engines(planned) as engines:
        specs = [resolve_schedule(resolve(engines.config, RequestInput(classes=(b["class"],), num=b["num"],
                                                                       seed=b["seed"], steps=b["steps"]), API),
                                  engines) for b in bodies]
    sim = simulate([Arrival(s.t, spec, k) for k, (s, spec) in enumerate(zip(shots, specs))], curve,
                   info["row_budget"], info["batching"]).summary()
    assert (sim["offered"], sim["answered"]) == (3, 3)
    errors = compare(sim, got)
    assert set(errors) == {"throughput", "goodput", "slo_attainment", "p50", "p99"}
    assert all(e is None or e >= 0 for e in errors.values())


def test_adapt_least_dfid_takes_the_least_dfid_plan_that_meets(planned, curve_file):
    # deadline 1 s, budget 2.0: mid (0.68 s) meets, so it is taken rather than the cheapest, fast
    with running(create_app(planned, ServeSettings(cost_curve=curve_file, adapt="least-dfid"))) as url:
        assert httpx.get(url + "/v1/info").json()["adapt"] == "least-dfid"
        r = post(url, {"class": 3, "num": 2, "deadline_ms": 1000, "quality": "adaptive"})
        assert (r.json()["served"]["plan"], r.json()["served"]["fid_delta"]) == ("mid", 0.5)


def test_body_terms_budget_and_frontier():
    from types import SimpleNamespace

    from ddt_export.core.errors import InputError
    from ddt_export.serve.levels import body_terms, frontier_plans

    plans = {"mid": Plan("mid", 10, measured={"dfid": 0.5}), "fast": Plan("fast", 4, measured={"dfid": 2.0}),
             "odd": Plan("odd", 6, measured={"dfid": float("nan")}), "none": Plan("none", 8)}
    front = frontier_plans(plans)
    assert sorted(front) == ["fast", "mid"]  # a dFID that is no finite number is no measurement

    def body(**kw):
        return SimpleNamespace(**{"priority": None, "deadline_ms": None, "max_fid_delta": None, "quality": None,
                                  **kw})

    assert body_terms(body(quality="adaptive"), front)[1] == ["mid", "fast"]  # up to fast's 2.0, least first
    assert body_terms(body(max_fid_delta=1.0), front)[1] == ["mid"]
    assert body_terms(body(max_fid_delta=0.1), front) == ({"priority": 1, "deadline_s": None, "budget": 0.1}, [])
    assert body_terms(body(priority="high", deadline_ms=50), front) == (
        {"priority": 2, "deadline_s": 0.05, "budget": None}, [])
    with pytest.raises(InputError, match=r"^quality: expected adaptive only where the engines store a 'fast' plan "
                                         r"with a measured dFID \(stored: mid\), got 'adaptive'"):
        body_terms(body(quality="adaptive"), {"mid": front["mid"]})
