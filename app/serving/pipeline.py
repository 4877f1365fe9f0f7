"""Admit a prepared request under its key's quota, run it on the engine and answer it, streamed or not,
then settle what it used (see app/serving/__init__.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.api.errors import APIError, error_body
from app.api.services import Services
from app.auth import Principal
from app.engine import Engine, EngineUnavailableError, GenerationChunk, QueueFullError, TokenLogprob
from app.serving.account import Account
from app.serving.requests import Prepared
from app.serving.responses import Renderer
from app.serving.safety import guarded_answer, safety_of

# How often a non-streamed request looks whether its client is still there.
_DISCONNECT_POLL_S = 0.25
# nginx's status for "the client closed the connection before the answer": logged, never sent.
CLIENT_GONE = 499
# A whole answer: its text, its last chunk (finish reason, counts) and its tokens' log probabilities.
Collected = tuple[str, GenerationChunk, list[TokenLogprob]]


async def run(
    prepared: Prepared, principal: Principal, engine: Engine, request: Request, services: Services
) -> Response:
    safety = safety_of(services)
    if safety.pii_answer == "redact" and prepared.params.logprobs is not None:
        # Tokens are the model's own text: they would show what the redaction replaces.
        raise APIError(
            400,
            "Log probabilities are not available here: this server redacts personal data in its answers.",
            param="logprobs",
            code="unsupported_parameter",
        )
    account = Account(services, principal, prepared, request_id=request.state.request_id)
    await account.admit()
    try:
        await safety.refuse_blocked_prompt(prepared.texts, prepared.prompt_param)
    except APIError as exc:
        account.close(exc.status, "content_filter")
        raise
    try:
        stream = _start(engine, prepared, services.settings.retry_after_s)
    except APIError as exc:
        account.close(exc.status)
        raise
    guards = safety.answer_guards()
    if guards:
        stream = guarded_answer(stream, guards, len(prepared.prompt_ids))
    renderer = Renderer(prepared)
    if not prepared.stream:
        try:
            collected = await _collect_while_connected(stream, request, engine, account)
        except APIError as exc:
            account.close(exc.status, "error")
            raise
        except BaseException:
            account.close(CLIENT_GONE, "abort")  # cancelled under it
            raise
        if collected is None:
            account.close(CLIENT_GONE, "abort")
            return Response(status_code=CLIENT_GONE)
        account.close(200)
        return JSONResponse(renderer.answer(*collected), headers=account.headers)
    # X-Accel-Buffering: nginx must pass each event on as it comes.
    return StreamingResponse(
        _closed_after(_events(stream, renderer, engine, account), account),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **account.headers},
    )


async def _closed_after(events: AsyncIterator[bytes], account: Account) -> AsyncIterator[bytes]:
    # The finally also runs when the client goes away and Starlette closes the generator.
    try:
        async for event in events:
            yield event
    finally:
        account.close(200, None if account.finished() else "abort")


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


async def _collect(stream: AsyncIterator[GenerationChunk], engine: Engine, account: Account) -> Collected:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    last = GenerationChunk(text="")
    async for chunk in stream:
        if chunk.error is not None:
            raise _engine_error(chunk.error, engine)
        account.seen(chunk)
        parts.append(chunk.text)
        logprobs.extend(chunk.logprobs)
        last = chunk
    return "".join(parts), last, logprobs


async def _collect_while_connected(
    stream: AsyncIterator[GenerationChunk], request: Request, engine: Engine, account: Account
) -> Collected | None:
    """The whole answer, or None when the client went away first: then the generation is cancelled (its
    slot freed at the next token) instead of running to its end for nobody."""
    collecting = asyncio.ensure_future(_collect(stream, engine, account))
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
    stream: AsyncIterator[GenerationChunk], renderer: Renderer, engine: Engine, account: Account
) -> AsyncIterator[bytes]:
    for event in renderer.opening():
        yield _sse(event)
    async for chunk in stream:
        if chunk.error is not None:
            error = _engine_error(chunk.error, engine)
            yield _sse(error_body(error.status, error.message, code=error.code))
            account.close(200, "error")
            break
        account.seen(chunk)
        if chunk.finish_reason is not None:
            for event in renderer.closing(chunk):
                yield _sse(event)
            break
        if chunk.text or chunk.logprobs:
            yield _sse(renderer.delta(chunk.text, chunk.logprobs))
    yield _sse("[DONE]")
