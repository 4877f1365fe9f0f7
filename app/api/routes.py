"""OpenAI-compatible routes: parse, authenticate, hand over to the serving pipeline."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.errors import APIError
from app.api.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Status,
)
from app.api.services import Services, get_services
from app.auth import KeyRecord
from app.engine import Engine
from app.serving import pipeline
from app.serving.requests import Limits, prepare_chat, prepare_completion

router = APIRouter()
ServicesDep = Annotated[Services, Depends(get_services)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


_ERROR_DESCRIPTIONS = {
    400: "Malformed or unsupported request (the error names the parameter)",
    401: "Missing, unknown or revoked API key",
    404: "Unknown model",
    413: "Request body too large",
    429: "Server at capacity; see Retry-After",
    500: "The engine failed while serving this request",
    503: "Loading, draining, or the engine has failed; see Retry-After",
}


def _generation_responses(chunk: type) -> dict[int | str, dict[str, Any]]:
    # Before OpenAPI 3.2 an event stream's schema describes one event: its data is a chunk, an error when
    # the engine fails mid-stream, or the closing [DONE].
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {
                            "anyOf": [
                                {"$ref": f"#/components/schemas/{chunk.__name__}"},
                                {"$ref": "#/components/schemas/ErrorResponse"},
                            ]
                        },
                    },
                ]
            }
        },
    }
    return {
        200: {
            "description": "The answer; with stream=true, server-sent events of chunks ending in `data: [DONE]`",
            "content": {"text/event-stream": {"schema": event}},
        },
        **_errors(400, 401, 404, 413, 429, 500, 503),
    }


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
    request.state.key_id = record.key_id  # for the access log
    return record


Authenticated = Annotated[KeyRecord | None, Depends(authenticate)]


def ready_engine(services: ServicesDep) -> Engine:
    # Draining is refused earlier, for every /v1 route, by a middleware.
    state = services.state()
    if state != "ready" or services.engine is None:
        failure = services.load_error or (services.engine.failure() if services.engine else None)
        message = failure or "The model is still loading; retry shortly."
        raise APIError(503, message, code="not_ready", headers={"Retry-After": "5"})
    return services.engine


ReadyEngine = Annotated[Engine, Depends(ready_engine)]


def _limits(services: Services) -> Limits:
    settings = services.settings
    return Limits(default_max_tokens=settings.max_tokens_default, max_tokens_limit=settings.max_tokens_limit)


@router.get("/health", response_model=Status)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", response_model=Status, responses={503: {"model": Status, "description": "Not ready"}})
async def ready(services: ServicesDep) -> JSONResponse:
    state = services.state()
    return JSONResponse({"status": state}, status_code=200 if state == "ready" else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(services: ServicesDep) -> Response:
    services.metrics.record_state(services.state())
    return PlainTextResponse(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList, responses=_errors(401))
async def list_models(_: Authenticated, services: ServicesDep) -> ModelList:
    models = [ModelCard(id=services.engine.model_name)] if services.engine is not None else []
    return ModelList(data=models)


@router.post(
    "/v1/chat/completions", response_model=ChatCompletion, responses=_generation_responses(ChatCompletionChunk)
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, _: Authenticated, engine: ReadyEngine, services: ServicesDep
) -> Response:
    prepared = await prepare_chat(body, engine, _limits(services))
    return await pipeline.run(prepared, engine, request, services.settings.retry_after_s)


@router.post("/v1/completions", response_model=Completion, responses=_generation_responses(Completion))
async def completions(
    body: CompletionRequest, request: Request, _: Authenticated, engine: ReadyEngine, services: ServicesDep
) -> Response:
    prepared = await prepare_completion(body, engine, _limits(services))
    return await pipeline.run(prepared, engine, request, services.settings.retry_after_s)
