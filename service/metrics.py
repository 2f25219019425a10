"""Prometheus metrics, one ``CollectorRegistry`` per app (never the global registry)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .batching import BatchEvent

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """All metrics of one app instance. The engine reports into it; ``/metrics`` renders ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "alignfuse_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "alignfuse_http_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "alignfuse_search_stage_seconds",
            "Search latency per stage (encode, ann, rerank, total).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "alignfuse_batch_size",
            "Tasks per micro-batch, by worker and kind.",
            ["worker", "kind"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_cost = Histogram(
            "alignfuse_batch_cost",
            "Units per micro-batch (queries, or rerank pairs).",
            ["worker", "kind"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "alignfuse_batch_run_seconds",
            "Model time per micro-batch.",
            ["worker", "kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "alignfuse_queue_depth", "Tasks waiting in a device worker's queue.", ["worker"], registry=r
        )
        self.cache = Counter(
            "alignfuse_rerank_image_states", "Where rerank image states came from.", ["source"], registry=r
        )
        self.rejected = Counter(
            "alignfuse_rejected_requests",
            "Requests rejected before running, by reason.",
            ["reason"],
            registry=r,
        )
        self.pairs_scored = Counter("alignfuse_pairs_scored", "Cross-encoder pairs scored.", registry=r)
        self.rerank_failed = Counter(
            "alignfuse_rerank_failed_candidates",
            "Candidates that fell back to ITC (image unreadable).",
            registry=r,
        )
        self.in_flight = Gauge("alignfuse_searches_in_flight", "Searches being served now.", registry=r)
        self.ready = Gauge("alignfuse_ready", "1 once models are loaded and warm.", registry=r)
        self.expected_wait = Gauge(
            "alignfuse_admission_expected_wait_seconds",
            "Expected wait of a new search (in flight × measured device seconds per search).",
            registry=r,
        )
        self.loop_lag = Gauge(
            "alignfuse_event_loop_lag_seconds",
            "How late the event loop wakes up (EWMA); part of a new search's expected wait.",
            registry=r,
        )
        self.search_cost = Gauge(
            "alignfuse_admission_search_cost_seconds",
            "Measured device seconds per search (EWMA), the admission's capacity estimate.",
            registry=r,
        )

    def on_batch(self, ev: BatchEvent) -> None:
        self.batch_size.labels(ev.worker, ev.kind).observe(ev.size)
        self.batch_cost.labels(ev.worker, ev.kind).observe(ev.cost)
        self.batch_seconds.labels(ev.worker, ev.kind).observe(ev.run_s)

    def track_queue(self, worker: str, depth: Callable[[], float]) -> None:
        self.queue_depth.labels(worker).set_function(depth)
