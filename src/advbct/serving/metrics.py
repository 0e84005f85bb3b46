"""Prometheus metrics of one service: requests and latency by route, embedding batch sizes, searches sent to
Milvus by part of the gallery, the backfill's rate and the gallery's items by generation, served at ``/metrics``.

Each service holds its own collector registry, not prometheus-client's process-wide default: a process that
creates several apps (tests, or two galleries served side by side) would otherwise register every metric twice.
Routes are labelled by their template (``/items/{item_id}``), so one label value per route whatever the ids.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Embedding batches hold 1 image per search alone and up to the batcher's max_batch (64) under load.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """The metrics of one service, in a collector registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "advbct_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "advbct_http_request_seconds", "time to answer an HTTP request", ["method", "route"], registry=self.registry
        )
        self.batch_images = Histogram(
            "advbct_embed_batch_images", "images per micro-batched model call", buckets=BATCH_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.milvus_searches = Counter(
            "advbct_milvus_searches", "searches sent to Milvus, by the part of the gallery searched (plain: all of it; "
            "cross, kept, current: the parts of a merged search)", ["part"], registry=self.registry,
        )  # fmt: skip
        self.backfill_rate = Gauge(
            "advbct_backfill_items_per_second", "the running backfill's re-embedding rate", registry=self.registry
        )
        self.backfill_done = Gauge(
            "advbct_backfill_items_done", "items the current backfill has re-embedded", registry=self.registry
        )
        self.items = Gauge(
            "advbct_gallery_items", "gallery items by the generation that embedded them", ["generation"],
            registry=self.registry,
        )  # fmt: skip

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def count_search(self, part: str) -> None:
        self.milvus_searches.labels(part).inc()

    def set_backfill(self, items_per_s: float, done: int, by_generation: dict[int, int]) -> None:
        """The backfill's gauges as of now; a generation no longer holding items is dropped, not left stale."""
        self.backfill_rate.set(items_per_s)
        self.backfill_done.set(done)
        self.items.clear()
        for generation, count in by_generation.items():
            self.items.labels(str(generation)).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
