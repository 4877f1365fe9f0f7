"""Tenancy across both nodes: one quota in the state host's Redis, one key store and usage ledger in its
PostgreSQL, each verified against the internal CA; and the service going on while Redis is down."""

from __future__ import annotations

import base64
import json
import shlex
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
from stack import NODES, app_cli, ask, clients_asking, machine, metric, run_playbook, sql, status_on, wait_for

from app.archive import generate_master_key
from app.archive.keys import key_id

testinfra_hosts = ["ansible://pli-stack-gw"]

# The archive's master key in molecule.yml (the scenario's stand-in for the vault).
ARCHIVE_KEY = "9LeXF83X6dnUzPMMn4UJuSOVPgipfJte6FPtJj01rvo="
QUOTA_KEY = "sk-pli-stackquota_0123456789abcdefghijklmnopqrstuvw"  # rpm 6 (molecule.yml)
QUOTA_RPM = 6


def test_a_keys_limit_holds_across_both_nodes_and_every_request_is_in_the_ledger(client_for):
    """Three times the key's limit from three clients, spread by the gateway over both nodes: the nodes
    admit exactly the limit together, and the ledger holds one row per request from both nodes, the
    answered ones with the usage the clients were sent."""
    quota_client = client_for(QUOTA_KEY)
    model = quota_client.models.list().data[0].id

    def one(_: int) -> tuple[int, int]:
        try:
            answer = quota_client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=2, temperature=0
            )
        except openai.RateLimitError as refused:
            assert refused.body["code"] == "rate_limit_exceeded", refused.body
            return 429, 0
        assert answer.usage is not None
        return 200, answer.usage.total_tokens

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(one, range(3 * QUOTA_RPM)))
    statuses = [status for status, _ in results]
    assert statuses.count(200) == QUOTA_RPM, statuses
    assert statuses.count(429) == 2 * QUOTA_RPM, statuses

    # Rows are written in batches about once a second.
    wait_for(
        lambda: sql("SELECT count(*) FROM usage WHERE key_id = 'stackquota'") == str(3 * QUOTA_RPM),
        "a ledger row for every request",
    )
    by_node = sql("SELECT node, count(*) FROM usage WHERE key_id = 'stackquota' GROUP BY node ORDER BY node")
    assert [line.split("|")[0] for line in by_node.splitlines()] == sorted(NODES), by_node
    assert sql("SELECT count(*) FROM usage WHERE key_id = 'stackquota' AND status = 429") == str(2 * QUOTA_RPM)
    billed = sql(
        "SELECT sum(prompt_tokens + completion_tokens) FROM usage WHERE key_id = 'stackquota' AND status = 200"
    )
    assert int(billed) == sum(tokens for _, tokens in results)
    assert sql("SELECT DISTINCT tenant FROM usage WHERE key_id = 'stackquota'") == "quota-test"
    # Each node's chain is intact.
    report = machine("pli-stack-node1").run(app_cli("usage", "verify"))
    assert report.rc == 0, report.stdout + report.stderr


def test_a_key_revoked_on_one_node_is_refused_on_both():
    create = app_cli("keys", "create", "--name", "stack-leaver", "--tenant", "leaver")
    key = machine("pli-stack-node1").check_output(create)

    assert [status_on(address, key)[0] for address in NODES.values()] == ["200", "200"], "made on node1, known on both"
    machine("pli-stack-node2").check_output(app_cli("keys", "revoke", "stack-leaver"))
    # Key look-ups are cached for 5 s (KEY_CACHE_S): the revocation reaches both nodes after that.
    wait_for(
        lambda: all(status_on(address, key) == ("401", "revoked_api_key") for address in NODES.values()),
        "the revoked key refused by both nodes",
        timeout_s=30,
    )


def test_with_redis_stopped_the_nodes_go_on_alone_and_share_again_when_it_returns(client):
    gateway = machine("pli-stack-gw")
    gateway.check_output("systemctl stop redis-server")
    try:
        served_before = {node: metric(node, "vllm:request_success_total") for node in NODES}
        answers = [ask(client, "Say hi.", max_tokens=2) for _ in range(6)]
        assert len(answers) == 6  # every request answered (ask raises on any error)
        served = [node for node in NODES if metric(node, "vllm:request_success_total") > served_before[node]]
        assert served, "no node served"
        for node in served:
            assert metric(node, "private_llm_quota_shared") == 0, f"{node} did not notice Redis was gone"
            journal = machine(node).check_output("journalctl -u private-llm-app --no-pager -n 200")
            assert "Redis unreachable" in journal
    finally:
        gateway.check_output("systemctl start redis-server")

    def shared_again() -> bool:
        ask(client, "Say hi.", max_tokens=2)
        return all(metric(node, "private_llm_quota_shared") == 1 for node in NODES)

    # A node tries Redis again 5 s after a failure (RETRY_AFTER_FAILURE_S), on its next request.
    wait_for(shared_again, "both nodes counting in Redis again", timeout_s=120)


def both_or_none(records: list[dict]) -> list[dict] | None:
    return records if len(records) == 2 else None


def archived(request_ids: set[str], key_file: str) -> list[dict]:
    """The archive's records of these requests, exported on a node with the keys in `key_file`."""
    exported = machine("pli-stack-node1").check_output(
        app_cli("archive", "export", "--since", "2026-01-01", "--key-file", key_file, "--by", "stack-test")
    )
    return [record for line in exported.splitlines() if (record := json.loads(line))["request_id"] in request_ids]


def test_the_archive_master_key_rotates_under_load_and_an_export_spanning_it_needs_only_the_new_key(client):
    """playbooks/rotate-archive-keys.yml with a new key first in the vault while four clients ask: every
    request answered; both nodes then have every data key under the new primary, so an export of a record
    from before the rotation and one from after reads with the new key alone; PostgreSQL holds no text."""
    model = client.models.list().data[0].id
    marker = f"stack-archive-{uuid.uuid4().hex}"

    def asked(when: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"{marker} {when}"}], max_tokens=4
        )
        return raw.headers["x-request-id"]

    ids = {asked("before")}
    new_key = generate_master_key()
    with clients_asking(client) as (answered, errors):
        result = run_playbook(
            "playbooks/rotate-archive-keys.yml",
            "-e",
            json.dumps({"inference_app_archive_keys": [new_key, ARCHIVE_KEY]}),
        )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert errors == [], errors[:5]
    print(f"{len(answered)} requests answered during the archive key rotation, none failed")
    new_id = key_id(base64.urlsafe_b64decode(new_key))
    old_id = key_id(base64.urlsafe_b64decode(ARCHIVE_KEY))
    # Ansible's YAML output folds long messages: compare with the whitespace made single spaces.
    output = " ".join(result.stdout.split())
    for node in NODES:
        # Staging keeps the old primary; promoting moves each node to the new one.
        assert f"{node} (stage): put 2 master keys in place, primary {old_id} -> {old_id}," in output
        assert f"{node} (promote): put 2 master keys in place, primary {old_id} -> {new_id}, every" in output
    for node in NODES:
        assert metric(node, f'private_llm_archive_primary_key{{kid="{new_id}"}}') == 1
    ids.add(asked("after"))

    node = machine("pli-stack-node1")
    node.check_output(f"umask 077; printf '%s\\n' {shlex.quote(new_key)} > /tmp/new-only.keys")
    records = wait_for(lambda: both_or_none(archived(ids, "/tmp/new-only.keys")), "both records in the archive")
    assert sorted(message[1] for record in records for message in record["messages"]) == [
        f"{marker} after",
        f"{marker} before",
    ]
    assert marker not in machine("pli-stack-gw").check_output("runuser -u postgres -- pg_dump private_llm")
