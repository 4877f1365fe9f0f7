"""Tenants on a running server: access tokens with the official client, per-key quotas answered the way
OpenAI answers them, expired keys."""

from __future__ import annotations

import json
import time

import httpx
import jwt
import openai
import pytest

from tests.app.conftest import COUNTING, MODEL, Server, run_cli, signing_key, usage_rows, write_keyring


def _key(server: Server, name: str, *limits: str) -> str:
    created = run_cli(
        "keys", "create", "--name", name, "--tenant", f"{name}-team", *limits, "--keys-db", str(server.keys_db)
    )
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


def _token(server: Server, credential: str, **body: int) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/auth/token", json=body or None, headers={"Authorization": f"Bearer {credential}"}, timeout=30
    )


def _complete(server: Server, key: str, max_tokens: int = 1, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(
        f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def test_an_access_token_works_with_the_official_client_wherever_the_key_does(server: Server) -> None:
    issued = _token(server, server.key, expires_in=600)
    assert issued.status_code == 200, issued.text
    body = issued.json()
    assert (body["token_type"], body["expires_in"]) == ("bearer", 600)
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["tenant"] == "tests" and claims["exp"] - claims["iat"] == 600
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=body["access_token"], max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert answer.choices[0].message.content is not None
    assert _token(server, body["access_token"]).json()["error"]["code"] == "api_key_required"


def test_the_signing_key_rotates_on_a_live_server_with_no_failed_request(server: Server) -> None:
    old_token = _token(server, server.key).json()["access_token"]
    current = jwt.get_unverified_header(old_token)["kid"]
    ring = {"kid": current, "secret": _secret_of(server, current)}
    new = signing_key(f"{current}-next", state="staged")
    write_keyring(server.keyring, {**ring, "state": "primary"}, new)
    write_keyring(
        server.keyring,
        {**ring, "state": "retired", "verify_until": "2099-01-01T00:00:00Z"},
        {**new, "state": "primary"},
    )
    deadline = time.monotonic() + 10
    while jwt.get_unverified_header(_token(server, server.key).json()["access_token"])["kid"] != new["kid"]:
        assert time.monotonic() < deadline, "the server did not take up the new primary key"
        time.sleep(0.2)
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {old_token}"}, timeout=30)
    assert models.status_code == 200, "a token signed by the retired key still verifies until its date"


def _secret_of(server: Server, kid: str) -> str:
    keys = json.loads(server.keyring.read_text())["keys"]
    return next(key["secret"] for key in keys if key["kid"] == kid)


def test_a_token_is_refused_once_its_key_is_revoked(server: Server) -> None:
    key = _key(server, "short-lived-token")
    token = _token(server, key).json()["access_token"]
    assert run_cli("keys", "revoke", "short-lived-token", "--keys-db", str(server.keys_db)).returncode == 0
    deadline = time.monotonic() + 15
    while (
        answer := httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {token}"})
    ).status_code == 200:
        assert time.monotonic() < deadline, "a token outlived its revoked key"
        time.sleep(0.5)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "revoked_api_key"


def test_requests_over_a_keys_limit_get_openais_429(server: Server) -> None:
    key = _key(server, "two-per-minute", "--rpm", "2", "--tpm", "100000")
    first = _complete(server, key)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    assert _complete(server, key).status_code == 200
    refused = _complete(server, key)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert _complete(server, server.key).status_code == 200, "another key is not limited by this one"
    assert server.metric("private_llm_quota_shared") == 1, "counted in the test Redis, not in the process"
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0).completions.create(
            model=MODEL, prompt="Hi", max_tokens=1
        )


def test_a_request_that_could_exceed_the_token_limit_is_refused_before_it_runs(server: Server) -> None:
    key = _key(server, "small-tpm", "--tpm", "50")
    refused = _complete(server, key, max_tokens=100)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert _complete(server, key, max_tokens=5).status_code == 200


def test_a_stream_the_client_leaves_frees_its_concurrency_slot(server: Server) -> None:
    key = _key(server, "one-at-a-time", "--max-concurrent", "1")
    # The stream is still going when the second request comes.
    body = {**COUNTING, "max_tokens": 400, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as stream:
        # Kept: a dropped line iterator closes the connection (httpcore), which is the client leaving.
        lines = stream.iter_lines()
        next(lines)
        assert _complete(server, key).status_code == 429, "the running stream holds the only slot"
    deadline = time.monotonic() + 30
    while (answer := _complete(server, key)).status_code == 429:
        assert time.monotonic() < deadline, "the slot was not freed after the client left"
        time.sleep(0.5)
    assert answer.status_code == 200


def test_an_expired_key_is_refused_with_its_own_code(server: Server) -> None:
    key = _key(server, "expires-soon", "--expires-in", "1s")
    time.sleep(1.5)
    refused = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "expired_api_key"


def test_the_ledger_holds_a_row_per_request_with_the_usage_clients_were_sent(server: Server) -> None:
    key = _key(server, "ledger")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    messages: list[dict[str, str]] = [{"role": "user", "content": "Name a colour."}]
    sent = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5).usage for _ in range(2)]  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    sent += [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(sent) == 3 and all(usage is not None for usage in sent)
    deadline = time.monotonic() + 15
    while True:
        totals = usage_rows(server.keys_db, "--tenant", "ledger-team", "--group-by", "tenant")
        if totals and totals[0]["requests"] == 3:
            break
        assert time.monotonic() < deadline, f"the ledger did not get three rows: {totals}"
        time.sleep(0.5)
    assert totals[0]["prompt_tokens"] == sum(usage.prompt_tokens for usage in sent if usage)
    assert totals[0]["completion_tokens"] == sum(usage.completion_tokens for usage in sent if usage)
    assert run_cli("usage", "verify", "--keys-db", str(server.keys_db)).returncode == 0


def test_the_key_id_and_tenant_are_logged_and_named_for_the_gateways_log(server: Server) -> None:
    key = _key(server, "log-named", "--tenant", "财务 team")
    response = _complete(server, key)
    assert response.status_code == 200
    key_id = key.removeprefix("sk-pli-").split("_", 1)[0]
    # Percent-encoded: a header holds ASCII only. nginx logs these and keeps them from the client.
    assert response.headers["x-pli-key-id"] == key_id
    assert response.headers["x-pli-tenant"] == "%E8%B4%A2%E5%8A%A1%20team"
    request_id = response.headers["X-Request-ID"]
    deadline = time.monotonic() + 10
    while not (lines := [line for line in server.log.read_text().splitlines() if request_id in line]):
        assert time.monotonic() < deadline, "no access log line for the request"
        time.sleep(0.2)
    logged = json.loads(lines[-1])
    assert (logged["message"], logged["key_id"], logged["tenant"]) == ("request", key_id, "财务 team")
    assert key not in server.log.read_text()
    refused = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-pli-unknown_x"})
    assert refused.status_code == 401 and "x-pli-key-id" not in refused.headers
