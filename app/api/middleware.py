"""Pure ASGI middlewares, one job each (streams pass through unbuffered)."""

from __future__ import annotations

import logging
import re
import secrets
import time
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import APIError, error_response
from app.api.services import Services

log = logging.getLogger("app.access")


def _is_api(scope: Scope) -> bool:
    return scope["type"] == "http" and str(scope["path"]).startswith("/v1/")


# What an incoming X-Request-ID may be to be kept (nginx sends 32 hex digits); anything else is replaced,
# never copied into a log line or a header.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class RequestId:
    """One id per request, end to end: the gateway's X-Request-ID when it sent a sane one, else a new one;
    logged with the request (scope state `request_id`) and returned in the X-Request-ID response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given.decode() if _REQUEST_ID.fullmatch(given) else secrets.token_hex(16)
        scope.setdefault("state", {})["request_id"] = request_id

        async def tag(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, tag)


class RequestObserver:
    """HTTP metrics by route and status, and one access-log line per request (with its id and the key's
    id once authenticated), without any content, query string or credential."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *_principal_headers(scope.get("state", {}))]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.services.metrics.http_responses.labels(route=route, status=str(status)).inc()
            state = scope.get("state", {})
            fields = {
                "method": scope["method"],
                "route": route,
                "status": status,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
                "request_id": state.get("request_id"),
            }
            if state.get("key_id") is not None:
                fields["key_id"] = state["key_id"]
                fields["tenant"] = state.get("tenant")
            log.info("request", extra={"fields": fields})


def _principal_headers(state: dict[str, object]) -> list[tuple[bytes, bytes]]:
    """The key's id and tenant, for the gateway's access log (nginx logs them and keeps them from the
    client); percent-encoded, as a header holds only ASCII."""
    if state.get("key_id") is None:
        return []
    return [
        (b"x-pli-key-id", quote(str(state["key_id"]), safe="").encode()),
        (b"x-pli-tenant", quote(str(state.get("tenant", "")), safe="-_.~@+").encode()),
    ]


class BodyLimit:
    """413 for a body over max_body_bytes: at once when Content-Length says so, else as soon as it is
    read past the limit."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.limit = services.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            message = f"Request body too large: {int(declared)} bytes, limit {self.limit}."
            await error_response(APIError(413, message, code="body_too_large"))(scope, receive, send)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLargeError
            return message

        try:
            await self.app(scope, receive_limited, send)
        except _BodyTooLargeError:
            message = f"Request body too large: limit {self.limit} bytes."
            await error_response(APIError(413, message, code="body_too_large"))(scope, receive, send)


class _BodyTooLargeError(Exception):
    pass


class Draining:
    """Counts API requests in flight (the SIGTERM drain waits for them) and refuses new ones with 503
    once draining has begun."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_api(scope):
            await self.app(scope, receive, send)
            return
        if self.services.draining:
            error = APIError(503, "The server is shutting down; retry on another instance.", code="draining")
            await error_response(error)(scope, receive, send)
            return
        self.services.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.services.in_flight -= 1


class JSONBodies:
    """API bodies are JSON whatever their label says (`curl -d` sends application/x-www-form-urlencoded)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _is_api(scope) and scope["method"] == "POST":
            # In place: the observer outside reads the matched route from this same scope.
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"] = [*headers, (b"content-type", b"application/json")]
        await self.app(scope, receive, send)
