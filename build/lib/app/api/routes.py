"""OpenAI-compatible routes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.errors import APIError, error_body
from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.api.services import Services, get_services
from app.auth import KeyRecord
from app.engine import Engine, EngineUnavailableError, GenerationChunk, QueueFullError, SamplingParams

router = APIRouter()
ServicesDep = Annotated[Services, Depends(get_services)]


def authenticate(request: Request, services: ServicesDep) -> KeyRecord | None:
    if services.keys is None:  # --insecure-no-auth
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    record = services.keys.verify(token.strip())
    if record is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return record


Authenticated = Annotated[KeyRecord | None, Depends(authenticate)]


def ready_engine(services: ServicesDep) -> Engine:
    # Draining is refused earlier, for every /v1 route, by the RequestAccounting middleware.
    state = services.state()
    if state != "ready" or services.engine is None:
        failure = services.load_error or (services.engine.failure() if services.engine else None)
        message = failure or "The model is still loading; retry shortly."
        raise APIError(503, message, code="not_ready", headers={"Retry-After": "5"})
    return services.engine


ReadyEngine = Annotated[Engine, Depends(ready_engine)]


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(services: ServicesDep) -> JSONResponse:
    state = services.state()
    return JSONResponse({"status": state}, status_code=200 if state == "ready" else 503)


@router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    return PlainTextResponse(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(_: Authenticated, services: ServicesDep) -> dict[str, Any]:
    models = []
    if services.engine is not None:
        models.append({"id": services.engine.model_name, "object": "model", "created": 0, "owned_by": "private-llm"})
    return {"object": "list", "data": models}


def _check_common(body: ChatCompletionRequest | CompletionRequest, engine: Engine) -> None:
    unsupported = body.unsupported_set()
    if unsupported:
        raise APIError(
            400,
            f"The parameter '{unsupported[0]}' is not supported by this server.",
            param=unsupported[0],
            code="unsupported_parameter",
        )
    if body.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", param="n", code="unsupported_parameter")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if getattr(body, penalty) not in (None, 0, 0.0):
            raise APIError(
                400,
                f"The parameter '{penalty}' is not supported (only 0).",
                param=penalty,
                code="unsupported_parameter",
            )
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true.", param="stream_options")
    if body.model != engine.model_name:
        raise APIError(
            404,
            f"The model '{body.model}' does not exist. This server serves '{engine.model_name}'.",
            param="model",
            code="model_not_found",
        )


def _sampling(
    body: ChatCompletionRequest | CompletionRequest,
    prompt_len: int,
    engine: Engine,
    requested: int | None,
    default_max: int,
    param: str,
) -> SamplingParams:
    limit = engine.context_length
    if prompt_len >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for the completion.",
            param=param,
            code="context_length_exceeded",
        )
    room = limit - prompt_len
    # OpenAI answers 400 when max_tokens alone exceeds the window; within it, clamp to what is left.
    if requested is not None and requested > limit:
        raise APIError(
            400,
            f"max_tokens is too large: {requested}. This model's maximum context length is {limit} tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    max_tokens = min(requested if requested is not None else default_max, room)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
    )


def _start(
    engine: Engine, prompt_ids: list[int], params: SamplingParams, retry_after: int
) -> AsyncIterator[GenerationChunk]:
    try:
        return engine.generate(prompt_ids, params)
    except QueueFullError as exc:
        raise APIError(
            429,
            f"The server is at capacity ({exc}); retry after {retry_after} s.",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        ) from exc
    except EngineUnavailableError as exc:
        raise APIError(503, str(exc), code="engine_unavailable") from exc


def _usage(chunk: GenerationChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


async def _collect(stream: AsyncIterator[GenerationChunk]) -> tuple[str, GenerationChunk]:
    parts: list[str] = []
    last = GenerationChunk(text="")
    async for chunk in stream:
        if chunk.error is not None:
            raise APIError(503, chunk.error, code="engine_failure")
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    # X-Accel-Buffering: nginx must pass each event on as it comes.
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, _: Authenticated, engine: ReadyEngine, services: ServicesDep
) -> Response:
    _check_common(body, engine)
    if not engine.has_chat_template():
        raise APIError(400, "This model has no chat template; use /v1/completions.", param="messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    prompt_ids = engine.encode_chat(messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _sampling(body, len(prompt_ids), engine, requested, services.settings.max_tokens_default, "messages")
    stream = _start(engine, prompt_ids, params, services.settings.retry_after_s)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    if not body.stream:
        text, last = await _collect(stream)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": engine.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": last.finish_reason,
                    }
                ],
                "usage": _usage(last),
            }
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": engine.model_name}

    def chunk_payload(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return payload

    async def events() -> AsyncIterator[bytes]:
        yield _sse(chunk_payload({"role": "assistant", "content": ""}, None))
        async for chunk in stream:
            if chunk.error is not None:
                yield _sse(error_body(500, chunk.error, code="engine_failure"))
                break
            if chunk.text:
                yield _sse(chunk_payload({"content": chunk.text}, None))
            if chunk.finish_reason is not None:
                yield _sse(chunk_payload({}, chunk.finish_reason))
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(chunk)})
        yield _sse("[DONE]")

    return _event_stream(events())


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, _: Authenticated, engine: ReadyEngine, services: ServicesDep
) -> Response:
    _check_common(body, engine)
    prompt_ids = engine.encode_prompt(body.prompt_text())
    params = _sampling(body, len(prompt_ids), engine, body.max_tokens, services.settings.max_tokens_default, "prompt")
    stream = _start(engine, prompt_ids, params, services.settings.retry_after_s)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    base = {"id": completion_id, "object": "text_completion", "created": created, "model": engine.model_name}

    if not body.stream:
        text, last = await _collect(stream)
        return JSONResponse(
            {
                **base,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(last),
            }
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[bytes]:
        async for chunk in stream:
            if chunk.error is not None:
                yield _sse(error_body(500, chunk.error, code="engine_failure"))
                break
            if chunk.text or chunk.finish_reason is not None:
                payload: dict[str, Any] = {
                    **base,
                    "choices": [
                        {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}
                    ],
                }
                if include_usage:
                    payload["usage"] = None
                yield _sse(payload)
            if chunk.finish_reason is not None and include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(chunk)})
        yield _sse("[DONE]")

    return _event_stream(events())
