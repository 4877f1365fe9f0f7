"""Application factory: routes, middlewares, OpenAI-shaped errors, the OpenAPI description, background model
load."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import APIError, error_body, error_response, location_to_param
from app.api.middleware import BodyLimit, Draining, JSONBodies, RequestId, RequestObserver
from app.api.protocol import SEED_RANGE, ChatCompletionChunk
from app.api.routes import router
from app.api.services import Services
from app.engine import Engine
from app.quota.shared import SharedQuota
from app.web import router as page_router

EngineFactory = Callable[[Services], Engine]


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first: dict[str, Any] = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request.", code="invalid_json")
    param = location_to_param(loc)
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if loc == ("body",):
        return APIError(400, "The request body must be a JSON object.", code="invalid_request")
    return APIError(
        400, f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param, code="invalid_value"
    )


def _describe(app: FastAPI, services: Services) -> dict[str, Any]:
    """The OpenAPI description as the server really behaves: bad requests are 400 (never FastAPI's 422),
    the model is the one served, max_tokens is bounded by its context. Final once the model is loaded."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path in schema["paths"].values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(chunk.pop("$defs", {}))
    components["ChatCompletionChunk"] = chunk
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        # FastAPI's OpenAPI models hold bounds as floats: 2**63 - 1 would come out rounded up to 2**63.
        components[request]["properties"]["seed"]["anyOf"][0].update(minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])
    engine = services.engine
    if engine is None or not engine.is_ready():
        return schema  # not cached: the model's name and context are not known yet
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        properties = components[request]["properties"]
        properties["model"] = {"type": "string", "enum": [engine.model_name], "title": "Model"}
        for name in ("max_tokens", "max_completion_tokens"):
            if name in properties:
                properties[name]["anyOf"][0]["maximum"] = engine.context_length
    app.openapi_schema = schema
    return schema


def create_app(services: Services, engine_factory: EngineFactory) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                engine = await asyncio.to_thread(engine_factory, services)
                services.engine = engine
                await engine.start()
                logging.getLogger("app").info("ready", extra={"fields": {"model": engine.model_name}})
            except Exception as exc:
                services.load_error = f"model failed to load: {exc}"
                logging.getLogger("app").exception("model load failed")

        # Serve /health and a 503 /ready while the model loads.
        task = asyncio.create_task(load())
        try:
            yield
        finally:
            task.cancel()
            if services.engine is not None:
                await services.engine.shutdown()
            # After the drain: every request has handed over its usage row by now.
            if isinstance(services.quota, SharedQuota):
                await services.quota.aclose()
            if services.ledger is not None:
                await asyncio.to_thread(services.ledger.close)
            if services.archive is not None:
                await asyncio.to_thread(services.archive.close)

    # No trailing-slash redirects: they would build a Location from the client's Host header.
    app = FastAPI(
        title="private-llm",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
    )
    app.state.services = services
    app.include_router(router)
    app.include_router(page_router)
    app.openapi = lambda: _describe(app, services)  # type: ignore[method-assign]
    # Listed innermost first: the observer sees every answer, including the refusals of the others.
    app.add_middleware(JSONBodies)
    app.add_middleware(Draining, services=services)
    app.add_middleware(BodyLimit, services=services)
    app.add_middleware(RequestObserver, services=services)
    app.add_middleware(RequestId)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "Unknown route." if exc.status_code == 404 else str(exc.detail)
        # 405 carries Allow (RFC 9110), which Starlette puts in the exception's headers.
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("app").exception("unhandled error")
        return JSONResponse(error_body(500, "Internal server error."), status_code=500)

    return app
