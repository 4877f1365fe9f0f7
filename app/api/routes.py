"""OpenAI-compatible routes: parse, authenticate, hand over to the serving pipeline."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.dependencies import Authenticated, ReadyEngine, ServicesDep
from app.api.errors import APIError
from app.api.protocol import (
    AccessToken,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Status,
    TokenRequest,
)
from app.api.services import Services
from app.serving import pipeline
from app.serving.requests import Limits, prepare_chat, prepare_completion
from app.serving.safety import safety_of

router = APIRouter()


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


_ERROR_DESCRIPTIONS = {
    400: "Malformed or unsupported request (the error names the parameter)",
    401: "Missing, unknown, revoked or expired API key or access token",
    404: "Unknown model",
    413: "Request body too large",
    429: "The key's rate limit or the server's capacity reached; see Retry-After",
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
    if services.ledger is not None:
        services.metrics.ledger_pending.set(services.ledger.pending())
    if services.archive is not None:
        services.metrics.archive_pending.set(services.archive.pending())
    return PlainTextResponse(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/auth/token", response_model=AccessToken, responses=_errors(400, 401, 404))
def issue_token(principal: Authenticated, services: ServicesDep, body: TokenRequest | None = None) -> AccessToken:
    """An access token for the API key sent: accepted wherever the key is, for at most jwt_max_ttl_s."""
    if services.auth is None or services.auth.tokens is None:
        raise APIError(
            404, "Access tokens are not enabled on this server (no jwt_keyring_file).", code="tokens_disabled"
        )
    if principal.via != "api_key":
        # A token that could mint tokens would live for ever.
        raise APIError(401, "Access tokens are issued for an API key, not for a token.", code="api_key_required")
    token, lifetime = services.auth.tokens.issue(
        principal.key_id, principal.tenant, body.expires_in if body else None, principal.expires_at
    )
    return AccessToken(access_token=token, expires_in=lifetime)


# A node still loading (or whose model failed) answers 503 like the generation routes, not an empty list:
# nginx then asks another node, and a client never sees a service without its model.
@router.get("/v1/models", response_model=ModelList, responses=_errors(401, 503))
async def list_models(_: Authenticated, engine: ReadyEngine) -> ModelList:
    return ModelList(data=[ModelCard(id=engine.model_name)])


@router.post(
    "/v1/chat/completions", response_model=ChatCompletion, responses=_generation_responses(ChatCompletionChunk)
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, principal: Authenticated, engine: ReadyEngine, services: ServicesDep
) -> Response:
    prepared = await prepare_chat(body, engine, _limits(services), safety_of(services))
    return await pipeline.run(prepared, principal, engine, request, services)


@router.post("/v1/completions", response_model=Completion, responses=_generation_responses(Completion))
async def completions(
    body: CompletionRequest, request: Request, principal: Authenticated, engine: ReadyEngine, services: ServicesDep
) -> Response:
    prepared = await prepare_completion(body, engine, _limits(services), safety_of(services))
    return await pipeline.run(prepared, principal, engine, request, services)
