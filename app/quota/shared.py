"""Quota counters shared by every node through Redis (setting redis_url): one Lua script reserves
atomically, another settles, so requests spread over any number of nodes get at most a key's limit.

Per key: a sorted set of the reservations admitted in the last 60 s (scored by time), a hash of their
tokens, a sorted set of the running ones (scored by a lease end, so that a node that died does not hold
its slots for ever) and a counter per UTC day. The clock is the node's (ARGV), not Redis's: nodes keep
NTP time, and tests can set it.

When Redis cannot be reached the node goes on under its own counters (LocalQuota), says so in the log and
in `private_llm_quota_shared`, and tries Redis again every RETRY_AFTER_FAILURE_S.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from app.auth import Principal
from app.metrics import Metrics
from app.quota.limiter import LocalQuota, Reservation
from app.quota.refusals import DAY_S, LIMITS, WINDOW_S, rate_headers, refusal

log = logging.getLogger("app.quota")

RETRY_AFTER_FAILURE_S = 5.0
# A running request stops counting against max_concurrent after this long without being settled.
LEASE_S = 3600
# Not only the network: a wrong password, an ACL that refuses the scripts or a full server (OOM under
# noeviction) are answers the node cannot count with either, and must not turn into 500s.
_UNREACHABLE = (RedisError, OSError)

_RESERVE = """
local now, window, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rpm, tpm, conc, tpd = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local id, lease, day_end = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  redis.call('HDEL', KEYS[2], unpack(gone))
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local count = #entries / 2
local used, amounts = 0, {}
if count > 0 then
  local ids = {}
  for i = 1, #entries, 2 do ids[#ids + 1] = entries[i] end
  amounts = redis.call('HMGET', KEYS[2], unpack(ids))
  for i = 1, #amounts do used = used + (tonumber(amounts[i]) or 0) end
end
local oldest = now
if count > 0 then oldest = tonumber(entries[2]) end
local running = redis.call('ZCARD', KEYS[3])
local day = tonumber(redis.call('GET', KEYS[4]) or '0')
local refused, retry = 0, 0
if conc >= 0 and running >= conc then
  refused, retry = 1, 1000
elseif rpm >= 0 and count >= rpm then
  refused, retry = 2, tonumber(entries[(count - rpm) * 2 + 2]) + window - now
elseif tpm >= 0 and tokens > tpm then
  refused, retry = 3, window
elseif tpm >= 0 and used + tokens > tpm then
  refused, retry = 4, window
  local needed, freed = used + tokens - tpm, 0
  for i = 1, count do
    freed = freed + (tonumber(amounts[i]) or 0)
    if freed >= needed then
      retry = tonumber(entries[i * 2]) + window - now
      break
    end
  end
elseif tpd >= 0 and day + tokens > tpd then
  refused, retry = 5, day_end - now
end
if refused > 0 then return {refused, retry, count, used, oldest} end
redis.call('ZADD', KEYS[1], now, id)
redis.call('HSET', KEYS[2], id, tokens)
redis.call('ZADD', KEYS[3], now + lease, id)
redis.call('INCRBY', KEYS[4], tokens)
redis.call('PEXPIREAT', KEYS[4], day_end + 3600000)
redis.call('PEXPIRE', KEYS[1], window + lease)
redis.call('PEXPIRE', KEYS[2], window + lease)
redis.call('PEXPIRE', KEYS[3], lease)
return {0, 0, count + 1, used + tokens, oldest}
"""

_SETTLE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('INCRBY', KEYS[4], tonumber(ARGV[2]) - tonumber(ARGV[3]))
end
return 1
"""


def _keys(key_id: str, day: int) -> list[str]:
    # One hash tag per API key: its four keys live on one Redis Cluster slot, as a script needs.
    base = f"pli:quota:{{{key_id}}}"
    return [f"{base}:window", f"{base}:tokens", f"{base}:running", f"{base}:day:{day}"]


def _limit_arg(value: int | None) -> int:
    return -1 if value is None else value


class SharedQuota:
    def __init__(
        self,
        client: redis.Redis,
        fallback: LocalQuota,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._fallback = fallback
        self._metrics = metrics
        self._clock = clock
        self._reserve: Any = client.register_script(_RESERVE)
        self._settle: Any = client.register_script(_SETTLE)
        self._down_until = 0.0
        self._down = False
        self._settling: set[asyncio.Task[None]] = set()
        self._report(shared=True)

    @property
    def shared(self) -> bool:
        return not self._down

    async def reserve(self, principal: Principal, tokens: int) -> Reservation:
        now = self._clock()
        if self._down and now < self._down_until:
            return self._fallback.reserve_now(principal, tokens)
        limits = principal.limits
        day = int(now // DAY_S)
        entry_id = secrets.token_hex(8)
        args = [
            int(now * 1000),
            int(WINDOW_S * 1000),
            tokens,
            _limit_arg(limits.rpm),
            _limit_arg(limits.tpm),
            _limit_arg(limits.max_concurrent),
            _limit_arg(limits.tokens_per_day),
            entry_id,
            LEASE_S * 1000,
            (day + 1) * DAY_S * 1000,
        ]
        try:
            answer = await self._reserve(keys=_keys(principal.key_id, day), args=args)
        except _UNREACHABLE as exc:
            self._went_down(exc, now)
            return self._fallback.reserve_now(principal, tokens)
        self._came_back()
        refused, retry_ms, count, used, oldest_ms = answer
        reset_s = max(0.0, (int(oldest_ms) / 1000 + WINDOW_S - now)) if int(count) else 0.0
        if refused:
            error = refusal(LIMITS[int(refused) - 1], limits, tokens, int(used), int(retry_ms) / 1000)
            error.headers = rate_headers(limits, int(count), int(used), reset_s)
            raise error
        headers = rate_headers(limits, int(count), int(used), reset_s)
        return Reservation(principal.key_id, entry_id, tokens, day, headers, shared=True)

    def settle(self, reservation: Reservation, tokens_used: int) -> None:
        """Settling never holds up the answer: the script runs in the background."""
        if not reservation.shared:
            self._fallback.settle(reservation, tokens_used)
            return
        if reservation.settled:
            return
        reservation.settled = True
        task = asyncio.get_running_loop().create_task(self._settle_shared(reservation, tokens_used))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_shared(self, reservation: Reservation, tokens_used: int) -> None:
        keys = _keys(reservation.key_id, reservation.day)
        try:
            await self._settle(keys=keys, args=[reservation.entry_id, tokens_used, reservation.tokens])
        except _UNREACHABLE as exc:
            # The reservation stays as made (its tokens counted in full, its slot until the lease ends).
            log.warning("quota settle failed", extra={"fields": {"error": str(exc)}})

    async def aclose(self) -> None:
        if self._settling:
            await asyncio.wait(self._settling, timeout=5)
        await self._client.aclose()

    def _went_down(self, exc: Exception, now: float) -> None:
        self._down_until = now + RETRY_AFTER_FAILURE_S
        if not self._down:
            self._down = True
            log.error(
                "Redis unreachable: counting quotas on this node alone until it answers again",
                extra={"fields": {"error": str(exc)}},
            )
            self._report(shared=False)

    def _came_back(self) -> None:
        if self._down:
            self._down = False
            log.warning("Redis answers again: quotas are shared across nodes again")
            self._report(shared=True)

    def _report(self, shared: bool) -> None:
        if self._metrics is not None:
            self._metrics.quota_shared.set(1 if shared else 0)
