"""The measured run: a trace of requests sent to a running server, open loop (each at its time, whatever the
answers so far), reported as the simulator reports a simulated run (`runtime.batching.report`), so the two can
be compared number for number. Standard library only (threads and urllib): what the load benchmark calls.

    shots = [Shot(0.0, {"class": 3, "steps": 20}), Shot(0.4, {"class": 5, "quality": "adaptive"}), ...]
    run = measured_run("http://127.0.0.1:8000", shots)
    run.summary()          # throughput, goodput, SLO attainment, p50 / p99, 503s, mean dFID served
    compare(simulate(arrivals, curve, ...).summary(), run.summary())   # the simulator's error

A request's SLO verdict is the server's (`served.slo.met` in the answer: arrival to images ready, inside the
server); its latency here is the client's (send to answer).
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from ..runtime.batching.report import Served, summarize
from ..runtime.batching.slo import PRIORITY

MAX_THREADS = 256


@dataclass(frozen=True)
class Shot:
    """One request of a trace: when to send it (seconds from the start) and its JSON body."""

    t: float
    body: dict


@dataclass
class Answer:
    status: int  # HTTP status (0: no answer: a connection error)
    latency: float  # seconds, send to answer
    sent: float  # seconds from the start
    payload: dict = field(default_factory=dict)


@dataclass
class MeasuredRun:
    shots: Sequence[Shot]
    answers: list[Answer]

    def served(self) -> list[Served]:
        out = []
        for shot, a in zip(self.shots, self.answers):
            if a.status != 200:
                continue
            s = a.payload.get("served", {})
            slo = s.get("slo", {})
            body = shot.body
            out.append(Served(a.latency, slo.get("met"), s.get("fid_delta"), s.get("plan"), bool(s.get("degraded")),
                              body.get("max_fid_delta") is not None or body.get("quality") == "adaptive",
                              PRIORITY.get(body.get("priority") or "normal", PRIORITY["normal"])))
        return out

    def count(self, status: int) -> int:
        return sum(a.status == status for a in self.answers)

    def summary(self) -> dict:
        """`report.summarize` of the run: offered = every shot the server did not refuse as invalid (422)."""
        ends = [a.sent + a.latency for a in self.answers if a.status]
        span = (max(ends) if ends else 0.0) - (min(s.t for s in self.shots) if self.shots else 0.0)
        out = summarize(self.served(), len(self.shots) - self.count(422), self.count(503), span)
        out["failed"] = sum(a.status not in (200, 422, 503) for a in self.answers)
        return out


def post(url: str, body: dict, timeout: float) -> tuple[int, dict]:
    req = urllib.request.Request(url.rstrip("/") + "/v1/generate", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except json.JSONDecodeError:
            return e.code, {}
    except (urllib.error.URLError, OSError) as e:
        return 0, {"error": type(e).__name__, "message": str(e)}


def measured_run(url: str, shots: Sequence[Shot], timeout: float = 600.0) -> MeasuredRun:
    """Send every shot at its time (one thread each, up to MAX_THREADS in flight) and wait for all answers."""
    shots = sorted(shots, key=lambda s: s.t)
    answers: list[Answer | None] = [None] * len(shots)
    start = time.monotonic()
    lock = threading.Lock()

    def send(i: int) -> None:
        delay = start + shots[i].t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t0 = time.monotonic()
        status, payload = post(url, shots[i].body, timeout)
        with lock:
            answers[i] = Answer(status, time.monotonic() - t0, t0 - start, payload)

    with ThreadPoolExecutor(max_workers=max(1, min(MAX_THREADS, len(shots)))) as pool:
        list(pool.map(send, range(len(shots))))
    return MeasuredRun(shots, [a for a in answers if a is not None])
