"""Where engine events become metrics. Both backends report the same events (a request's tokens as each
engine step produces them, its end, the batch's load) and this module alone decides what they mean, so
the two cannot disagree: prompt tokens count when the prefill is done (as in vLLM), the first step's
tokens give the time to first token, each later step one inter-token latency, and every request ends
once, with vLLM's finish reasons (stop, length, abort, error).
"""

from __future__ import annotations

import time
from typing import Literal, get_args

from app.metrics import Metrics

Outcome = Literal["stop", "length", "abort", "error"]


class EngineAccounting:
    """One engine's series, labelled as vLLM labels them (the served model, engine index 0)."""

    def __init__(self, metrics: Metrics, model_name: str) -> None:
        labels = {"model_name": model_name, "engine": "0"}
        self._running = metrics.running.labels(**labels)
        self._waiting = metrics.waiting.labels(**labels)
        self._kv_cache_usage = metrics.kv_cache_usage.labels(**labels)
        self._queue_time = metrics.queue_time.labels(**labels)
        self._batch_size = metrics.batch_size.labels(**labels)
        self.time_to_first_token = metrics.time_to_first_token.labels(**labels)
        self.inter_token_latency = metrics.inter_token_latency.labels(**labels)
        self.e2e_latency = metrics.e2e_latency.labels(**labels)
        self.prompt_tokens = metrics.prompt_tokens.labels(**labels)
        self.generation_tokens = metrics.generation_tokens.labels(**labels)
        # Every reason present from the start: a rate over a series that does not exist yet is no rate.
        self._finished = {
            reason: metrics.request_success.labels(**labels, finished_reason=reason) for reason in get_args(Outcome)
        }
        self._running.set(0)
        self._waiting.set(0)

    def request(self, prompt_tokens: int, arrival: float | None = None) -> RequestAccount:
        return RequestAccount(self, prompt_tokens, time.monotonic() if arrival is None else arrival)

    def load(self, running: int, waiting: int) -> None:
        self._running.set(running)
        self._waiting.set(waiting)

    def queued(self, seconds: float) -> None:
        """A request waited this long before it was scheduled."""
        self._queue_time.observe(max(0.0, seconds))

    def step(self, batch_size: int) -> None:
        """One decode step ran for this many sequences."""
        self._batch_size.observe(batch_size)

    def kv_cache_usage(self, fraction: float) -> None:
        self._kv_cache_usage.set(fraction)

    def finished(self, reason: Outcome) -> None:
        self._finished[reason].inc()


class RequestAccount:
    """One request's life; each method may be called from the engine's thread or its event loop."""

    def __init__(self, engine: EngineAccounting, prompt_tokens: int, arrival: float) -> None:
        self._engine = engine
        self._prompt_tokens = prompt_tokens
        self.arrival = arrival
        self._last_step_at: float | None = None
        self.generated = 0
        self._ended = False

    def tokens(self, count: int, now: float | None = None) -> None:
        """An engine step produced `count` new tokens for this request (0 when it produced only an end)."""
        now = time.monotonic() if now is None else now
        if self._last_step_at is None:
            self._prefilled(now)
        elif count:
            self._engine.inter_token_latency.observe(now - self._last_step_at)
        if count:
            self._last_step_at = now
            self.generated += count
            self._engine.generation_tokens.inc(count)

    def finished(self, reason: Outcome, now: float | None = None) -> None:
        """The request ended (answered, cancelled or failed); later calls change nothing."""
        if self._ended:
            return
        self._ended = True
        now = time.monotonic() if now is None else now
        if reason in ("stop", "length") and self._last_step_at is None:
            self._prefilled(now)  # the first step gave only the end: still a prefill and a first token
        self._engine.e2e_latency.observe(now - self.arrival)
        self._engine.finished(reason)

    def _prefilled(self, now: float) -> None:
        self._last_step_at = now
        self._engine.prompt_tokens.inc(self._prompt_tokens)
        self._engine.time_to_first_token.observe(now - self.arrival)
