"""Process-level behaviour: key management CLI, refusing to start without keys, draining on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from app.__main__ import build_parser, settings_from
from app.auth.keys import KEY_CACHE_S
from app.supervisor import EXIT_ENGINE_FAILED
from tests.app.conftest import COUNTING, ENGINE, Server, free_port, run_cli, usage_rows


def test_check_config_validates_a_config_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("port: 8123\nmax_batch_size: 4\n")
    assert run_cli("check-config", "--config-file", str(good)).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: 70000\nmax_batch_sise: 4\n")
    result = run_cli("check-config", "--config-file", str(bad))
    assert result.returncode == 2
    assert "port" in result.stderr
    assert "max_batch_sise" in result.stderr


def test_keys_cli_create_list_revoke(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    created = run_cli("keys", "create", "--name", "alice", "--tenant", "team-a", "--rpm", "5", "--keys-db", str(db))
    assert created.returncode == 0
    key = created.stdout.strip()
    assert created.stdout == key + "\n", "create must print the key alone"
    assert key.startswith("sk-pli-")
    assert key.encode() not in db.read_bytes(), "the plain key must never be stored"
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    listing = run_cli("keys", "list", "--keys-db", str(db)).stdout
    assert "alice\tteam-a\trpm=5\t-\t-\tactive" in listing
    assert key not in listing
    assert run_cli("keys", "revoke", "alice", "--keys-db", str(db)).returncode == 0
    assert "revoked" in run_cli("keys", "list", "--keys-db", str(db)).stdout
    assert run_cli("keys", "revoke", "nobody", "--keys-db", str(db)).returncode == 1


def test_server_refuses_to_start_without_any_key(tmp_path: Path) -> None:
    result = run_cli("serve", "--port", str(free_port()), "--keys-db", str(tmp_path / "none.db"))
    assert result.returncode == 2
    assert "--insecure-no-auth" in result.stderr


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("serve", "--model-path", str(tmp_path / "missing"), timeout=60)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_server_without_its_model_answers_503_on_every_model_route(tmp_path: Path) -> None:
    """A node whose model is loading or failed says so on /v1/models too, as a 503 naming the cause, never
    an empty list: nginx moves a 503 on to another node, while an empty list would reach the client (an
    openai client's `models.list().data[0]` failed that way during a rolling restart)."""
    keys_db = tmp_path / "keys.db"
    key = run_cli("keys", "create", "--name", "n", "--tenant", "t", "--keys-db", str(keys_db)).stdout.strip()
    no_model = tmp_path / "model"
    no_model.mkdir()
    port = free_port()
    arguments = ["serve", "--host", "127.0.0.1", "--port", str(port), "--keys-db", str(keys_db)]
    process = subprocess.Popen(
        [sys.executable, "-m", "app", *arguments, "--model-path", str(no_model)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        state = ""
        while state != "failed" and time.monotonic() < deadline and process.poll() is None:
            try:
                state = httpx.get(f"{url}/ready", timeout=2).json()["status"]
            except httpx.TransportError:
                time.sleep(0.5)
        assert state == "failed"
        headers = {"Authorization": f"Bearer {key}"}
        for method, route in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            body = {"model": "m", "messages": [{"role": "user", "content": "Hi."}]} if method == "POST" else None
            answer = httpx.request(method, f"{url}{route}", headers=headers, json=body, timeout=30)
            assert answer.status_code == 503, (route, answer.text)
            assert answer.json()["error"]["code"] == "not_ready"
            assert "model failed to load" in answer.json()["error"]["message"]
            assert answer.headers["retry-after"] == "5"
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_revoked_key_is_refused_within_the_key_cache_time(server: Server) -> None:
    created = run_cli("keys", "create", "--name", "revoke-me", "--tenant", "t", "--keys-db", str(server.keys_db))
    assert created.returncode == 0, created.stderr
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=created.stdout.strip(), max_retries=0)
    assert client.models.list().data
    assert run_cli("keys", "revoke", "revoke-me", "--keys-db", str(server.keys_db)).returncode == 0
    # Key look-ups are cached for KEY_CACHE_S on each node.
    deadline = time.monotonic() + KEY_CACHE_S + 5
    while time.monotonic() < deadline:
        try:
            client.models.list()
        except openai.AuthenticationError as exc:
            assert exc.code == "revoked_api_key"
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"a revoked key still worked {KEY_CACHE_S + 5} s later")
    assert server.client().models.list().data, "the other keys still work"


def stream_in_background(server: Server, body: dict[str, object]) -> tuple[list[str], threading.Thread]:
    """Starts a streamed completion on a thread and returns once its first event has arrived: the
    events (filled as they come) and the thread."""
    lines: list[str] = []
    first_chunk = threading.Event()
    headers = {"Authorization": f"Bearer {server.key}"}

    def consume() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=120) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                    first_chunk.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first_chunk.wait(60), "no first event within 60 s"
    return lines, reader


@pytest.mark.ends_server
def test_sigterm_drains_in_flight_requests_then_exits_zero(small_server: Server) -> None:
    server = small_server  # started with --drain-timeout-s 60; ended here, the next user gets a new one
    headers = {"Authorization": f"Bearer {server.key}"}
    # A stream still running when the signal comes, which must run to its max_tokens.
    body = {**COUNTING, "max_tokens": 60, "stream": True}
    lines, reader = stream_in_background(server, body)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        assert httpx.get(f"{server.url}/ready").status_code == 503
        assert server.metric("private_llm_state", state="draining") == 1
        refused = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, headers=headers)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        reader.join(120)
        assert server.process.wait(timeout=60) == 0
    assert lines[-1] == "data: [DONE]", "the in-flight stream was cut off"
    assert '"finish_reason":"length"' in lines[-2]
    # The small server writes its ledger once a minute: the row is there because the drain wrote it.
    rows = usage_rows(server.keys_db)
    assert any(
        (row["endpoint"], row["finish_reason"], row["completion_tokens"], row["status"])
        == ("/v1/completions", "length", 60, 200)
        for row in rows
    ), rows


@pytest.mark.ends_server
@pytest.mark.skipif(
    ENGINE != "vllm",
    reason="only vLLM's engine core is a process that can die apart from the server; the transformers "
    "engine's failures are injected in-process (tests/engine)",
)
def test_a_dead_engine_ends_the_server_so_that_systemd_restarts_it(server: Server) -> None:
    body = {**COUNTING, "max_tokens": 2000, "stream": True}
    lines, reader = stream_in_background(server, body)
    try:
        for child in psutil.Process(server.process.pid).children(recursive=True):
            child.kill()  # vLLM's engine core and whatever it started
        assert server.process.wait(timeout=60) == EXIT_ENGINE_FAILED
    finally:
        if server.process.poll() is None:
            server.process.kill()
        reader.join(60)
    assert any('"engine_failure"' in line for line in lines), "the in-flight stream was told, not left hanging"


def test_a_setting_that_defaults_to_on_can_be_switched_off_by_flag() -> None:
    parser = build_parser()
    assert settings_from(parser.parse_args(["serve"])).enable_prefix_caching is True
    assert settings_from(parser.parse_args(["serve", "--no-enable-prefix-caching"])).enable_prefix_caching is False
    assert settings_from(parser.parse_args(["serve", "--insecure-no-auth"])).insecure_no_auth is True
