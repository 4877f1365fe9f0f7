"""Quotas shared through a real Redis: several nodes (SharedQuota instances, as each app process holds
one) get at most a key's limit together, and a node goes on alone while Redis is down."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis

from app.auth import KeyLimits, Principal
from app.metrics import Metrics
from app.quota import LocalQuota, QuotaExceededError
from app.quota.shared import RETRY_AFTER_FAILURE_S, SharedQuota
from tests.redis_server import RedisServer
from tests.tenancy.support import Clock


def _node(server: RedisServer, clock: Clock, metrics: Metrics | None = None) -> SharedQuota:
    client = redis.Redis(port=server.port, socket_timeout=0.5, socket_connect_timeout=0.5)
    return SharedQuota(client, LocalQuota(clock), metrics, clock=clock)


def _caller(**limits: int) -> Principal:
    return Principal(key_id="shared-key", tenant="t", name="n", via="api_key", limits=KeyLimits(**limits))


async def _admitted(node: SharedQuota, caller: Principal, tokens: int) -> bool:
    try:
        await node.reserve(caller, tokens)
    except QuotaExceededError:
        return False
    return True


def test_two_nodes_together_admit_a_keys_limit_over_any_60_seconds(redis_server: RedisServer) -> None:
    clock = Clock()

    async def scenario() -> None:
        nodes = [_node(redis_server, clock), _node(redis_server, clock)]
        caller = _caller(rpm=10)
        # Three times the limit, from both nodes at once.
        results = await asyncio.gather(*(_admitted(nodes[i % 2], caller, 1) for i in range(30)))
        assert sum(results) == 10
        clock.now += 59
        assert not await _admitted(nodes[0], caller, 1), "still inside the minute"
        clock.now += 1.5
        assert sum(await asyncio.gather(*(_admitted(nodes[i % 2], caller, 1) for i in range(30)))) == 10
        for node in nodes:
            await node.aclose()

    asyncio.run(scenario())


def test_tokens_are_reserved_across_nodes_and_settled_to_what_was_used(redis_server: RedisServer) -> None:
    clock = Clock()

    async def scenario() -> None:
        first, second = _node(redis_server, clock), _node(redis_server, clock)
        caller = _caller(tpm=1000, max_concurrent=2)
        held = await first.reserve(caller, 900)
        with pytest.raises(QuotaExceededError) as refused:
            await second.reserve(caller, 200)
        assert refused.value.kind == "tokens"
        assert refused.value.headers["x-ratelimit-remaining-tokens"] == "100"
        first.settle(held, 100)
        await asyncio.sleep(0.2)  # settling runs in the background
        admitted = await second.reserve(caller, 800)
        assert admitted.headers["x-ratelimit-remaining-tokens"] == "100"
        await second.reserve(caller, 50)
        with pytest.raises(QuotaExceededError, match="concurrent"):
            await first.reserve(caller, 1)
        for node in (first, second):
            await node.aclose()

    asyncio.run(scenario())


def test_with_redis_down_a_node_counts_alone_and_shares_again_when_it_returns(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    metrics = Metrics()

    async def scenario() -> None:
        node = _node(redis_server, clock, metrics)
        caller = _caller(rpm=2)
        assert await _admitted(node, caller, 1)
        redis_server.stop()
        # Still answering, under this node's own counters.
        assert await _admitted(node, caller, 1)
        assert metrics.quota_shared._value.get() == 0
        assert "Redis unreachable" in caplog.text
        assert await _admitted(node, caller, 1)
        assert not await _admitted(node, caller, 1), "the node-local limit holds meanwhile"
        redis_server.start()
        clock.now += RETRY_AFTER_FAILURE_S + 1
        assert await _admitted(node, _caller(rpm=2), 1)
        assert node.shared and metrics.quota_shared._value.get() == 1
        assert "shared across nodes again" in caplog.text
        await node.aclose()

    asyncio.run(scenario())


def test_a_redis_that_refuses_the_scripts_is_no_500_the_node_counts_alone(redis_server: RedisServer) -> None:
    """A wrong ACL (no scripting for the app's user) answers with an error, not a dropped connection:
    the node must still answer, under its own counters."""
    clock = Clock()
    metrics = Metrics()

    async def scenario() -> None:
        admin = redis.Redis(port=redis_server.port)
        await admin.execute_command(
            "ACL", "SETUSER", "no-scripts", "on", ">no-scripts-password-0123", "~pli:*", "+@all", "-@scripting"
        )
        client = redis.Redis(port=redis_server.port, username="no-scripts", password="no-scripts-password-0123")
        node = SharedQuota(client, LocalQuota(clock), metrics, clock=clock)
        caller = _caller(rpm=1)
        assert await _admitted(node, caller, 1)
        assert not node.shared and metrics.quota_shared._value.get() == 0
        assert not await _admitted(node, caller, 1), "the node-local limit holds"
        await node.aclose()
        await admin.execute_command("ACL", "DELUSER", "no-scripts")
        await admin.aclose()

    asyncio.run(scenario())
