"""The quota counters of one node, in process (the single-node default)."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from app.auth import KeyLimits, Principal

WINDOW_S = 60.0
DAY_S = 86_400

Kind = Literal["requests", "tokens"]


class QuotaExceededError(Exception):
    def __init__(self, kind: Kind, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers: dict[str, str] = {}


@dataclass
class Reservation:
    key_id: str
    entry_id: int
    tokens: int
    day: int
    # OpenAI's x-ratelimit-* headers as they stood at admission.
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False


@dataclass
class _Entry:
    entry_id: int
    at: float
    tokens: int


@dataclass
class _KeyCounters:
    window: deque[_Entry] = field(default_factory=deque)
    running: int = 0
    day: int = -1
    day_tokens: int = 0

    def expire(self, now: float) -> None:
        while self.window and self.window[0].at <= now - WINDOW_S:
            self.window.popleft()

    def window_tokens(self) -> int:
        return sum(entry.tokens for entry in self.window)


def duration(seconds: float) -> str:
    """OpenAI's form of a reset time: 1s, 6m0s, 20ms."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


class LocalQuota:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyCounters] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def reserve(self, principal: Principal, tokens: int) -> Reservation:
        limits = principal.limits
        now = self._clock()
        today = int(now // DAY_S)
        with self._lock:
            counters = self._keys.setdefault(principal.key_id, _KeyCounters())
            counters.expire(now)
            if counters.day != today:
                counters.day, counters.day_tokens = today, 0
            try:
                self._admit(limits, counters, now, tokens)
            except QuotaExceededError as exc:
                exc.headers = _headers(limits, counters, now, 0, 0)
                raise
            headers = _headers(limits, counters, now, 1, tokens)
            entry = _Entry(next(self._ids), now, tokens)
            counters.window.append(entry)
            counters.running += 1
            counters.day_tokens += tokens
        return Reservation(principal.key_id, entry.entry_id, tokens, today, headers)

    def settle(self, reservation: Reservation, tokens_used: int) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        with self._lock:
            counters = self._keys.get(reservation.key_id)
            if counters is None:
                return
            counters.running -= 1
            for entry in counters.window:
                if entry.entry_id == reservation.entry_id:
                    entry.tokens = tokens_used
                    break
            if counters.day == reservation.day:
                counters.day_tokens += tokens_used - reservation.tokens

    @staticmethod
    def _admit(limits: KeyLimits, counters: _KeyCounters, now: float, tokens: int) -> None:
        if limits.max_concurrent is not None and counters.running >= limits.max_concurrent:
            raise QuotaExceededError(
                "requests",
                f"Rate limit reached: {limits.max_concurrent} concurrent requests for this key. "
                "Retry when one has finished.",
                1,
            )
        if limits.rpm is not None and len(counters.window) >= limits.rpm:
            retry = counters.window[len(counters.window) - limits.rpm].at + WINDOW_S - now
            raise QuotaExceededError(
                "requests",
                f"Rate limit reached: {limits.rpm} requests per minute for this key. Retry in {duration(retry)}.",
                retry,
            )
        if limits.tpm is not None:
            if tokens > limits.tpm:
                raise QuotaExceededError(
                    "tokens",
                    f"Request too large: it may use {tokens} tokens (prompt and max_tokens), over the limit of "
                    f"{limits.tpm} tokens per minute for this key. Send a shorter prompt or a smaller max_tokens.",
                    WINDOW_S,
                )
            used = counters.window_tokens()
            if used + tokens > limits.tpm:
                retry = _tokens_free_in(counters, now, used + tokens - limits.tpm)
                raise QuotaExceededError(
                    "tokens",
                    f"Rate limit reached: {limits.tpm} tokens per minute for this key; this request may use "
                    f"{tokens}, {max(0, limits.tpm - used)} are left. Retry in {duration(retry)}.",
                    retry,
                )
        if limits.tokens_per_day is not None and counters.day_tokens + tokens > limits.tokens_per_day:
            retry = (counters.day + 1) * DAY_S - now
            raise QuotaExceededError(
                "tokens",
                f"Daily limit reached: {limits.tokens_per_day} tokens per day for this key "
                f"(resets at 00:00 UTC, in {duration(retry)}).",
                retry,
            )


def _tokens_free_in(counters: _KeyCounters, now: float, needed: int) -> float:
    freed = 0
    for entry in counters.window:
        freed += entry.tokens
        if freed >= needed:
            return max(0.0, entry.at + WINDOW_S - now)
    return WINDOW_S


def _headers(limits: KeyLimits, counters: _KeyCounters, now: float, requests: int, tokens: int) -> dict[str, str]:
    """The limits, what is left of them after `requests` more requests using `tokens`, and when the
    window has room again."""
    headers: dict[str, str] = {}
    oldest = counters.window[0].at if counters.window else now
    reset = duration(oldest + WINDOW_S - now if counters.window else 0)
    if limits.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - len(counters.window) - requests))
        headers["x-ratelimit-reset-requests"] = reset
    if limits.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - counters.window_tokens() - tokens))
        headers["x-ratelimit-reset-tokens"] = reset
    return headers
