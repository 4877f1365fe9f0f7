"""Application factory: routes, OpenAI-shaped error handling, request accounting, background model load."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import APIError, error_body, error_response, location_to_param
from app.api.routes import router
from app.api.services import Services
from app.engine import Engine

log = logging.getLogger("app.access")

EngineFactory = Callable[[Services], Engine]


class RequestAccounting:
    """Pure ASGI middleware (streams stay unbuffered): body-size limit, draining refusals, in-flight
    count for the SIGTERM drain, HTTP metrics and one access-log line per request without any content."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        services = self.services
        path: str = scope["path"]
        started = time.monotonic()
        status = 500
        limit = services.settings.max_body_bytes

        async def reply(error: APIError) -> None:
            nonlocal status
            status = error.status
            await error_response(error)(scope, receive, send)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLargeError
            return message

        is_api = path.startswith("/v1/")
        if is_api and scope["method"] == "POST":
            # `curl -d` sends form encoding by default; the body is JSON whatever the label says.
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        if is_api:
            services.in_flight += 1
        try:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await reply(
                    APIError(
                        413, f"Request body too large: {int(declared)} bytes, limit {limit}.", code="body_too_large"
                    )
                )
            elif is_api and services.draining:
                await reply(APIError(503, "The server is shutting down; retry on another instance.", code="draining"))
            else:
                try:
                    await self.app(scope, receive_limited, send_wrapper)
                except _BodyTooLargeError:
                    await reply(APIError(413, f"Request body too large: limit {limit} bytes.", code="body_too_large"))
        finally:
            if is_api:
                services.in_flight -= 1
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            services.metrics.http_responses.labels(route=label, status=str(status)).inc()
            log.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        "route": label,
                        "status": status,
                        "duration_ms": round((time.monotonic() - started) * 1000, 1),
                    }
                },
            )


class _BodyTooLargeError(Exception):
    pass


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

    app = FastAPI(title="private-llm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.services = services
    app.include_router(router)
    app.add_middleware(RequestAccounting, services=services)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "Unknown route." if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("app").exception("unhandled error")
        return JSONResponse(error_body(500, "Internal server error."), status_code=500)

    return app
