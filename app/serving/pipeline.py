"""Admit a prepared request under its key's quota, run it on the engine and answer it, streamed or not,
then settle what it used (see app/serving/__init__.py)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.api.errors import APIError, error_body
from app.api.services import Services
from app.auth import Principal
from app.engine import Engine, EngineUnavailableError, GenerationChunk, QueueFullError
from app.quota import QuotaExceededError, Reservation
from app.serving.requests import Prepared
from app.serving.responses import Renderer

# How often a non-streamed request looks whether its client is still there.
_DISCONNECT_POLL_S = 0.25
# nginx's status for "the client closed the connection before the answer": logged, never sent.
CLIENT_GONE = 499


@dataclass
class Progress:
    """What the engine has produced for one request so far: what its reservation is settled to, whether
    the request ends, fails or loses its client."""

    prompt_tokens: int
    chunks: int = 0
    last: GenerationChunk | None = None

    def tokens_used(self) -> int:
        if self.last is not None and self.last.finish_reason is not None:
            return self.last.prompt_tokens + self.last.completion_tokens
        # Cut short: the engine reports no counts, and each chunk holds at least one new token.
        return self.prompt_tokens + self.chunks

    def seen(self, chunk: GenerationChunk) -> None:
        self.chunks += 1
        self.last = chunk


async def run(
    prepared: Prepared, principal: Principal, engine: Engine, request: Request, services: Services
) -> Response:
    reservation = admit(prepared, principal, services)
    progress = Progress(prompt_tokens=len(prepared.prompt_ids))
    try:
        stream = _start(engine, prepared, services.settings.retry_after_s)
    except APIError:
        services.quota.settle(reservation, 0)
        raise
    renderer = Renderer(prepared)
    if not prepared.stream:
        try:
            collected = await _collect_while_connected(stream, request, engine, progress)
        finally:
            services.quota.settle(reservation, progress.tokens_used())
        if collected is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(renderer.answer(*collected), headers=reservation.headers)
    # X-Accel-Buffering: nginx must pass each event on as it comes.
    return StreamingResponse(
        _settled_after(_events(stream, renderer, engine, progress), services, reservation, progress),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **reservation.headers},
    )


def admit(prepared: Prepared, principal: Principal, services: Services) -> Reservation:
    """Reserve the most the request can use (prompt + max_tokens) before the engine sees it."""
    try:
        return services.quota.reserve(principal, len(prepared.prompt_ids) + prepared.params.max_tokens)
    except QuotaExceededError as exc:
        services.metrics.quota_rejections.labels(kind=exc.kind).inc()
        retry_after = max(1, math.ceil(exc.retry_after_s))
        raise APIError(
            429,
            exc.message,
            code="rate_limit_exceeded",
            type_=exc.kind,
            headers={"Retry-After": str(retry_after), **exc.headers},
        ) from exc


async def _settled_after(
    events: AsyncIterator[bytes], services: Services, reservation: Reservation, progress: Progress
) -> AsyncIterator[bytes]:
    # The finally also runs when the client goes away and Starlette closes the generator.
    try:
        async for event in events:
            yield event
    finally:
        services.quota.settle(reservation, progress.tokens_used())


def _start(engine: Engine, prepared: Prepared, retry_after_s: int) -> AsyncIterator[GenerationChunk]:
    try:
        return engine.generate(prepared.prompt_ids, prepared.params)
    except QueueFullError as exc:
        raise APIError(
            429,
            f"The server is at capacity ({exc}); retry after {retry_after_s} s.",
            code="queue_full",
            headers={"Retry-After": str(retry_after_s)},
        ) from exc
    except EngineUnavailableError as exc:
        raise APIError(503, str(exc), code="engine_unavailable", headers={"Retry-After": "5"}) from exc


def _engine_error(message: str, engine: Engine) -> APIError:
    """503 when the engine as a whole has failed (the node is going away: retry elsewhere), 500 when it
    failed this request alone and goes on serving the others."""
    if engine.failure() is not None:
        return APIError(503, message, code="engine_failure", headers={"Retry-After": "5"})
    return APIError(500, message, code="engine_failure")


async def _collect(
    stream: AsyncIterator[GenerationChunk], engine: Engine, progress: Progress
) -> tuple[str, GenerationChunk]:
    parts: list[str] = []
    last = GenerationChunk(text="")
    async for chunk in stream:
        if chunk.error is not None:
            raise _engine_error(chunk.error, engine)
        progress.seen(chunk)
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


async def _collect_while_connected(
    stream: AsyncIterator[GenerationChunk], request: Request, engine: Engine, progress: Progress
) -> tuple[str, GenerationChunk] | None:
    """The whole answer, or None when the client went away first: then the generation is cancelled (its
    slot freed at the next token) instead of running to its end for nobody."""
    collecting = asyncio.ensure_future(_collect(stream, engine, progress))
    try:
        while True:
            done, _ = await asyncio.wait({collecting}, timeout=_DISCONNECT_POLL_S)
            if done:
                return collecting.result()
            if await request.is_disconnected():
                return None
    finally:
        if not collecting.done():
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _events(
    stream: AsyncIterator[GenerationChunk], renderer: Renderer, engine: Engine, progress: Progress
) -> AsyncIterator[bytes]:
    for event in renderer.opening():
        yield _sse(event)
    async for chunk in stream:
        if chunk.error is not None:
            error = _engine_error(chunk.error, engine)
            yield _sse(error_body(error.status, error.message, code=error.code))
            break
        progress.seen(chunk)
        if chunk.finish_reason is not None:
            for event in renderer.closing(chunk):
                yield _sse(event)
            break
        if chunk.text:
            yield _sse(renderer.delta(chunk.text))
    yield _sse("[DONE]")
