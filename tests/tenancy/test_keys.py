"""The key store on a real SQLite file: migrations, tenants and limits, expiry, the deployment's sync."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from app.auth import DeployedKey, KeyLimits, KeyStore, generate_key, hash_key, key_id_of
from app.auth.keys import KEY_CACHE_S
from app.store import open_database
from app.store.database import alembic_config
from tests.tenancy.support import Clock, app_cli


def test_a_database_from_before_migrations_is_adopted_and_its_keys_keep_working(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    key = generate_key()
    # The schema the first releases created by hand, with one of their keys in it.
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL, "
            "created_at INTEGER NOT NULL, revoked_at INTEGER)"
        )
        old.execute("INSERT INTO api_keys VALUES (?, 'old', ?, 1, NULL)", (key_id_of(key), hash_key(key)))
    store = KeyStore(open_database(path))
    record, state = store.verify(key)
    assert state == "active"
    assert record is not None and record.tenant == "default" and record.limits == KeyLimits()
    database = open_database(path)  # again: a no-op, not a second migration
    head = ScriptDirectory.from_config(alembic_config(database)).get_current_head()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == head
    assert "last_used_at" in {column["name"] for column in inspect(database.engine).get_columns("api_keys")}


def test_a_new_database_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keys.db"
    open_database(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_tenant_limits_and_expiry_travel_with_the_key(tmp_path: Path) -> None:
    clock = Clock()
    store = KeyStore(open_database(tmp_path / "keys.db"), clock=clock)
    limits = KeyLimits(rpm=10, tpm=1000, max_concurrent=2, tokens_per_day=50_000)
    key = store.create("ci", "team-a", limits, expires_at=int(clock.now) + 60)
    record, state = store.verify(key)
    assert state == "active"
    assert record is not None and (record.tenant, record.limits) == ("team-a", limits)
    clock.now += 60 + KEY_CACHE_S
    assert store.verify(key)[1] == "expired"
    assert store.usable_count() == 0
    assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) == (None, None), "a wrong secret matches nothing"


def test_last_use_is_recorded_without_a_write_per_request(tmp_path: Path) -> None:
    clock = Clock()
    store = KeyStore(open_database(tmp_path / "keys.db"), clock=clock)
    key = store.create("ci", "t")
    store.verify(key)
    first = store.list()[0].last_used_at
    assert first == int(clock.now)
    clock.now += 30
    store.verify(key)
    assert store.list()[0].last_used_at == first, "written again within LAST_USED_RESOLUTION_S"
    clock.now += 31
    store.verify(key)
    assert store.list()[0].last_used_at == int(clock.now)


def _deployed(name: str, key: str, **limits: int) -> DeployedKey:
    return DeployedKey(name, key_id_of(key) or "", hash_key(key), tenant=f"{name}-tenant", limits=KeyLimits(**limits))


def test_sync_adds_updates_and_revokes_only_what_the_deployment_owns(tmp_path: Path) -> None:
    store = KeyStore(open_database(tmp_path / "keys.db"))
    operators = store.create("made-on-the-host", "ops")
    first, second = generate_key(), generate_key()
    changes = store.sync_deployed([_deployed("a", first, rpm=5), _deployed("b", second)])
    assert changes == {"added": ["a", "b"], "updated": [], "revoked": []}
    assert store.sync_deployed([_deployed("a", first, rpm=5), _deployed("b", second)]) == {
        "added": [],
        "updated": [],
        "revoked": [],
    }, "a second run with the same vault changes nothing"
    changes = store.sync_deployed([_deployed("a", first, rpm=7)])
    assert changes == {"added": [], "updated": ["a"], "revoked": ["b"]}
    assert store.verify(first)[0].limits.rpm == 7  # type: ignore[union-attr]
    assert store.verify(second)[1] == "revoked"
    assert store.verify(operators)[1] == "active", "keys made on the host are the operator's"


def test_sync_refuses_a_known_id_with_another_hash(tmp_path: Path) -> None:
    store = KeyStore(open_database(tmp_path / "keys.db"))
    key = generate_key()
    store.sync_deployed([_deployed("a", key)])
    forged = DeployedKey("a", key_id_of(key) or "", "0" * 64, tenant="a")
    with pytest.raises(ValueError, match="another hash"):
        store.sync_deployed([forged])


def test_keys_cli_sync_reads_json_and_reports_bad_entries_without_a_traceback(tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    key = generate_key()
    entry = {"name": "a", "tenant": "t", "key_id": key_id_of(key), "hash": hash_key(key), "tpm": 500}
    synced = app_cli("keys", "sync", "--keys-db", db, stdin=json.dumps([entry]))
    assert synced.returncode == 0, synced.stderr
    assert json.loads(synced.stdout)["added"] == ["a"]
    assert "a\tt\ttpm=500\t-\t-\tactive" in app_cli("keys", "list", "--keys-db", db).stdout
    bad = app_cli("keys", "sync", "--keys-db", db, stdin=json.dumps([{**entry, "hash": "not-hex"}]))
    assert bad.returncode == 2
    assert "64 lowercase hex digits" in bad.stderr
    assert "Traceback" not in bad.stderr
    wrong_limit = app_cli("keys", "sync", "--keys-db", db, stdin=json.dumps([{**entry, "rpm": 0}]))
    assert wrong_limit.returncode == 2 and "rpm" in wrong_limit.stderr


def test_keys_cli_create_takes_limits_and_a_lifetime(tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    created = app_cli(
        "keys",
        "create",
        "--name",
        "n",
        "--tenant",
        "t",
        "--max-concurrent",
        "3",
        "--expires-in",
        "1d12h",
        "--keys-db",
        db,
    )
    assert created.returncode == 0, created.stderr
    listing = app_cli("keys", "list", "--keys-db", db).stdout.splitlines()
    assert listing[0].split("\t") == ["id", "name", "tenant", "limits", "expires", "last used", "state"]
    fields = listing[1].split("\t")
    assert fields[1:4] == ["n", "t", "max_concurrent=3"]
    assert fields[4].endswith("Z") and fields[6] == "active"
    refused = app_cli("keys", "create", "--name", "n", "--tenant", "t", "--expires-in", "soon", "--keys-db", db)
    assert refused.returncode == 2 and "not a duration" in refused.stderr
