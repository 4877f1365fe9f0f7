"""The encrypted conversation archive on real databases (a SQLite file, and PostgreSQL shared by two
writers): nothing readable in the raw bytes, an auditor's export through the command line (and recorded),
a record moved to another tenant refused, retention destroying whole days, a master key rotation."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from app.archive import Archive, ArchiveKeyError, Conversation, MasterKeys, generate_master_key, purge, read
from app.metrics import Metrics
from app.settings import Settings
from app.store import Database, open_database
from app.store.schema import archive_data_keys, archive_exports, archive_records
from tests.postgres_server import PostgresServer
from tests.tenancy.support import app_cli

MARKER = "archive-marker-7f3c"
DAY_MS = 86_400_000


def conversation(tenant: str, at_ms: int, request_id: str, text: str = MARKER) -> Conversation:
    return Conversation(
        request_id=request_id,
        at_ms=at_ms,
        node="node-1",
        tenant=tenant,
        key_id="key1",
        model="smollm2-135m-instruct",
        endpoint="/v1/chat/completions",
        finish_reason="stop",
        messages=(("system", "Be brief."), ("user", f"{text}: 机密 question")),
        answer=f"{text} answer",
    )


def key_file(path: Path, *keys: str) -> Path:
    path.write_text("".join(f"{key}\n" for key in keys), encoding="utf-8")
    return path


def written(archive: Archive) -> None:
    archive.close()
    assert archive.pending() == 0


def stored(database: Database) -> int:
    with database.connect() as db:
        return len(db.execute(select(archive_records.c.id)).all())


def now_ms() -> int:
    return int(time.time() * 1000)


def test_records_are_sealed_at_rest_and_an_export_decrypts_them_and_is_recorded(tmp_path: Path) -> None:
    db_path = tmp_path / "keys.db"
    database = open_database(db_path)
    keys = key_file(tmp_path / "archive.keys", generate_master_key())
    archive = Archive(database, MasterKeys.from_file(keys), retention_days=180, flush_interval_s=0.05)
    today = now_ms()
    archive.record(conversation("finance", today - DAY_MS, "req-1"))
    archive.record(conversation("finance", today, "req-2"))
    archive.record(conversation("health", today, "req-3"))
    written(archive)

    assert MARKER.encode() not in db_path.read_bytes()
    assert "机密".encode() not in db_path.read_bytes()
    with database.connect() as db:
        assert db.execute(select(archive_data_keys.c.day)).scalars().all() == sorted(
            {datetime.fromtimestamp(at / 1000, UTC).date().isoformat() for at in (today - DAY_MS, today)}
        )

    since = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()
    exported = app_cli(
        "archive", "export", "--tenant", "finance", "--since", since, "--by", "auditor-li",
        "--key-file", str(keys), "--keys-db", str(db_path),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [record["request_id"] for record in records] == ["req-1", "req-2"]
    assert records[0]["messages"] == [["system", "Be brief."], ["user", f"{MARKER}: 机密 question"]]
    assert records[0]["answer"] == f"{MARKER} answer" and records[0]["tenant"] == "finance"
    one = app_cli(
        "archive", "export", "--since", since, "--request-id", "req-3",
        "--key-file", str(keys), "--keys-db", str(db_path),
    )  # fmt: skip
    assert [json.loads(line)["tenant"] for line in one.stdout.splitlines()] == ["health"]
    with database.connect() as db:
        exports = db.execute(select(archive_exports).order_by(archive_exports.c.id)).mappings().all()
    first = exports[0]
    assert (first["exported_by"], first["tenant"], first["request_id"], first["records"]) == (
        "auditor-li",
        "finance",
        None,
        2,
    )
    assert (exports[1]["request_id"], exports[1]["records"]) == ("req-3", 1)


def test_records_written_after_a_restore_took_their_days_key_away_still_open(tmp_path: Path) -> None:
    """playbooks/restore.yml runs while the nodes serve: a node whose day's data key the restore took away (the
    key was made after the backup) makes a new one, rather than sealing records with a key nobody keeps."""
    database = open_database(tmp_path / "keys.db")
    master = MasterKeys.from_file(key_file(tmp_path / "archive.keys", generate_master_key()))
    archive = Archive(database, master, retention_days=180, flush_interval_s=0.05)
    archive.record(conversation("finance", now_ms(), "before-restore"))
    deadline = time.monotonic() + 30
    while not stored(database):
        assert time.monotonic() < deadline, "the writer never wrote"
        time.sleep(0.05)
    with database.engine.begin() as db:  # the backup was taken before the day's first record
        db.execute(archive_records.delete())
        db.execute(archive_data_keys.delete())
    archive.record(conversation("finance", now_ms(), "after-restore"))
    written(archive)
    since = datetime.now(UTC) - timedelta(days=1)
    opened = list(read(database, master, since, datetime.now(UTC) + timedelta(days=1)))
    assert [record["request_id"] for record in opened] == ["after-restore"]


def test_a_record_moved_to_another_tenant_does_not_open(tmp_path: Path) -> None:
    database = open_database(tmp_path / "keys.db")
    master = MasterKeys.from_file(key_file(tmp_path / "archive.keys", generate_master_key()))
    archive = Archive(database, master, retention_days=180, flush_interval_s=0.05)
    archive.record(conversation("finance", now_ms(), "req-1"))
    written(archive)
    with database.engine.begin() as db:
        db.execute(update(archive_records).values(tenant="health"))
    since = datetime.now(UTC) - timedelta(days=1)
    with pytest.raises(ArchiveKeyError, match="does not open"):
        list(read(database, master, since, datetime.now(UTC) + timedelta(days=1)))


def test_retention_destroys_the_data_keys_of_old_days_then_their_records(tmp_path: Path) -> None:
    database = open_database(tmp_path / "keys.db")
    master = MasterKeys.from_file(key_file(tmp_path / "archive.keys", generate_master_key()))
    # The app applies retention as it starts: these records are written by one that has started already.
    archive = Archive(database, master, retention_days=180, flush_interval_s=0.05)
    time.sleep(0.2)
    today = now_ms()
    archive.record(conversation("finance", today - 200 * DAY_MS, "old"))
    archive.record(conversation("finance", today - 179 * DAY_MS, "kept"))
    written(archive)
    assert purge(database, 180) == (1, 1)
    since, until = datetime.now(UTC) - timedelta(days=400), datetime.now(UTC) + timedelta(days=1)
    assert [record["request_id"] for record in read(database, master, since, until)] == ["kept"]
    with database.connect() as db:
        assert len(db.execute(select(archive_data_keys)).all()) == 1
    assert purge(database, 180) == (0, 0)


def test_a_new_master_key_rewraps_the_data_keys_and_an_export_spanning_it_decrypts(tmp_path: Path) -> None:
    db_path = tmp_path / "keys.db"
    database = open_database(db_path)
    old, new, newer = generate_master_key(), generate_master_key(), generate_master_key()
    archive = Archive(database, MasterKeys.from_file(key_file(tmp_path / "old.keys", old)), 180, 0.05)
    archive.record(conversation("finance", now_ms() - DAY_MS, "before"))
    written(archive)
    since = (datetime.now(UTC) - timedelta(days=3)).date().isoformat()
    export = ("archive", "export", "--since", since, "--keys-db", str(db_path), "--key-file")
    only_new = key_file(tmp_path / "new.keys", new)
    refused = app_cli(*export, str(only_new))
    assert refused.returncode == 1 and "no longer holds" in refused.stderr

    # By hand: the new key first, the old one kept for reading, then `archive rewrap`.
    both = key_file(tmp_path / "both.keys", new, old)
    rewrapped = app_cli("archive", "rewrap", "--key-file", str(both), "--keys-db", str(db_path))
    assert rewrapped.returncode == 0, rewrapped.stderr
    assert json.loads(rewrapped.stdout)["rewrapped"] == 1
    again = app_cli("archive", "rewrap", "--key-file", str(both), "--keys-db", str(db_path))
    assert json.loads(again.stdout)["rewrapped"] == 0
    assert [json.loads(line)["request_id"] for line in app_cli(*export, str(only_new)).stdout.splitlines()] == [
        "before"
    ]

    # As a deployment does it: the app given a new primary (at start or on reload) re-wraps by itself.
    metrics = Metrics()
    rotated = MasterKeys.from_file(key_file(tmp_path / "rotated.keys", newer, new))
    archive = Archive(database, MasterKeys.from_file(both), 180, 0.05, metrics)
    archive.use_keys(rotated)
    archive.record(conversation("finance", now_ms(), "after"))
    written(archive)
    assert metrics.registry.get_sample_value("private_llm_archive_primary_key", {"kid": rotated.primary_id}) == 1
    exported = app_cli(*export, str(key_file(tmp_path / "newer.keys", newer)))
    assert exported.returncode == 0, exported.stderr
    assert [json.loads(line)["request_id"] for line in exported.stdout.splitlines()] == ["before", "after"]


def test_two_nodes_writing_one_day_on_postgresql_share_its_data_key(postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.create_database("archive_nodes")
    master = MasterKeys.from_file(key_file(tmp_path / "archive.keys", generate_master_key()))
    nodes = [Archive(open_database(tmp_path / "unused.db", url), master, 180, 0.05) for _ in range(2)]
    for index, archive in enumerate(nodes):
        archive.record(conversation("finance", now_ms(), f"node-{index}"))
    for archive in nodes:
        written(archive)
    database = open_database(tmp_path / "unused.db", url)
    since, until = datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(days=1)
    assert sorted(record["request_id"] for record in read(database, master, since, until)) == ["node-0", "node-1"]
    with database.connect() as db:
        assert len(db.execute(select(archive_data_keys)).all()) == 1


def test_the_settings_need_a_readable_key_file_once_the_archive_is_on(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="archive_key_file: needed"):
        Settings(archive_enabled=True)
    bad = tmp_path / "archive.keys"
    bad.write_text(f"{generate_master_key()}\nnot-a-key\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"archive\.keys:2"):
        Settings(archive_tenants=["finance"], archive_key_file=bad)
    assert Settings(archive_enabled=True, archive_key_file=key_file(bad, generate_master_key())).archive_enabled
