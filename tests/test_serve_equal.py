"""Served images equal `ddt-export generate --class C --num N --seed S --steps K --cfg G --schedule X` to the uint8
pixel (the PNGs compared), requested alone and as 16 concurrent mixed requests sharing the batch."""
from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from engines_cache import run_cli  # noqa: E402
from serve_helpers import file_pixels, metric, png_pixels, running  # noqa: E402

from ddt_export.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.timeout(600)

# 16 requests that differ in class, num, seed, steps, cfg, schedule, solver and forecast (dp:K included: its
# schedule is computed once on the engines and stored, and both sides read the stored one)
MIXED = [dict(cls=c, num=n, seed=s, steps=k, cfg=g, schedule=x, solver=v, forecast=f)
         for c, n, s, k, g, x, v, f in [
    (0, 1, 0, 12, 1.5, "all", "euler", 0), (1, 2, 1, 20, 1.5, "uniform:2", "adams:2", 1),
    (2, 3, 2, 8, 2.0, "all", "adams:4", 0), (3, 4, 3, 16, 1.0, "uniform:4", "euler", 2),
    (4, 1, 4, 25, 3.0, "dp:6", "euler", 0), (5, 2, 5, 10, 1.5, "uniform:3", "adams:3", 2),
    (6, 1, 6, 30, 1.5, "dp:10", "euler", 0), (7, 2, 7, 6, 4.0, "all", "euler", 0),
    (8, 3, 8, 14, 1.5, "uniform:2", "adams:3", 1), (9, 1, 9, 18, 0.5, "all", "euler", 0),
    (3, 2, 10, 12, 1.5, "dp:6", "euler", 0), (7, 4, 11, 9, 2.5, "uniform:2", "euler", 1),
    (1, 1, 12, 40, 1.5, "uniform:5", "adams:2", 0), (0, 2, 13, 5, 1.5, "all", "euler", 0),
    (4, 3, 14, 22, 2.0, "uniform:3", "euler", 0), (8, 1, 2 ** 40, 11, 1.5, "all", "adams:1", 0),
]]


@pytest.fixture(scope="module")
def engines(digits_engines, tmp_path_factory):
    """A private copy: dp:K schedules are stored into the folder."""
    d = tmp_path_factory.mktemp("serve-equal") / "fp16"
    shutil.copytree(digits_engines, d)
    return d


@pytest.fixture(scope="module")
def generated(engines, tmp_path_factory):
    """generate's PNG pixels for every MIXED request: [(H, W) uint8 per image]."""
    out = []
    for i, r in enumerate(MIXED):
        d = tmp_path_factory.mktemp(f"gen{i}")
        code, text = run_cli(["generate", "--engines", engines, "--class", r["cls"], "--num", r["num"], "--seed",
                              r["seed"], "--steps", r["steps"], "--cfg", r["cfg"], "--schedule", r["schedule"],
                              "--solver", r["solver"], "--forecast", r["forecast"], "--out", d])
        assert code == 0, text
        out.append([file_pixels(d / f"{k:05d}-class{r['cls']}.png") for k in range(r["num"])])
    return out


def body(r):
    return {"class": r["cls"], "num": r["num"], "seed": r["seed"], "steps": r["steps"], "cfg": r["cfg"],
            "schedule": r["schedule"], "solver": r["solver"], "forecast": r["forecast"]}


def check(response, want):
    assert response.status_code == 200, response.text
    got = [png_pixels(b) for b in response.json()["images"]]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == np.uint8 and g.shape == w.shape and np.array_equal(g, w)


def test_alone(engines, generated):
    with running(create_app(engines)) as url:
        for r, want in zip(MIXED, generated):
            check(httpx.post(url + "/v1/generate", json=body(r), timeout=120), want)


@pytest.mark.parametrize("batching", ["step", "request"])
def test_sixteen_concurrent_mixed_requests(engines, generated, batching):
    from ddt_export.serve.settings import ServeSettings

    with running(create_app(engines, ServeSettings(batching=batching, max_delay_ms=50))) as url:
        results, barrier = {}, threading.Barrier(len(MIXED))

        def go(i):
            barrier.wait()
            results[i] = httpx.post(url + "/v1/generate", json=body(MIXED[i]), timeout=300)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(MIXED))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, want in enumerate(generated):
            check(results[i], want)
        shared = metric(url, "ddt_iteration_requests_sum") / metric(url, "ddt_iteration_requests_count")
        print(f"{batching}: mean requests per iteration {shared:.2f}")
        assert shared > 2  # they did share iterations
