"""playbooks/backup.yml while clients ask through the gateway, then the database destroyed and brought back
by playbooks/restore.yml: keys made before the backup authenticate again on both nodes, one made after it
does not, the ledger holds every row it had when the backup began and its chains verify.

First in the verify (the file's name): the restore takes the database back to the backup, so it runs
before the tests that count what the database holds.
"""

from __future__ import annotations

import shlex
import stat
import subprocess

from stack import NODES, ask, clients_asking, machine, run_playbook, status_on

testinfra_hosts = ["ansible://pli-stack-gw"]

# The identity of postgresql_backup_age_recipients in molecule.yml.
IDENTITY = "AGE-SECRET-KEY-1AQSMHEPGCHMRV35WHL2P0QHPP57YSWGKZS2DFS0SLZF2PT63Y6RS79H328"
DATABASE_URL = (
    "postgresql://pli_app:stack-postgresql-password-0123456789@172.29.88.10:5432/private_llm"
    "?sslmode=verify-full&sslrootcert=/etc/private-llm/pki/ca.pem"
)
DROP_EVERY_TABLE = (
    "DO $$ DECLARE t text; BEGIN FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
    "LOOP EXECUTE format('DROP TABLE %I CASCADE', t); END LOOP; END $$"
)


def sql(query: str) -> str:
    return machine("pli-stack-gw").check_output(f"runuser -u postgres -- psql -d private_llm -tAc {shlex.quote(query)}")


def app_cli(*args: str) -> str:
    python = "/opt/private-llm/current/venv/bin/python"
    words = [python, "-m", "app", *args, "--keys-db", "/srv/private-llm/app/keys.db"]
    return f"PLI_DATABASE_URL={shlex.quote(DATABASE_URL)} " + " ".join(shlex.quote(word) for word in words)


def test_a_backup_under_load_brings_back_a_destroyed_database_with_its_keys_and_ledger(client, tmp_path):
    node = machine("pli-stack-node1")
    kept_key = node.check_output(app_cli("keys", "create", "--name", "stack-backed-up", "--tenant", "backup-test"))
    ask(client, "Say hi.", max_tokens=2)
    rows_before = set(sql("SELECT request_id FROM usage").split())
    assert rows_before

    backups = tmp_path / "backups"
    with clients_asking(client) as (answered, errors):
        result = run_playbook("playbooks/backup.yml", "-e", f"backup_dir={backups}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert errors == [], errors[:5]
    print(f"{len(answered)} requests answered during the backup, none failed")
    [backup] = list(backups.iterdir())
    assert stat.S_IMODE(backup.stat().st_mode) == stat.S_IMODE(backups.stat().st_mode) == 0o700
    dump = backup / "pli-stack-gw" / "private_llm.dump.age"
    assert dump.read_bytes().startswith(b"age-encryption.org/v1"), "the dump left the host unencrypted"
    assert b"backup-test" not in dump.read_bytes()
    assert (backup / "MANIFEST.sha256").read_text().split() == [
        subprocess.run(["sha256sum", str(dump)], capture_output=True, text=True, check=True).stdout.split()[0],
        "pli-stack-gw/private_llm.dump.age",
    ]
    assert machine("pli-stack-gw").run("ls /var/backups/private-llm").stdout.split() == [], "a dump stayed on the host"
    later_key = node.check_output(app_cli("keys", "create", "--name", "stack-after-backup", "--tenant", "backup-test"))

    sql(DROP_EVERY_TABLE)
    assert sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == "0"
    identity = tmp_path / "identity.txt"
    identity.write_text(IDENTITY + "\n")
    identity.chmod(0o600)
    restored = run_playbook("playbooks/restore.yml", "-e", f"backup={backup}", "-e", f"identity={identity}")
    assert restored.returncode == 0, restored.stdout[-4000:] + restored.stderr[-2000:]
    assert IDENTITY not in restored.stdout + restored.stderr
    assert f"pli-stack-gw: restored private_llm from {backup}" in " ".join(restored.stdout.split())

    assert rows_before <= set(sql("SELECT request_id FROM usage").split()), "ledger rows from before the backup lost"
    for address in NODES.values():
        assert status_on(address, kept_key) == ("200", "")
        assert status_on(address, later_key) == ("401", "invalid_api_key")
    assert ask(client, "Say hi.", max_tokens=2) is not None
    report = node.run(app_cli("usage", "verify"))
    assert report.rc == 0, report.stdout + report.stderr
