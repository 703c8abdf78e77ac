"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own (one per app: tests run several)."""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STATUSES = ("ok", "invalid", "rejected", "failed", "cancelled")  # ddt_requests_total{status}
GRAPHS = ("encoder", "decoder", "vae_decoder")
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST
GOODPUT_WINDOW_S = 60.0
FID_DELTAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


class Metrics:
    """ddt_requests_total{status}: ok (200), invalid (422), rejected (503: queue full or shutting down),
    failed (500: non-finite tensors or an engine failure), cancelled (the client went away).
    ddt_request_seconds / ddt_queue_seconds: arrival to answer / arrival to admission, answered requests.
    ddt_active_requests / ddt_waiting_requests: in the batch / in the queue, now.
    ddt_iteration_requests and ddt_iteration_rows{graph}: requests and graph-call rows per iteration (the VAE's
    per retiring call); ddt_iteration_seconds: one iteration's encoder + decoder + CFG/Euler time.
    ddt_slo_met_total / ddt_slo_missed_total: requests answered within their SLO / not (answered late, failed,
    or refused with 503): SLO attainment = met / (met + missed). ddt_goodput: requests answered within their
    SLO per second over the last 60 s (rate(ddt_slo_met_total[1m]) in PromQL). ddt_degraded_total: answered on
    a cheaper plan than asked; ddt_served_fid_delta: the measured dFID of the plan each request ran (its _sum /
    _count is the mean dFID served)."""

    def __init__(self):
        disable_created_metrics()  # the *_created series double the output and say nothing a scrape needs
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("ddt_requests", "Requests by outcome", ["status"], registry=r)
        for s in STATUSES:
            self.requests.labels(s)
        self.request_seconds = Histogram("ddt_request_seconds", "Arrival to answer, answered requests", buckets=SECONDS,
                                         registry=r)
        self.queue_seconds = Histogram("ddt_queue_seconds", "Arrival to admission into the batch", buckets=SECONDS,
                                       registry=r)
        self.active = Gauge("ddt_active_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("ddt_waiting_requests", "Requests waiting for admission", registry=r)
        self.iteration_requests = Histogram("ddt_iteration_requests", "Requests per iteration", buckets=COUNTS,
                                            registry=r)
        self.iteration_rows = Histogram("ddt_iteration_rows", "Rows per graph call", ["graph"], buckets=COUNTS,
                                        registry=r)
        for g in GRAPHS:
            self.iteration_rows.labels(g)
        self.iteration_seconds = Histogram("ddt_iteration_seconds", "One iteration's graph calls and steps",
                                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                                           registry=r)
        self.images = Counter("ddt_images", "Images returned", registry=r)
        self.slo_met = Counter("ddt_slo_met", "Requests answered within their SLO", registry=r)
        self.slo_missed = Counter("ddt_slo_missed", "Requests answered late, failed or refused (503)", registry=r)
        self.degraded = Counter("ddt_degraded", "Requests answered on a cheaper plan than asked", registry=r)
        self.served_fid_delta = Histogram("ddt_served_fid_delta", "Measured dFID of the plan each answered request "
                                          "ran", buckets=FID_DELTAS, registry=r)
        self._met: deque[float] = deque()
        self._met_lock = threading.Lock()
        self._born = time.monotonic()
        self.goodput = Gauge("ddt_goodput", f"Requests answered within their SLO per second, last "
                             f"{GOODPUT_WINDOW_S:.0f} s", registry=r)
        self.goodput.set_function(self._goodput)

    def met(self, now: float | None = None) -> None:
        """A request answered within its SLO."""
        self.slo_met.inc()
        with self._met_lock:
            self._met.append(time.monotonic() if now is None else now)

    def _goodput(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._met_lock:
            while self._met and self._met[0] < now - GOODPUT_WINDOW_S:
                self._met.popleft()
            n = len(self._met)
        return n / max(min(GOODPUT_WINDOW_S, now - self._born), 1e-3)

    def render(self) -> bytes:
        return generate_latest(self.registry)
