"""The supervisor against a real engine: it feeds systemd's watchdog only while the engine is healthy, and
ends the process when the engine failed or is stuck in a step. sd_notify goes to a real datagram socket."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.api.services import Services
from app.engine import SamplingParams
from app.engine.loader import LoadedModel
from app.metrics import Metrics
from app.settings import Settings
from app.supervisor import EXIT_ENGINE_FAILED, EXIT_ENGINE_STALLED, Notifier, Supervisor
from tests.engine.conftest import collect, engine_for

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, Notifier]]:
    """A socket where systemd would listen, and a notifier sending to it as under WatchdogSec."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(2)
    yield listener, Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"})
    listener.close()


def received(listener: socket.socket) -> list[str]:
    messages = []
    listener.setblocking(False)
    try:
        while True:
            messages.append(listener.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        listener.settimeout(2)


class Exits:
    def __init__(self) -> None:
        self.requested: list[int] = []
        self.aborted: list[int] = []


def supervised(loaded: LoadedModel, notifier: Notifier, **settings: Any) -> tuple[Services, Supervisor, Exits]:
    services = Services(settings=Settings(**settings), metrics=Metrics(), auth=None)
    services.engine = engine_for(loaded)
    exits = Exits()
    supervisor = Supervisor(services, notifier, request_exit=exits.requested.append, abort=exits.aborted.append)
    return services, supervisor, exits


def test_a_healthy_engine_feeds_the_watchdog(loaded: LoadedModel, systemd: Any) -> None:
    listener, notifier = systemd
    services, supervisor, exits = supervised(loaded, notifier)

    async def scenario() -> None:
        assert services.engine is not None
        supervisor.check()  # loading
        await services.engine.start()
        supervisor.check()
        supervisor.check()
        await services.engine.shutdown()

    asyncio.run(scenario())
    messages = received(listener)
    # READY first and once: under Type=notify the watchdog counts from it.
    assert messages[:2] == ["READY=1", "STATUS=loading"]
    assert messages.count("READY=1") == 1
    assert "STATUS=ready" in messages
    assert messages.count("WATCHDOG=1") == 3
    assert exits.requested == [] and exits.aborted == []


def test_an_engine_that_cannot_go_on_ends_the_process(loaded: LoadedModel, systemd: Any) -> None:
    listener, notifier = systemd
    services, supervisor, exits = supervised(loaded, notifier)

    def fail(*_: Any) -> None:
        raise RuntimeError("device lost")

    async def scenario() -> None:
        engine = services.engine
        assert engine is not None
        await engine.start()
        broken = loaded.model.register_forward_pre_hook(fail)
        try:
            for i in range(3):
                await collect(engine.generate(engine.encode_prompt(f"Request {i}"), GREEDY))
        finally:
            broken.remove()
        received(listener)
        supervisor.check()
        supervisor.check()
        await engine.shutdown()

    asyncio.run(scenario())
    assert exits.requested == [EXIT_ENGINE_FAILED], "asked to exit once"
    assert services.draining, "no new request is taken while the process ends"
    assert "WATCHDOG=1" not in received(listener), "a failed engine must not feed the watchdog"


def test_an_engine_stuck_in_a_step_ends_the_process_at_once(loaded: LoadedModel, systemd: Any) -> None:
    _, notifier = systemd
    services, supervisor, exits = supervised(loaded, notifier, engine_stall_timeout_s=0.5)
    entered, release = threading.Event(), threading.Event()

    def hang(*_: Any) -> None:
        entered.set()
        release.wait(30)

    async def scenario() -> None:
        engine = services.engine
        assert engine is not None
        await engine.start()
        handle = loaded.model.register_forward_pre_hook(hang)
        try:
            stream = engine.generate(engine.encode_prompt("Hello"), GREEDY)
            waiting = asyncio.ensure_future(collect(stream))
            await asyncio.to_thread(entered.wait, 30)
            await asyncio.sleep(1.0)  # longer than the stall limit
            supervisor.check()
        finally:
            handle.remove()
            release.set()
        await waiting
        await engine.shutdown()

    asyncio.run(scenario())
    assert exits.aborted == [EXIT_ENGINE_STALLED]
