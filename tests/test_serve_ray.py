"""`serve --ray`: the app as a Ray Serve deployment. Two replicas on a local cluster both serve, and their images
equal `generate`'s; the per-replica limits come from the row budget."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import dataclasses
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from ddt_export.scale import ray_serve
from ddt_export.scale.ray_serve import REPLICA_CPUS, REPLICA_HEADER, plan
from ddt_export.serve.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]


def test_plan_from_the_row_budget():
    # CPU cluster: 1 replica by default, fractional CPUs; the batcher may hold batch.max one-row requests plus its
    # queue, so Ray Serve must let that many in (its default of 5 would cap the batch at 5 requests)
    p = plan(64, ServeSettings(max_queue=10), None, cluster_gpus=0)
    assert (p.replicas, p.max_ongoing_requests, p.max_queued_requests, p.num_cpus, p.num_gpus) == \
        (1, 74, 10, REPLICA_CPUS, 0)
    p = plan(32, ServeSettings(max_queue=4), None, cluster_gpus=4)  # one replica per GPU
    assert (p.replicas, p.max_ongoing_requests, p.max_queued_requests, p.num_gpus) == (4, 36, 16, 1)
    from ddt_export.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--replicas"):
        plan(32, ServeSettings(), 5, cluster_gpus=4)
    with pytest.raises(ConfigError, match="--replicas"):
        plan(32, ServeSettings(), 0, cluster_gpus=0)


@pytest.mark.timeout(600)
def test_two_replicas_serve_and_equal_generate(tiny_engines, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    httpx = pytest.importorskip("httpx")
    from PIL import Image

    from runs import run_generate as generate
    from ddt_export.scale.ray_serve import deploy, shutdown
    from serve_helpers import free_port, sse_events

    # the replicas import ddt_export from this tree (the editable install may point elsewhere); restored after
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/generate"
    busy_steps = 100_000  # minutes of work on the tiny engines: still running whatever the machine's load
    # One request per replica (the row-budget limits are the test above's). Ray's router picks a replica from its
    # cached queue lengths when it has one, without probing the other: with the budget's limit it may send a
    # short request to a busy replica whose cached length (1) is under the limit while the idle one's entry is
    # missing or stale (it did so on a loaded CI machine). At a limit of 1 a busy replica is full, so the router
    # has to send each short request to the idle one: a gate, not a bet on load balancing.
    monkeypatch.setattr(ray_serve, "plan", lambda *a: dataclasses.replace(plan(*a), max_ongoing_requests=1))
    try:
        p = deploy(tiny_engines[0], ServeSettings(max_steps=busy_steps), port=port, replicas=2, say=lambda m: None)
        assert (p.replicas, p.max_ongoing_requests) == (2, 1)

        def post(i):
            body = {"class": i % 10, "num": 2, "seed": 100 + i, "steps": 6}
            return body, httpx.post(url, json=body, timeout=240)

        # One replica busy with a long streamed request, then short ones one after another, each sent to the idle
        # replica. The busy request is still running while they are answered (at 400 steps it ended within about
        # a second); leaving the stream cancels it (a disconnect cancels), and shutdown ends it regardless.
        with httpx.stream("POST", url, json={"class": 1, "steps": busy_steps, "stream": True}, timeout=240) as busy:
            events = sse_events(busy)
            assert next(events)[0] == "queued" and next(events)[0] == "progress"
            latest = {}  # the busy stream's newest event: a thread reads them as they arrive, so none wait buffered

            def read_busy():
                try:
                    for kind, data in events:
                        latest["event"] = (kind, data)
                except Exception:  # the stream closed under it (leaving the `with`)
                    pass

            reader = threading.Thread(target=read_busy, daemon=True)
            reader.start()
            answers = [post(i) for i in range(4)]
            busy_replica = busy.headers[REPLICA_HEADER]
            kind, data = latest["event"]  # it was still running when they were answered
            assert kind == "progress" and data["step"] < busy_steps, (kind, data)
        reader.join(30)
        with cf.ThreadPoolExecutor(8) as ex:  # and a burst of concurrent ones, all answered
            answers += list(ex.map(post, range(4, 12)))
    finally:
        shutdown()
    assert all(r.status_code == 200 for _, r in answers), [r.text for _, r in answers if r.status_code != 200]
    idle = {r.headers[REPLICA_HEADER] for _, r in answers[:4]}
    assert busy_replica not in idle and len(idle) == 1, (busy_replica, idle)  # both replicas served
    for body, r in answers[:4]:
        out = tmp_path / str(body["seed"])
        res = generate(tiny_engines[0], classes=[body["class"]], num=2, seed=body["seed"], steps=6,
                       out_dir=out, say=lambda m: None)
        paths = [out / f"{k:05d}-class{body['class']}.png" for k in range(res.num)]
        assert len(r.json()["images"]) == len(paths) == 2
        for png, path in zip(r.json()["images"], paths):
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))
            np.testing.assert_array_equal(served, np.asarray(Image.open(path)))  # to the uint8 pixel
