"""What both quota backends say: the refusal for each limit, and OpenAI's x-ratelimit-* headers."""

from __future__ import annotations

import math
from typing import Literal

from app.auth import KeyLimits

WINDOW_S = 60.0
DAY_S = 86_400

Kind = Literal["requests", "tokens"]
# Which limit refused a request, in the order they are checked.
Limit = Literal["max_concurrent", "rpm", "too_large", "tpm", "tokens_per_day"]
LIMITS: tuple[Limit, ...] = ("max_concurrent", "rpm", "too_large", "tpm", "tokens_per_day")


class QuotaExceededError(Exception):
    def __init__(self, kind: Kind, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers: dict[str, str] = {}


def duration(seconds: float) -> str:
    """OpenAI's form of a reset time: 1s, 6m0s, 20ms."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def refusal(limit: Limit, limits: KeyLimits, tokens: int, used: int, retry_s: float) -> QuotaExceededError:
    if limit == "max_concurrent":
        return QuotaExceededError(
            "requests",
            f"Rate limit reached: {limits.max_concurrent} concurrent requests for this key. "
            "Retry when one has finished.",
            1,
        )
    if limit == "rpm":
        return QuotaExceededError(
            "requests",
            f"Rate limit reached: {limits.rpm} requests per minute for this key. Retry in {duration(retry_s)}.",
            retry_s,
        )
    if limit == "too_large":
        return QuotaExceededError(
            "tokens",
            f"Request too large: it may use {tokens} tokens (prompt and max_tokens), over the limit of "
            f"{limits.tpm} tokens per minute for this key. Send a shorter prompt or a smaller max_tokens.",
            WINDOW_S,
        )
    if limit == "tpm":
        left = max(0, (limits.tpm or 0) - used)
        return QuotaExceededError(
            "tokens",
            f"Rate limit reached: {limits.tpm} tokens per minute for this key; this request may use "
            f"{tokens}, {left} are left. Retry in {duration(retry_s)}.",
            retry_s,
        )
    return QuotaExceededError(
        "tokens",
        f"Daily limit reached: {limits.tokens_per_day} tokens per day for this key "
        f"(resets at 00:00 UTC, in {duration(retry_s)}).",
        retry_s,
    )


def rate_headers(limits: KeyLimits, requests: int, tokens: int, reset_s: float) -> dict[str, str]:
    """The limits, what is left of them with `requests` requests using `tokens` in the window, and when
    the window has room again."""
    headers: dict[str, str] = {}
    reset = duration(reset_s)
    if limits.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - requests))
        headers["x-ratelimit-reset-requests"] = reset
    if limits.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - tokens))
        headers["x-ratelimit-reset-tokens"] = reset
    return headers
