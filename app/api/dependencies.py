"""What routes depend on besides the parsed body: the caller (authenticate) and a ready engine."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from app.api.errors import APIError
from app.api.services import Services, get_services
from app.auth import ANONYMOUS, AuthenticationError, Principal
from app.engine import Engine

ServicesDep = Annotated[Services, Depends(get_services)]


def credential(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    return token.strip()


# A plain function: FastAPI runs it in a worker thread, so a database look-up never blocks the loop.
def authenticate(request: Request, services: ServicesDep) -> Principal:
    if services.auth is None:  # --insecure-no-auth
        return ANONYMOUS
    try:
        principal = services.auth.authenticate(credential(request), time.time())
    except AuthenticationError as exc:
        raise APIError(401, exc.message, code=exc.code) from exc
    # For the access log, and for the gateway's (app/api/middleware.py).
    request.state.key_id = principal.key_id
    request.state.tenant = principal.tenant
    return principal


Authenticated = Annotated[Principal, Depends(authenticate)]


def ready_engine(services: ServicesDep) -> Engine:
    # Draining is refused earlier, for every /v1 route, by a middleware.
    state = services.state()
    if state != "ready" or services.engine is None:
        failure = services.load_error or (services.engine.failure() if services.engine else None)
        message = failure or "The model is still loading; retry shortly."
        raise APIError(503, message, code="not_ready", headers={"Retry-After": "5"})
    return services.engine


ReadyEngine = Annotated[Engine, Depends(ready_engine)]
