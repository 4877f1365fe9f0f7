"""GET / (the page) and GET /chat/<asset>: a fixed list of files, never a path from the request."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from app.api.errors import APIError

router = APIRouter(include_in_schema=False)

# Only this server's own scripts, styles and API; no inline code, no frames, no forms posting anywhere.
# Model answers are rendered as sanitised HTML without images, so nothing else is ever fetched.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_ASSETS: dict[str, str] = {
    "chat.css": "text/css; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
    "strings.js": "text/javascript; charset=utf-8",
    "vendor/marked.umd.js": "text/javascript; charset=utf-8",
    "vendor/purify.min.js": "text/javascript; charset=utf-8",
}

_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # A new release's page and assets reach browsers at once.
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return files("app.web").joinpath("static", name).read_bytes()


def _file(name: str, media_type: str) -> Response:
    return Response(_read(name), media_type=media_type, headers=_HEADERS)


@router.get("/")
def page() -> Response:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/chat/{name:path}")
def asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise APIError(404, "Unknown route.", code="not_found")
    return _file(name, media_type)
