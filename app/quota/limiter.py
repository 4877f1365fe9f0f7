"""The quota counters of one node, in process: the single-node default, and what a node falls back to
while the shared counters (app/quota/shared.py) cannot be reached."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from app.auth import KeyLimits, Principal
from app.quota.refusals import DAY_S, WINDOW_S, Limit, rate_headers, refusal


@dataclass
class Reservation:
    key_id: str
    entry_id: str
    tokens: int
    day: int
    # OpenAI's x-ratelimit-* headers as they stood at admission.
    headers: dict[str, str] = field(default_factory=dict)
    # Which counters hold it: settled where it was made.
    shared: bool = False
    settled: bool = False


@dataclass
class _Entry:
    entry_id: str
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

    def reset_s(self, now: float) -> float:
        return self.window[0].at + WINDOW_S - now if self.window else 0.0


class LocalQuota:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyCounters] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    async def reserve(self, principal: Principal, tokens: int) -> Reservation:
        return self.reserve_now(principal, tokens)

    def reserve_now(self, principal: Principal, tokens: int) -> Reservation:
        limits = principal.limits
        now = self._clock()
        today = int(now // DAY_S)
        with self._lock:
            counters = self._keys.setdefault(principal.key_id, _KeyCounters())
            counters.expire(now)
            if counters.day != today:
                counters.day, counters.day_tokens = today, 0
            used = counters.window_tokens()
            refused = _first_limit_over(limits, counters, tokens, used)
            if refused is not None:
                error = refusal(refused[0], limits, tokens, used, refused[1](now))
                error.headers = rate_headers(limits, len(counters.window), used, counters.reset_s(now))
                raise error
            entry = _Entry(f"local-{next(self._ids)}", now, tokens)
            counters.window.append(entry)
            counters.running += 1
            counters.day_tokens += tokens
            headers = rate_headers(limits, len(counters.window), used + tokens, counters.reset_s(now))
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


def _first_limit_over(
    limits: KeyLimits, counters: _KeyCounters, tokens: int, used: int
) -> tuple[Limit, Callable[[float], float]] | None:
    """The first limit this request would break, with when it has room again (a function of now)."""
    if limits.max_concurrent is not None and counters.running >= limits.max_concurrent:
        return "max_concurrent", lambda now: 1.0
    if limits.rpm is not None and len(counters.window) >= limits.rpm:
        oldest_counted = counters.window[len(counters.window) - limits.rpm]
        return "rpm", lambda now: oldest_counted.at + WINDOW_S - now
    if limits.tpm is not None and tokens > limits.tpm:
        return "too_large", lambda now: WINDOW_S
    if limits.tpm is not None and used + tokens > limits.tpm:
        needed = used + tokens - limits.tpm
        return "tpm", lambda now: _tokens_free_in(counters, now, needed)
    if limits.tokens_per_day is not None and counters.day_tokens + tokens > limits.tokens_per_day:
        return "tokens_per_day", lambda now: (counters.day + 1) * DAY_S - now
    return None


def _tokens_free_in(counters: _KeyCounters, now: float, needed: int) -> float:
    freed = 0
    for entry in counters.window:
        freed += entry.tokens
        if freed >= needed:
            return max(0.0, entry.at + WINDOW_S - now)
    return WINDOW_S
