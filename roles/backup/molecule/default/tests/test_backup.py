"""The backup role on a state host: the daily timer's script writes only encrypted parts (the database dump,
the files, the LUKS header) with a manifest and keeps the newest; playbooks/backup.yml fetches them to the
controller and checks them; playbooks/restore.yml makes a dropped database again, restores it and the files,
and refuses a backup that fails its manifest."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

# This scenario's age identity (molecule.yml has its public key). A site keeps the identity off every host;
# here it goes onto the host only for a moment, to read a part back.
AGE_IDENTITY = "AGE-SECRET-KEY-1AQSMHEPGCHMRV35WHL2P0QHPP57YSWGKZS2DFS0SLZF2PT63Y6RS79H328"
SPOOL = "/var/backups/private-llm"
MARKER = "backup-probe-5b1e"


def psql(query: str, database: str = "private_llm") -> str:
    return f"runuser -u postgres -- psql -d {database} -tAc {shlex.quote(query)}"


def run_playbook(host, playbook: str, tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """One of the repository's playbooks against this scenario's host, made a state host."""
    repo = Path(__file__).resolve().parents[5]
    groups = tmp_path / "groups.yml"
    groups.write_text(json.dumps({"state": {"hosts": {host.backend.get_hostname(): {}}}}))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(repo / "roles"),
        "ANSIBLE_COLLECTIONS_PATH": str(repo / "collections"),
        "ANSIBLE_FORCE_COLOR": "false",
    }
    command = [str(Path(sys.executable).parent / "ansible-playbook"), str(repo / "playbooks" / playbook)]
    command += ["-i", os.environ["MOLECULE_INVENTORY_FILE"], "-i", str(groups), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


def decrypted(host, path: str, then: str) -> str:
    """A part read back on the host with the identity, piped into `then`."""
    host.check_output(f"install -m 0600 /dev/null /run/test-identity && echo {AGE_IDENTITY} > /run/test-identity")
    try:
        return host.check_output(f"age --decrypt --identity /run/test-identity {path} | {then}")
    finally:
        host.check_output("rm -f /run/test-identity")


@pytest.fixture(scope="module", autouse=True)
def probe_row(host):
    host.check_output(psql("CREATE TABLE IF NOT EXISTS backup_probe (v text); TRUNCATE backup_probe"))
    host.check_output(psql(f"INSERT INTO backup_probe VALUES ('{MARKER}')"))  # noqa: S608 (a constant)


def test_the_timer_runs_the_backup_daily(host):
    timer = host.service("private-llm-backup.timer")
    assert timer.is_enabled and timer.is_running
    assert "OnCalendar=*-*-* 02:30:00" in host.file("/etc/systemd/system/private-llm-backup.timer").content_string
    host.check_output("systemd-analyze verify --man=no /etc/systemd/system/private-llm-backup.service")
    script = host.file("/usr/local/sbin/private-llm-backup")
    assert (script.user, script.mode) == ("root", 0o750)
    assert host.file(SPOOL).mode == 0o700


def test_the_service_writes_only_encrypted_parts_and_a_manifest(host):
    host.check_output("systemctl start private-llm-backup.service")
    [name] = host.check_output(f"ls {SPOOL}").split()
    folder = f"{SPOOL}/{name}"
    parts = sorted(host.check_output(f"ls {folder}").split())
    assert parts == ["MANIFEST.sha256", "files.tar.gz.age", "luks-probe.header.age", "private_llm.dump.age"]
    for part in parts[1:]:
        content = host.file(f"{folder}/{part}")
        assert content.mode == 0o600
        assert content.content.startswith(b"age-encryption.org/v1"), part
        assert MARKER.encode() not in content.content, f"{part} holds the row unencrypted"
    host.check_output(f"cd {folder} && sha256sum --check --strict MANIFEST.sha256")
    is_luks = "cat > /run/header && cryptsetup isLuks /run/header && echo luks"
    header = decrypted(host, f"{folder}/luks-probe.header.age", is_luks)
    assert header == "luks"
    listed = decrypted(host, f"{folder}/files.tar.gz.age", "tar -tz").split()
    assert "etc/pli-probe/settings.conf" in listed and "etc/postgresql/15/main/postgresql.conf" in listed
    assert not [path for path in listed if path.startswith("etc/no-such-file")]
    dumped = decrypted(host, f"{folder}/private_llm.dump.age", "pg_restore --data-only --table backup_probe -f -")
    assert dumped.count(MARKER) == 1
    host.check_output(f"rm -rf {folder} /run/header")


def test_the_host_keeps_the_newest_backups_and_refuses_a_name_that_is_not_a_time(host):
    for name in ["20261201T023000Z", "20261202T023000Z", "20261203T023000Z", "20261204T023000Z"]:
        host.check_output(f"/usr/local/sbin/private-llm-backup {name}")
    assert host.check_output(f"ls {SPOOL}").split() == ["20261202T023000Z", "20261203T023000Z", "20261204T023000Z"]
    refused = host.run("/usr/local/sbin/private-llm-backup ../elsewhere")
    assert refused.rc == 2 and "is not a UTC time" in refused.stderr
    again = host.run("/usr/local/sbin/private-llm-backup 20261204T023000Z")
    assert again.rc == 1 and "exists already" in again.stderr
    host.check_output(f"rm -rf {SPOOL}/2026*")


def test_a_dropped_database_and_a_changed_file_come_back_from_the_controllers_backup(host, tmp_path):
    """--check fetches nothing; backup.yml fetches the host's part and checks it; the database dropped and a
    file changed; restore.yml -e files=true makes the database again (CONNECT still refused to PUBLIC), with
    its row, and puts the file back; no part copied for the restore stays on the host (the backup itself stays,
    as the newest of the host's own); a tampered part is refused."""
    backups = tmp_path / "backups"
    checked = run_playbook(host, "backup.yml", tmp_path, "--check", "-e", f"backup_dir={backups}")
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
    assert not backups.exists()
    backed_up = run_playbook(host, "backup.yml", tmp_path, "-e", f"backup_dir={backups}")
    assert backed_up.returncode == 0, backed_up.stdout[-4000:] + backed_up.stderr[-2000:]
    assert "backed up database private_llm, files, LUKS header probe, encrypted to 1 age recipient(s)" in " ".join(
        backed_up.stdout.split()
    )
    [backup] = list(backups.iterdir())
    part = backup / host.backend.get_hostname()
    assert sorted(path.name for path in part.iterdir()) == [
        "MANIFEST.sha256", "files.tar.gz.age", "luks-probe.header.age", "private_llm.dump.age",
    ]  # fmt: skip
    assert oct(backup.stat().st_mode & 0o777) == "0o700"

    host.check_output(psql("DROP DATABASE private_llm WITH (FORCE)", database="postgres"))
    host.check_output("echo 'probe = after' > /etc/pli-probe/settings.conf")
    identity = tmp_path / "identity.txt"
    identity.write_text(AGE_IDENTITY + "\n")
    arguments = ["-e", f"backup={backup}", "-e", f"identity={identity}", "-e", "files=true"]
    restored = run_playbook(host, "restore.yml", tmp_path, *arguments)
    assert restored.returncode == 0, restored.stdout[-4000:] + restored.stderr[-2000:]
    assert AGE_IDENTITY not in restored.stdout + restored.stderr
    assert host.check_output(psql("SELECT v FROM backup_probe")) == MARKER
    public = "SELECT has_database_privilege('public', 'private_llm', 'CONNECT')"
    assert host.check_output(psql(public, database="postgres")) == "f"
    assert host.file("/etc/pli-probe/settings.conf").content_string == "probe = before\n"
    assert host.check_output(f"ls -A {SPOOL}") == backup.name, "a restored part stayed on the host"

    dump = part / "private_llm.dump.age"
    dump.write_bytes(dump.read_bytes()[:-1] + b"x")
    refused = run_playbook(host, "restore.yml", tmp_path, *arguments)
    assert refused.returncode != 0
    assert "FAILED" in refused.stdout + refused.stderr and "MANIFEST" in refused.stdout + refused.stderr
