"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own (one per app: tests run several)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STATUSES = ("ok", "invalid", "rejected", "failed", "cancelled")  # ddt_requests_total{status}
GRAPHS = ("encoder", "decoder", "vae_decoder")
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """ddt_requests_total{status}: ok (200), invalid (422), rejected (503: queue full or shutting down),
    failed (500: non-finite tensors or an engine failure), cancelled (the client went away).
    ddt_request_seconds / ddt_queue_seconds: arrival to answer / arrival to admission, answered requests.
    ddt_active_requests / ddt_waiting_requests: in the batch / in the queue, now.
    ddt_iteration_requests and ddt_iteration_rows{graph}: requests and graph-call rows per iteration (the VAE's
    per retiring call); ddt_iteration_seconds: one iteration's encoder + decoder + CFG/Euler time."""

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
