"""Per-key quotas: requests and tokens per minute (a sliding 60 s window), concurrent requests, tokens
per UTC day.

Admission reserves the prompt's tokens plus the request's max_tokens before the engine starts, so that
simultaneous requests cannot all pass a limit that only finished requests would count; the reservation
is settled to the tokens really used when the request ends, fails, or its client goes away.
"""

from app.quota.limiter import LocalQuota, QuotaExceededError, Reservation

__all__ = ["LocalQuota", "QuotaExceededError", "Reservation"]
