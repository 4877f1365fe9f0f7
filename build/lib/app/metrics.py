"""Prometheus metrics, named like vLLM's so existing dashboards translate (prefix private_llm_)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "private_llm"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    """One registry per app instance: tests and multiple apps in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Arrival to first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "Arrival to last token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            f"{PREFIX}_request_queue_time_seconds",
            "Time a request waited before joining the batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Sequences decoded together per engine step.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.running = Gauge(f"{PREFIX}_num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge(f"{PREFIX}_num_requests_waiting", "Requests waiting to join the batch.", registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prefilled prompt tokens.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter(
            f"{PREFIX}_request_success", "Finished requests by finish reason.", ["finished_reason"], registry=r
        )
        self.http_responses = Counter(
            f"{PREFIX}_http_responses", "HTTP responses by route and status.", ["route", "status"], registry=r
        )
