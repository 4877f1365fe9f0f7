"""The node-local quota: reservations before the engine runs, a sliding window, settling to real use."""

from __future__ import annotations

import pytest

from app.auth import KeyLimits, Principal
from app.quota import LocalQuota, QuotaExceededError
from tests.tenancy.support import Clock


def _principal(**limits: int) -> Principal:
    return Principal(key_id="k", tenant="t", name="n", via="api_key", limits=KeyLimits(**limits))


def test_requests_per_minute_hold_over_any_60_seconds() -> None:
    clock = Clock()
    quota = LocalQuota(clock)
    caller = _principal(rpm=3)
    for _ in range(3):
        quota.settle(quota.reserve_now(caller, 10), 10)
        clock.now += 10
    with pytest.raises(QuotaExceededError) as refused:
        quota.reserve_now(caller, 10)
    assert refused.value.kind == "requests"
    # The first request was 30 s ago: room again 30 s from now, not at a minute boundary.
    assert refused.value.retry_after_s == pytest.approx(30)
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 30
    quota.reserve_now(caller, 10)


def test_reservations_count_before_any_request_finishes() -> None:
    """100 requests at once cannot all slip under a token limit checked only at their end."""
    quota = LocalQuota(Clock())
    caller = _principal(tpm=1000)
    admitted = []
    for _ in range(100):
        try:
            admitted.append(quota.reserve_now(caller, 300))
        except QuotaExceededError as exc:
            assert exc.kind == "tokens"
    assert len(admitted) == 3


def test_settling_gives_back_what_was_reserved_and_not_used() -> None:
    quota = LocalQuota(Clock())
    caller = _principal(tpm=1000)
    first = quota.reserve_now(caller, 900)
    with pytest.raises(QuotaExceededError):
        quota.reserve_now(caller, 200)
    quota.settle(first, 120)  # the answer was short
    second = quota.reserve_now(caller, 800)
    assert second.headers["x-ratelimit-remaining-tokens"] == "80"
    quota.settle(first, 999)
    assert quota.reserve_now(caller, 80), "settling twice changes nothing"


def test_concurrent_requests_are_bounded_and_freed_on_settle() -> None:
    quota = LocalQuota(Clock())
    caller = _principal(max_concurrent=2)
    one, _two = quota.reserve_now(caller, 1), quota.reserve_now(caller, 1)
    with pytest.raises(QuotaExceededError) as refused:
        quota.reserve_now(caller, 1)
    assert refused.value.kind == "requests"
    quota.settle(one, 0)
    quota.reserve_now(caller, 1)


def test_tokens_per_day_reset_at_midnight_utc() -> None:
    clock = Clock(1_800_057_600.0 - 10)  # 10 s before 00:00 UTC
    quota = LocalQuota(clock)
    caller = _principal(tokens_per_day=100)
    quota.settle(quota.reserve_now(caller, 100), 100)
    with pytest.raises(QuotaExceededError) as refused:
        quota.reserve_now(caller, 1)
    assert refused.value.retry_after_s == pytest.approx(10)
    clock.now += 10
    quota.reserve_now(caller, 100)


def test_a_request_larger_than_the_whole_minute_says_so() -> None:
    quota = LocalQuota(Clock())
    with pytest.raises(QuotaExceededError, match="Request too large"):
        quota.reserve_now(_principal(tpm=100), 101)


def test_keys_do_not_share_counters_and_unlimited_keys_send_no_headers() -> None:
    quota = LocalQuota(Clock())
    quota.reserve_now(_principal(rpm=1), 1)
    other = Principal(key_id="other", tenant="t", name="o", via="api_key", limits=KeyLimits(rpm=1))
    assert quota.reserve_now(other, 1).headers["x-ratelimit-limit-requests"] == "1"
    unlimited = Principal(key_id="u", tenant="t", name="u", via="api_key")
    assert quota.reserve_now(unlimited, 10**9).headers == {}
