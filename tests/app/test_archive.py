"""The conversation archive in the real server: what a client asked and was sent is in the archive,
sealed (the database file holds none of it), with the prompt's personal data redacted (pii_mode_prompt
redact_stored: the model saw it), and an auditor's export finds it by its X-Request-ID."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx

from tests.app.conftest import MODEL, Server, run_cli

PHONE = "13812345678"


def test_a_request_is_archived_sealed_and_exported_by_its_request_id(server: Server, archive_key_file: Path) -> None:
    marker = f"archive-{uuid.uuid4().hex}"
    question = f"{marker}: my phone is {PHONE}. Say hello."
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 12},
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=120,
    )
    assert response.status_code == 200
    request_id = response.headers["X-Request-ID"]
    choice = response.json()["choices"][0]

    export = ("archive", "export", "--since", "2026-01-01", "--request-id", request_id, "--by", "tests")
    deadline = time.monotonic() + 60
    while True:
        exported = run_cli(*export, "--key-file", str(archive_key_file), "--keys-db", str(server.keys_db))
        assert exported.returncode == 0, exported.stderr
        if exported.stdout.strip():
            break
        assert time.monotonic() < deadline, "the request did not reach the archive within 60 s"
        time.sleep(0.5)
    (record,) = [json.loads(line) for line in exported.stdout.splitlines()]
    assert record["messages"] == [["user", f"{marker}: my phone is [PHONE]. Say hello."]]
    assert (record["answer"], record["finish_reason"]) == (choice["message"]["content"], choice["finish_reason"])
    assert (record["endpoint"], record["model"], record["tenant"]) == ("/v1/chat/completions", MODEL, "tests")
    raw = server.keys_db.read_bytes()
    assert marker.encode() not in raw and PHONE.encode() not in raw
