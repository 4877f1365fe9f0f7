"""One request's bookkeeping from admission to its end: its quota reservation settled and its ledger row
written exactly once, however the request ended (answered, failed, refused, or its client gone)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from app.api.errors import APIError
from app.api.services import Services
from app.archive import Conversation
from app.auth import Principal
from app.engine import GenerationChunk
from app.ledger import UsageRecord
from app.quota import QuotaExceededError, Reservation
from app.safety.pii import redact
from app.serving.requests import Prepared

ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@dataclass
class Account:
    services: Services
    principal: Principal
    prepared: Prepared
    request_id: str
    reservation: Reservation | None = None
    started: float = field(default_factory=time.monotonic)
    at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    chunks: int = 0
    last: GenerationChunk | None = None
    first_token_s: float | None = None
    closed: bool = False
    # The answer as the client got it (after the answer guards), for the conversation archive.
    answer_parts: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return self.reservation.headers if self.reservation else {}

    async def admit(self) -> None:
        """Reserve the most the request can use (prompt + max_tokens) before the engine sees it."""
        prepared = self.prepared
        try:
            self.reservation = await self.services.quota.reserve(
                self.principal, len(prepared.prompt_ids) + prepared.params.max_tokens
            )
        except QuotaExceededError as exc:
            self.services.metrics.quota_rejections.labels(kind=exc.kind).inc()
            self.close(429)
            raise APIError(
                429,
                exc.message,
                code="rate_limit_exceeded",
                type_=exc.kind,
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s))), **exc.headers},
            ) from exc

    def seen(self, chunk: GenerationChunk) -> None:
        if self.first_token_s is None and chunk.text:
            self.first_token_s = time.monotonic() - self.started
        self.chunks += 1
        self.last = chunk
        if chunk.text:
            self.answer_parts.append(chunk.text)

    def finished(self) -> bool:
        return self.last is not None and self.last.finish_reason is not None

    def tokens(self) -> tuple[int, int]:
        """(prompt, completion): the engine's counts when it finished, else what it had produced."""
        if self.last is not None and self.last.finish_reason is not None:
            return self.last.prompt_tokens, self.last.completion_tokens
        # Cut short, the engine reports no counts: once a chunk came the prompt was processed, and each
        # chunk holds at least one new token.
        return (len(self.prepared.prompt_ids), self.chunks) if self.chunks else (0, 0)

    def close(self, status: int, finish_reason: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        prompt, completion = self.tokens() if self.reservation else (0, 0)
        if self.reservation is not None:
            self.services.quota.settle(self.reservation, prompt + completion)
        reason = self.last.finish_reason if self.finished() and self.last else finish_reason
        # Archived once the engine ran: what was asked and what the client was sent, however it ended.
        if self.chunks and self.services.archives(self.principal.tenant):
            self._archive(reason)
        ledger = self.services.ledger
        if ledger is None:
            return
        ledger.record(
            UsageRecord(
                request_id=self.request_id,
                at_ms=self.at_ms,
                node=ledger.node,
                tenant=self.principal.tenant,
                key_id=self.principal.key_id,
                model=self.prepared.model,
                endpoint=ENDPOINTS[self.prepared.kind],
                prompt_tokens=prompt,
                completion_tokens=completion,
                status=status,
                finish_reason=reason,
                ttft_ms=None if self.first_token_s is None else round(self.first_token_s * 1000),
                latency_ms=round((time.monotonic() - self.started) * 1000),
            )
        )

    def _archive(self, finish_reason: str | None) -> None:
        assert self.services.archive is not None
        settings = self.services.settings
        # redact_stored: the model and the client saw it; what is stored holds it redacted.
        texts = self.prepared.texts
        if settings.pii_mode_prompt == "redact_stored":
            texts = tuple(redact(text) for text in texts)
        answer = "".join(self.answer_parts)
        if settings.pii_mode_answer == "redact_stored":
            answer = redact(answer)
        self.services.archive.record(
            Conversation(
                request_id=self.request_id,
                at_ms=self.at_ms,
                node=settings.node_name,
                tenant=self.principal.tenant,
                key_id=self.principal.key_id,
                model=self.prepared.model,
                endpoint=ENDPOINTS[self.prepared.kind],
                finish_reason=finish_reason,
                messages=tuple(zip(self.prepared.roles, texts, strict=True)),
                answer=answer,
            )
        )
