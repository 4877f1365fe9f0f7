"""playbooks/backup.yml while clients ask through the gateway (none may fail), then the drill it is for: the
database destroyed and the gateway's ACME account deleted, playbooks/restore.yml puts both back, and the keys
issued before authenticate on both nodes, the ledger holds every row it had at the backup (`usage verify`
passes), and the nodes go on chaining onto the restored rows.

The restore itself runs with no load: with the database destroyed no request can be served, which is what a
restore is for. The ledger's chain going on from restored rows while nodes serve is proven in
tests/tenancy/test_ledger.py."""

from __future__ import annotations

import shlex

from stack import KEY, NODES, app_cli, ask, clients_asking, machine, run_playbook, sql, status_on, wait_for

testinfra_hosts = ["ansible://pli-stack-gw"]

# The scenario's age identity (molecule.yml has its public key in backup_age_recipients).
AGE_IDENTITY = "AGE-SECRET-KEY-1AQSMHEPGCHMRV35WHL2P0QHPP57YSWGKZS2DFS0SLZF2PT63Y6RS79H328"
ACME_ACCOUNT = "/etc/letsencrypt/accounts"
LEDGER = "SELECT id, node, request_id, row_hash FROM usage ORDER BY id"


def listing(host, folder: str) -> str:
    """Every file under the folder with its checksum, owner and mode."""
    return host.check_output(
        f"cd {folder} && find . -type f -printf '%p %u %m\\n' | sort"
        " && find . -type f -print0 | sort -z | xargs -0 sha256sum"
    )


def decrypted_names(host, part: str) -> list[str]:
    """The names in a host's files part, read back on the host with the identity (there only for this)."""
    host.check_output(f"install -m 0600 /dev/null /run/test-identity && echo {AGE_IDENTITY} > /run/test-identity")
    try:
        return host.check_output(f"age --decrypt --identity /run/test-identity {shlex.quote(part)} | tar -tz").split()
    finally:
        host.check_output("rm -f /run/test-identity")


def test_a_backup_under_load_then_a_destroyed_database_and_acme_account_come_back(client, tmp_path):
    backups = tmp_path / "backups"
    checked = run_playbook("playbooks/backup.yml", "--check", "-e", f"backup_dir={backups}")
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
    assert not backups.exists()

    ask(client, "Say hi.", max_tokens=2)  # at least one row in the ledger before the backup
    ledger_before = set(sql(LEDGER).splitlines())
    with clients_asking(client) as (answered, errors):
        result = run_playbook("playbooks/backup.yml", "-e", f"backup_dir={backups}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert errors == [], errors[:5]
    print(f"{len(answered)} requests answered during the backup, none failed")

    [backup] = list(backups.iterdir())
    parts = {host.name: sorted(path.name for path in host.iterdir()) for host in backup.iterdir()}
    node_parts = ["MANIFEST.sha256", "files.tar.gz.age", "luks-data.header.age"]
    assert parts == {
        "pli-stack-gw": ["MANIFEST.sha256", "files.tar.gz.age", "private_llm.dump.age"],
        **{node: node_parts for node in NODES},
    }
    for host, names in parts.items():
        for name in names[1:]:
            assert (backup / host / name).read_bytes().startswith(b"age-encryption.org/v1"), f"{host}/{name}"
    gateway = machine("pli-stack-gw")
    on_host = f"/var/backups/private-llm/{backup.name}/files.tar.gz.age"
    names = decrypted_names(gateway, on_host)
    assert "etc/letsencrypt/renewal/gateway.pli.test.conf" in names
    assert [name for name in names if name.startswith(f"{ACME_ACCOUNT[1:]}/") and name.endswith("private_key.json")]
    assert "etc/nginx/nginx.conf" in names and "etc/nftables.conf" in names
    assert "opt/private-llm/current/app.yaml" in decrypted_names(
        machine("pli-stack-node1"), f"/var/backups/private-llm/{backup.name}/files.tar.gz.age"
    )

    ledger_after_backup = set(sql(LEDGER).splitlines())
    account = listing(gateway, ACME_ACCOUNT)
    gateway.check_output("runuser -u postgres -- psql -tAc 'DROP DATABASE private_llm WITH (FORCE)'")
    gateway.check_output(f"rm -rf {ACME_ACCOUNT}")
    assert gateway.run("runuser -u postgres -- psql -d private_llm -c 'SELECT 1'").rc != 0

    identity = tmp_path / "identity.txt"
    identity.write_text(AGE_IDENTITY + "\n")
    arguments = ["-e", f"backup={backup}", "-e", f"identity={identity}", "-e", "files=true"]
    restored = run_playbook("playbooks/restore.yml", *arguments)
    assert restored.returncode == 0, restored.stdout[-4000:] + restored.stderr[-2000:]
    assert AGE_IDENTITY not in restored.stdout + restored.stderr
    assert f"pli-stack-gw: restored database private_llm, files from {backup}" in " ".join(restored.stdout.split())

    assert listing(gateway, ACME_ACCOUNT) == account
    # Every row from before the backup began, and only rows as they were when it ended (the load's rows
    # written after its snapshot are gone, as the restore says).
    restored_ledger = set(sql(LEDGER).splitlines())
    assert ledger_before <= restored_ledger, sorted(ledger_before - restored_ledger)[:5]
    assert restored_ledger <= ledger_after_backup, sorted(restored_ledger - ledger_after_backup)[:5]
    for address in NODES.values():
        assert status_on(address, KEY) == ("200", "")
    verified = machine("pli-stack-node1").run(app_cli("usage", "verify"))
    assert verified.rc == 0, verified.stdout + verified.stderr

    # The nodes chain onto the restored rows: new requests, and the chain still verifies.
    for _ in range(4):
        assert ask(client, "Say hi.", max_tokens=2) is not None
    wait_for(lambda: int(sql("SELECT count(*) FROM usage")) >= len(restored_ledger) + 4, "the new rows in the ledger")
    verified = machine("pli-stack-node1").run(app_cli("usage", "verify"))
    assert verified.rc == 0, verified.stdout + verified.stderr
    print(f"restored {len(restored_ledger)} ledger rows ({len(ledger_before)} from before the backup began)")
