"""Per-key quotas: requests and tokens per minute (a sliding 60 s window), concurrent requests, tokens
per UTC day.

Admission reserves the prompt's tokens plus the request's max_tokens before the engine starts, so that
simultaneous requests cannot all pass a limit that only finished requests would count; the reservation
is settled to the tokens really used when the request ends, fails, or its client goes away.
"""

from typing import Protocol

from app.auth import Principal
from app.quota.limiter import LocalQuota, Reservation
from app.quota.refusals import QuotaExceededError


class Quota(Protocol):
    async def reserve(self, principal: Principal, tokens: int) -> Reservation: ...

    def settle(self, reservation: Reservation, tokens_used: int) -> None: ...


__all__ = ["LocalQuota", "Quota", "QuotaExceededError", "Reservation"]
