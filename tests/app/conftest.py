"""A real server process on 127.0.0.1 with the real embedded model, started once per test session.

PLI_TEST_ENGINE picks the engine backend the whole API suite runs against: `transformers` (default,
`make unit`) or `vllm` (`make unit-vllm`, from the vLLM environment). The tests are the same for both.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.redis_server import RedisServer, start_redis

MODEL = "smollm2-135m-instruct"
# A completion that is still running when a test acts on it: greedy, the model counts on to max_tokens
# (sampled, it may end the count after a token or two).
COUNTING = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "temperature": 0}
ENGINE = os.environ.get("PLI_TEST_ENGINE", "transformers")
# First run converts the embedded GGUF model (~30 s on 2 cores); vLLM on CPU compiles for ~2 minutes.
READY_TIMEOUT_S = 600 if ENGINE == "vllm" else 300
ENGINE_OPTIONS: dict[str, list[str]] = {
    "transformers": ["--engine", "transformers"],
    # A small KV cache: the suite runs two servers side by side on a 24 GiB machine.
    "vllm": ["--engine", "vllm", "--cpu-kv-cache-gib", "1"],
}
# vLLM on CPU keeps one core for itself by default; on small test machines it gets them all.
ENGINE_ENV: dict[str, dict[str, str]] = {"transformers": {}, "vllm": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}


@dataclass
class Server:
    url: str
    key: str
    keys_db: Path
    keyring: Path
    process: subprocess.Popen[bytes]
    log: Path
    # The server's sd_notify messages, read as they come as systemd reads NOTIFY_SOCKET.
    notifications: list[str] = field(default_factory=list)

    def notified(self) -> list[str]:
        """The sd_notify messages received since the last call."""
        messages = self.notifications[:]
        del self.notifications[: len(messages)]
        return messages

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, **kwargs)  # type: ignore[arg-type]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a series over its label sets, or over those carrying every label given."""
        text = httpx.get(f"{self.url}/metrics").text
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                label_set = line[len(name) :].partition("}")[0]
                if all(label in label_set for label in wanted):
                    total += float(line.rsplit(" ", 1)[1])
        return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args], capture_output=True, text=True, check=False, timeout=timeout
    )


def usage_rows(keys_db: Path, *options: str) -> list[dict[str, object]]:
    """What `python -m app usage export --format json` gives for all time, with any more options."""
    exported = run_cli(
        "usage",
        "export",
        "--since",
        "2026-01-01",
        "--until",
        "2100-01-01",
        "--format",
        "json",
        *options,
        "--keys-db",
        str(keys_db),
    )
    assert exported.returncode == 0, exported.stderr
    rows: list[dict[str, object]] = json.loads(exported.stdout)
    return rows


def write_keyring(path: Path, *keys: dict[str, str]) -> None:
    """A JWT keyring file: the server reads it again when it changes."""
    path.write_text(json.dumps({"keys": list(keys)}))


def signing_key(kid: str, state: str = "primary", **extra: str) -> dict[str, str]:
    return {"kid": kid, "secret": base64.urlsafe_b64encode(os.urandom(32)).decode(), "state": state, **extra}


def start_server(tmp: Path, *extra: str, notify: bool = False) -> Server:
    keys_db = tmp / "keys.db"
    created = run_cli("keys", "create", "--name", "tests", "--tenant", "tests", "--keys-db", str(keys_db))
    assert created.returncode == 0, created.stderr
    keyring = tmp / "jwt-keyring.json"
    write_keyring(keyring, signing_key("first"))
    port = free_port()
    log = tmp / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **ENGINE_ENV[ENGINE]}
    notifications: list[str] = []
    if notify:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(tmp / "notify.sock"))
        threading.Thread(target=_read_notifications, args=(listener, notifications), daemon=True).start()
        # As systemd sets them for a unit with WatchdogSec=2 and NotifyAccess=main.
        env |= {"NOTIFY_SOCKET": str(tmp / "notify.sock"), "WATCHDOG_USEC": "2000000"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--keys-db",
            str(keys_db),
            "--jwt-keyring-file",
            str(keyring),
            *ENGINE_OPTIONS[ENGINE],
            *extra,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    server = Server(
        url=f"http://127.0.0.1:{port}",
        key=created.stdout.strip(),
        keys_db=keys_db,
        keyring=keyring,
        process=process,
        log=log,
        notifications=notifications,
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"server not ready within {READY_TIMEOUT_S} s:\n{log.read_text()}")


def _read_notifications(listener: socket.socket, into: list[str]) -> None:
    while True:
        into.append(listener.recv(4096).decode())


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()


class SharedServer:
    """One server for every test that asks for it, started on first use and again for the next test after
    one ended it (the drain and dead-engine tests end theirs): each start of the vLLM backend costs
    ~90 CPU seconds, so the suite starts only as many as its tests end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, name: str, *options: str, notify: bool = False):
        self._tmp_path_factory = tmp_path_factory
        self._name = name
        self._options = options
        self._notify = notify
        self._started: list[Server] = []

    def get(self) -> Server:
        if not self._started or self._started[-1].process.poll() is not None:
            folder = self._tmp_path_factory.mktemp(self._name)
            self._started.append(start_server(folder, *self._options, notify=self._notify))
        return self._started[-1]

    def stop(self) -> None:
        for running in self._started:
            stop_server(running)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ends_server: the test ends the shared server it was given")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The tests that end a shared server run last: a test after one would start that server again (a vLLM
    # start costs ~90 CPU seconds). sort() is stable, so the rest keep their order.
    items.sort(key=lambda item: item.get_closest_marker("ends_server") is not None)


@pytest.fixture(scope="session")
def _main_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    redis = start_redis(tmp_path_factory.mktemp("redis"))
    yield redis
    redis.stop()


# The main server's sensitive-word list: every answer of the suite goes through the answer filter. Its one
# term is in no answer; the content filter tests change the list and send SIGHUP, then put it back.
MAIN_WORD_LIST = "# a term no answer holds\nzqxjvk\n"


@pytest.fixture(scope="session")
def main_word_list(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("words") / "demo.txt"
    path.write_text(MAIN_WORD_LIST, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def archive_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main server archives every request under this master key (tests/app/test_archive.py)."""
    path = tmp_path_factory.mktemp("archive") / "archive.keys"
    path.write_text(run_cli("archive", "keygen").stdout, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def _main_servers(
    tmp_path_factory: pytest.TempPathFactory, _main_redis: RedisServer, main_word_list: Path, archive_key_file: Path
) -> Iterator[SharedServer]:
    # Quotas counted in a real Redis, as on a site with several nodes; the small server counts alone.
    shared = SharedServer(
        tmp_path_factory,
        "main",
        "--sensitive-word-files",
        str(main_word_list),
        # Answers reach clients with their personal data replaced (tests/app/test_pii.py).
        "--pii-mode-answer",
        "redact",
        "--archive-enabled",
        "--archive-key-file",
        str(archive_key_file),
        "--redis-url",
        f"redis://127.0.0.1:{_main_redis.port}/0",
        "--max-batch-size",
        "16",
        "--max-queued-requests",
        "64",
        "--max-body-bytes",
        "1048576",
        notify=True,
    )
    yield shared
    shared.stop()


@pytest.fixture
def server(_main_servers: SharedServer) -> Server:
    return _main_servers.get()


@pytest.fixture(scope="session")
def _small_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServer]:
    shared = SharedServer(
        tmp_path_factory,
        "small",
        "--max-batch-size",
        "1",
        "--max-queued-requests",
        "1",
        "--retry-after-s",
        "3",
        # Prompts reach the model with their personal data replaced; every log line is written (test_pii.py:
        # none holds a prompt's text).
        "--pii-mode-prompt",
        "redact",
        "--log-level",
        "debug",
        "--drain-timeout-s",
        "60",
        # Longer than any test: only the drain writes its usage rows.
        "--ledger-flush-interval-s",
        "60",
    )
    yield shared
    shared.stop()


@pytest.fixture
def small_server(_small_servers: SharedServer) -> Server:
    """One running slot and one waiting place: the third concurrent request must be refused."""
    return _small_servers.get()
