"""Keys and the ledger on a real PostgreSQL that several nodes share (setting database_url)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.auth import KeyStore
from app.auth.keys import KEY_CACHE_S
from app.ledger import UsageLedger, UsageRecord
from app.store import open_database
from tests.postgres_server import PostgresServer
from tests.tenancy.support import Clock, app_cli


def test_nodes_starting_together_migrate_once_and_share_keys(postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.create_database("keys_nodes")
    # Three processes (as three nodes) open the empty database at once: each applies the migrations or
    # waits for the one that does.
    starting = [
        subprocess.Popen([sys.executable, "-m", "app", "keys", "list", "--database-url", url], stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    for process in starting:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode()
    clock = Clock()
    first = KeyStore(open_database(tmp_path / "unused.db", url), clock=clock)
    second = KeyStore(open_database(tmp_path / "unused.db", url), clock=clock)
    key = first.create("shared", "team")
    assert second.verify(key)[1] == "active"
    assert first.revoke("shared") == 1
    clock.now += KEY_CACHE_S
    assert second.verify(key)[1] == "revoked", "a key revoked on one node is refused on the others"
    assert not (tmp_path / "unused.db").exists(), "with a database_url no SQLite file is made"


def test_each_nodes_ledger_chain_verifies_and_exports_together(postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.create_database("ledger_nodes")
    for node in ("node-a", "node-b"):
        ledger = UsageLedger(open_database(tmp_path / "unused.db", url), node, flush_interval_s=0.05)
        for n in range(4):
            ledger.record(
                UsageRecord(
                    f"{node}-{n}",
                    1_796_083_200_000 + n,
                    node,
                    "team",
                    "k",
                    "m",
                    "/v1/completions",
                    3,
                    2,
                    200,
                    "stop",
                    5,
                    9,
                )
            )
        ledger.close()
    verified = app_cli("usage", "verify", "--database-url", url)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.splitlines()[0].startswith("node-a\t4 rows") and "node-b\t4 rows" in verified.stdout
    exported = app_cli(
        "usage", "export", "--since", "2026-12-01", "--until", "2026-12-02", "--group-by", "node", "--database-url", url
    )
    assert exported.stdout.splitlines()[1:] == ["node-a,4,12,8,20", "node-b,4,12,8,20"]
    edit = app_cli("keys", "list", "--database-url", url)
    assert edit.returncode == 0, edit.stderr


def test_a_database_url_that_is_not_postgresql_is_a_clear_error() -> None:
    wrong = app_cli("check-config", "--database-url", "mysql://x@y/z")
    assert wrong.returncode == 2
    assert "only postgresql:// is supported" in wrong.stderr
    assert "Traceback" not in wrong.stderr
