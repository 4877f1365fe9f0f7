"""Prometheus metrics. The engine's series carry vLLM's own names and labels (`vllm:...`, `model_name`,
`engine`), whichever backend serves, so dashboards and alert rules written for vLLM work unchanged; the
service's own series (HTTP, batching) are prefixed private_llm_."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "private_llm"
STATES = ("loading", "ready", "draining", "failed")
# vLLM labels every engine series with the served model and the engine's index (one engine per server).
ENGINE_LABELS = ("model_name", "engine")

# vLLM's buckets, so that quantiles computed from either backend compare.
_TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0),
    *(2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
_ITL_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0),
    *(2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
_REQUEST_BUCKETS = (
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0),
    *(30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    """One registry per app instance: tests and multiple apps in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ENGINE_LABELS
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            labels,
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels, registry=r
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=r
        )
        self.kv_cache_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=r
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*labels, "finished_reason"),
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Sequences decoded together per engine step.",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.http_responses = Counter(
            f"{PREFIX}_http_responses", "HTTP responses by route and status.", ["route", "status"], registry=r
        )
        self.quota_rejections = Counter(
            f"{PREFIX}_quota_rejections",
            "Requests refused with 429 for a key's quota, by what ran out (requests or tokens).",
            ["kind"],
            registry=r,
        )
        self.quota_shared = Gauge(
            f"{PREFIX}_quota_shared",
            "1 while quotas are counted in Redis for every node, 0 while this node counts alone (Redis down).",
            registry=r,
        )
        self.ledger_pending = Gauge(
            f"{PREFIX}_ledger_pending_rows",
            "Usage rows recorded by requests and not yet written to the database.",
            registry=r,
        )
        self.content_filter_blocks = Counter(
            f"{PREFIX}_content_filter_blocks",
            "Requests stopped by the sensitive-word filter, by direction (prompt or answer) and category.",
            ["direction", "category"],
            registry=r,
        )
        self.content_filter_terms = Gauge(
            f"{PREFIX}_content_filter_terms",
            "Terms of the word lists in force (blocked or allowed).",
            ["list"],
            registry=r,
        )
        self.content_filter_reloads = Counter(
            f"{PREFIX}_content_filter_reloads",
            "Word list reloads on SIGHUP, by result (ok, or failed: the previous lists stay in force).",
            ["result"],
            registry=r,
        )
        self.pii_detections = Counter(
            f"{PREFIX}_pii_detections",
            "Personal data found, by direction (prompt or answer), kind (phone, id, card, email) and action "
            "(redacted or blocked).",
            ["direction", "kind", "action"],
            registry=r,
        )
        self.archive_primary_key = Gauge(
            f"{PREFIX}_archive_primary_key",
            "1 for the id of the archive's primary master key, once every data key is wrapped by it.",
            ["kid"],
            registry=r,
        )
        self.archive_pending = Gauge(
            f"{PREFIX}_archive_pending_records",
            "Archive records recorded by requests and not yet written to the database.",
            registry=r,
        )
        self.state = Gauge(
            f"{PREFIX}_state",
            "1 for the state the server is in (what /ready reports), 0 for the others.",
            ["state"],
            registry=r,
        )

    def record_state(self, current: str) -> None:
        for state in STATES:
            self.state.labels(state=state).set(1 if state == current else 0)
