"""What request handlers depend on, built once per app and handed out through FastAPI dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from app.archive import Archive
from app.auth import Authenticator
from app.engine import Engine
from app.ledger import UsageLedger
from app.metrics import Metrics
from app.quota import LocalQuota, Quota
from app.safety import ContentFilter
from app.settings import Settings


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    # None: --insecure-no-auth.
    auth: Authenticator | None
    quota: Quota = field(default_factory=LocalQuota)
    ledger: UsageLedger | None = None
    # None: no sensitive_word_files.
    content_filter: ContentFilter | None = None
    # None: the archive is off (archive_enabled, archive_tenants).
    archive: Archive | None = None
    engine: Engine | None = None
    load_error: str | None = None
    draining: bool = False
    in_flight: int = field(default=0)

    def archives(self, tenant: str) -> bool:
        settings = self.settings
        return self.archive is not None and (settings.archive_enabled or tenant in settings.archive_tenants)

    def state(self) -> str:
        """ready, loading, draining or failed: what /ready reports and what gates generation."""
        if self.draining:
            return "draining"
        if self.load_error is not None or (self.engine is not None and self.engine.failure() is not None):
            return "failed"
        if self.engine is None or not self.engine.is_ready():
            return "loading"
        return "ready"


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
