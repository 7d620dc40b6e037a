"""Prometheus metrics (prometheus-client), one ``CollectorRegistry`` per app so several apps (tests,
uvicorn workers) never share or collide. ``GET /metrics`` renders ``Metrics.registry``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "captioner_http_requests", "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"], registry=r,
        )
        self.latency = Histogram(
            "captioner_http_request_duration_seconds", "Time from request start to the last response byte",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "captioner_queue_wait_seconds", "Time an image waited in a model's queue before its batch ran",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference = Histogram(
            "captioner_inference_seconds", "Wall time of one batch's forward pass (incl. decoding)",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "captioner_batch_size", "Images per batch run by a worker", ["model"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "captioner_queue_depth", "Images waiting in a model's queue", ["model", "priority"], registry=r,
        )
        self.dropped = Counter(
            "captioner_dropped_items", "Queued images dropped before running (deadline passed, caller gone)",
            ["model", "reason"], registry=r,
        )
        self.images = Counter(
            "captioner_images", "Images answered successfully by interactive routes", ["route"], registry=r,
        )
        self.jobs = Counter(
            "captioner_jobs", "Batch job events (created, started, resumed, succeeded, failed, cancelled)",
            ["event"], registry=r,
        )
        self.job_items = Counter(
            "captioner_job_items", "Batch job entries finished, by outcome (done, failed, refused)",
            ["outcome"], registry=r,
        )
        self.model_info = Info(
            "captioner_model", "The model version each served name is running", ["name"], registry=r,
        )
        self.reloads = Counter(
            "captioner_model_reloads", "Model reloads by outcome (swapped, unchanged, refused)", ["name", "outcome"],
            registry=r,
        )
        self.workers_up = Gauge("captioner_workers_up", "Live worker replicas per model", ["model"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
