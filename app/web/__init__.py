"""The chat page: one HTML page and its assets, read from this package and served by the app itself, so
that an air-gapped site needs nothing from anywhere but this server."""

from app.web.routes import PAGE_CSP, router

__all__ = ["PAGE_CSP", "router"]
