"""The ops playbooks that rotate credentials, each while clients ask through the gateway: a tenant's API key
(playbooks/rotate-api-keys.yml) and the signing key of the access tokens (playbooks/rotate-jwt-keys.yml).

Both leave their new key or key list on the controller for the vault; this scenario's vault (molecule.yml)
is not updated, so no play after these tests may deploy keys (the idempotence step runs before them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml
from stack import KEY, NODES, PORT, Failure, ask, clients_asking, machine, run_playbook, sql, status_on

testinfra_hosts = ["ansible://pli-stack-gw"]

ROTATING_KEY = "sk-pli-stackrotating_0123456789abcdefghijklmnopqrst"  # tenant rotation-test (molecule.yml)
SIGNING_KEY_ID = "stack-jwt-1"  # inference_app_jwt_keys in molecule.yml
# Long enough for most of the load to run on the old key while the play runs, short enough to wait for.
OVERLAP_S = 45


def folded(result) -> str:
    """Ansible's YAML output folds long messages: the whitespace made single spaces."""
    return " ".join(result.stdout.split())


def only_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(found[0].stat().st_mode) == 0o600
    return found[0]


def test_a_tenants_api_key_rotates_under_load_and_its_old_key_expires_on_both_nodes(client_for, tmp_path):
    """--check shows the rotation and changes nothing; the rotation itself, while four clients ask with the
    tenant's old key: no request fails that was refused before the overlap ended; only the new key's hash
    reaches the database, the key itself only the 0600 file; then the old key is refused on both nodes
    (expired_api_key) and the new one taken."""
    key_dir = tmp_path / "rotated"
    arguments = ["-e", "tenant=rotation-test", "-e", f"overlap={OVERLAP_S}s", "-e", f"key_dir={key_dir}"]
    checked = run_playbook("playbooks/rotate-api-keys.yml", "--check", "--diff", *arguments)
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
    assert not key_dir.exists()
    assert sql("SELECT count(*) FROM api_keys WHERE tenant = 'rotation-test'") == "1"
    for node in NODES:
        before = f"{node}: accepted 1 of 1 keys of tenant rotation-test before;"
        assert f"{before} would add rotation-test-" in folded(checked)

    with clients_asking(client_for(ROTATING_KEY)) as (answered, errors):
        result = run_playbook("playbooks/rotate-api-keys.yml", *arguments)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    written = yaml.safe_load(only_file(key_dir, "rotation-test-*.yml").read_text())
    [new] = written["add"]
    [expiring] = written["expire"]
    assert expiring["name"] == "stack-rotating"
    cutoff = datetime.fromisoformat(expiring["expires_at"].replace("Z", "+00:00")).timestamp()
    # A request refused because the old key had expired was refused after the cutoff; nothing else may fail.
    early = [failure for failure in errors if failure.code != "expired_api_key" or failure.at < cutoff]
    assert early == [], early[:5]
    print(f"{len(answered)} requests answered with the old key during its rotation, none failed before it expired")

    new_key = new["key"]
    assert new_key not in result.stdout + result.stderr, "the new key was printed"
    key_id = new_key.removeprefix("sk-pli-").split("_")[0]
    stored = sql("SELECT key_id, key_hash FROM api_keys WHERE tenant = 'rotation-test'").splitlines()
    assert f"{key_id}|{hashlib.sha256(new_key.encode()).hexdigest()}" in stored, stored
    assert new_key not in machine("pli-stack-gw").check_output("runuser -u postgres -- pg_dump private_llm")
    for node in NODES:
        assert (
            f"{node}: accepted 1 of 1 keys of tenant rotation-test before; accepts the new key {new['name']} "
            f"and keeps the older keys until {expiring['expires_at']}"
        ) in folded(result)
    assert ask(client_for(new_key), "Say hi.", max_tokens=2) is not None

    time.sleep(max(0.0, cutoff - time.time()) + 1)
    for address in NODES.values():
        assert status_on(address, ROTATING_KEY) == ("401", "expired_api_key")
        assert status_on(address, new_key) == ("200", "")


@pytest.fixture
def gateway_http(pebble_root) -> Iterator[httpx.Client]:
    context = ssl.create_default_context(cafile=pebble_root)
    context.check_hostname = False  # see conftest.py: the chain is verified, the name cannot match 127.0.0.1
    with httpx.Client(base_url=f"https://127.0.0.1:{PORT}", verify=context, timeout=60) as http:
        yield http


def signer(token: str) -> str:
    header = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]


def token_from(http: httpx.Client) -> str:
    answer = http.post("/v1/auth/token", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


@contextmanager
def new_tokens_checked(http: httpx.Client, limit: int = 200) -> Iterator[tuple[list[str], list[Failure]]]:
    """For as long as the block runs: a token from the gateway, then that token on each node in turn; the
    signers of the tokens used, and every failure."""
    signers: list[str] = []
    failures: list[Failure] = []
    done = threading.Event()

    def keep_checking() -> None:
        while not done.is_set() and len(signers) < limit:
            try:
                token = token_from(http)
                for address in NODES.values():
                    status, code = status_on(address, token)
                    if status != "200":
                        what = f"{address}: {status} for a token of {signer(token)}"
                        failures.append(Failure(time.time(), code, what))
                signers.append(signer(token))
            except Exception as exc:  # every failure counts, whatever its type
                failures.append(Failure(time.time(), None, repr(exc)))
            done.wait(0.5)

    thread = threading.Thread(target=keep_checking)
    thread.start()
    try:
        yield signers, failures
    finally:
        done.set()
        thread.join(120)


def test_the_token_signing_key_rotates_under_load_and_every_token_verifies_on_both_nodes(
    client_for, gateway_http, tmp_path
):
    """--check shows both steps and changes nothing; the rotation, while three clients ask with a token
    from before it and a fourth gets new tokens and uses each on both nodes: nothing fails (a token the first node
    to promote signs verifies on the other, which has the key staged); after it the gateway's tokens carry
    the new key, the token from before still verifies on both nodes, and the list for the vault keeps the
    old key as retired for the longest token lifetime."""
    keyring = "/srv/private-llm/app/jwt-keyring.yaml"
    before = {node: machine(node).check_output(f"sha256sum {keyring}") for node in NODES}
    key_dir = tmp_path / "rotated"
    checked = run_playbook("playbooks/rotate-jwt-keys.yml", "--check", "--diff", "-e", f"key_dir={key_dir}")
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
    assert {node: machine(node).check_output(f"sha256sum {keyring}") for node in NODES} == before
    assert not key_dir.exists()
    for node in NODES:
        assert f"{node} (stage): would install {SIGNING_KEY_ID} primary, jwt-" in folded(checked)

    token_before = token_from(gateway_http)
    assert signer(token_before) == SIGNING_KEY_ID
    # Three clients, not four: with the fifth they stay under the gateway's 10 requests a second (stack.py).
    with (
        clients_asking(client_for(token_before), count=3) as (answered, errors),
        new_tokens_checked(gateway_http) as (signers, failures),
    ):
        result = run_playbook("playbooks/rotate-jwt-keys.yml", "-e", f"key_dir={key_dir}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert errors == [], errors[:5]
    assert failures == [], failures[:5]
    written = only_file(key_dir, "jwt-*.yml")
    [new, old] = yaml.safe_load(written.read_text())["inference_app_jwt_keys"]
    assert (new["state"], old["kid"], old["state"]) == ("primary", SIGNING_KEY_ID, "retired")
    assert new["kid"] == written.stem
    assert new["secret"] not in result.stdout + result.stderr, "the new signing key was printed"
    # Past the longest lifetime of a token the old key signed (inference_app_jwt_max_ttl_s: 3600).
    assert datetime.fromisoformat(old["verify_until"].replace("Z", "+00:00")).timestamp() > time.time() + 3600
    print(
        f"{len(answered)} requests answered with a token from before and {len(signers)} new tokens checked on both "
        f"nodes during the signing key's rotation ({signers.count(new['kid'])} signed by the new key), none failed"
    )
    for node in NODES:
        assert f"{node} (stage): installed {SIGNING_KEY_ID} primary, {new['kid']} staged;" in folded(result)
        assert (
            f"{node} (promote): installed {new['kid']} primary, {SIGNING_KEY_ID} retired; it signed with "
            f"{SIGNING_KEY_ID} before and signs with {new['kid']} now"
        ) in folded(result)

    token_after = token_from(gateway_http)
    assert signer(token_after) == new["kid"]
    for address in NODES.values():
        assert status_on(address, token_before) == ("200", "")
        assert status_on(address, token_after) == ("200", "")
