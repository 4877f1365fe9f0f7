"""The usage ledger on a real SQLite file: batched writes that lose nothing, hash chains that show an
edited or deleted row, and the billing export."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from app.ledger import UsageLedger, UsageRecord
from app.store import open_database

DAY_MS = 86_400_000
T0 = 1_796_083_200_000  # 2026-12-01T00:00:00Z


def _record(n: int, tenant: str = "team-a", at_ms: int = T0, prompt: int = 10, completion: int = 5) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{n}",
        at_ms=at_ms + n,
        node="node-1",
        tenant=tenant,
        key_id=f"key-{tenant}",
        model="m",
        endpoint="/v1/chat/completions",
        prompt_tokens=prompt,
        completion_tokens=completion,
        status=200,
        finish_reason="stop",
        ttft_ms=12,
        latency_ms=40,
    )


def _usage(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "usage", *args, "--keys-db", str(db)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _write(db: Path, records: list[UsageRecord], node: str = "node-1") -> None:
    ledger = UsageLedger(open_database(db), node, flush_interval_s=0.05)
    for record in records:
        ledger.record(record)
    ledger.close()


def test_every_recorded_row_is_written_by_close_and_the_chain_verifies(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    _write(db, [_record(n) for n in range(1200)])  # more than one batch
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 1200
    verified = _usage(db, "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("node-1\t1200 rows\thead ")


def test_a_restarted_node_continues_its_chain(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    _write(db, [_record(n) for n in range(3)])
    _write(db, [_record(n) for n in range(3, 6)])
    assert _usage(db, "verify").returncode == 0
    assert "6 rows" in _usage(db, "verify").stdout


def _rows(db: Path) -> int:
    with sqlite3.connect(db) as raw:
        return int(raw.execute("SELECT COUNT(*) FROM usage").fetchone()[0])


def test_a_running_node_chains_onto_the_rows_a_restore_left(tmp_path: Path) -> None:
    """playbooks/restore.yml runs while the nodes serve: a node whose newest rows the restore took away goes on
    from the restored head, so the chain still verifies before the node restarts."""
    db = tmp_path / "app.db"
    ledger = UsageLedger(open_database(db), "node-1", flush_interval_s=0.05)
    for n in range(5):
        ledger.record(_record(n))
    deadline = time.monotonic() + 30
    while _rows(db) < 5:
        assert time.monotonic() < deadline, "the writer never wrote"
        time.sleep(0.05)
    with sqlite3.connect(db) as raw:
        raw.execute("DELETE FROM usage WHERE id > 3")  # the backup was taken after the third row
    for n in range(5, 8):
        ledger.record(_record(n))
    ledger.close()
    verified = _usage(db, "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("node-1\t6 rows")


def test_an_edited_row_and_a_deleted_row_are_named(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    _write(db, [_record(n) for n in range(10)])
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE usage SET completion_tokens = 1 WHERE id = 4")
    edited = _usage(db, "verify")
    assert edited.returncode == 1
    assert "row 4 was edited" in edited.stderr
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE usage SET completion_tokens = 5 WHERE id = 4")
        raw.execute("DELETE FROM usage WHERE id = 7")
    deleted = _usage(db, "verify")
    assert deleted.returncode == 1
    assert "breaks before row 8" in deleted.stderr


def test_rows_are_kept_while_the_database_refuses_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "app.db"
    database = open_database(db)
    ledger = UsageLedger(database, "node-1", flush_interval_s=0.05)
    with database.engine.begin() as conn:
        conn.execute(text("ALTER TABLE usage RENAME TO usage_away"))
    for n in range(5):
        ledger.record(_record(n))
    deadline = time.monotonic() + 30
    while "ledger write failed" not in caplog.text:
        assert time.monotonic() < deadline, "the writer never tried"
        time.sleep(0.05)
    assert ledger.pending() == 5
    with database.engine.begin() as conn:
        conn.execute(text("ALTER TABLE usage_away RENAME TO usage"))
    ledger.close()
    assert ledger.pending() == 0
    assert _usage(db, "verify").stdout.startswith("node-1\t5 rows")


def test_the_export_sums_by_tenant_and_day_within_the_dates(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    records = [
        _record(1, "team-a", T0),
        _record(2, "team-a", T0, prompt=20, completion=7),
        _record(3, "team-b", T0),
        _record(4, "team-a", T0 + DAY_MS),
        _record(5, "team-a", T0 + 2 * DAY_MS),  # on --until: left out
    ]
    _write(db, records)
    exported = _usage(db, "export", "--since", "2026-12-01", "--until", "2026-12-03", "--group-by", "tenant,day")
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert rows == [
        {
            "tenant": "team-a",
            "day": "2026-12-01",
            "requests": "2",
            "prompt_tokens": "30",
            "completion_tokens": "12",
            "total_tokens": "42",
        },
        {
            "tenant": "team-a",
            "day": "2026-12-02",
            "requests": "1",
            "prompt_tokens": "10",
            "completion_tokens": "5",
            "total_tokens": "15",
        },
        {
            "tenant": "team-b",
            "day": "2026-12-01",
            "requests": "1",
            "prompt_tokens": "10",
            "completion_tokens": "5",
            "total_tokens": "15",
        },
    ]
    only_b = json.loads(
        _usage(
            db, "export", "--since", "2026-12-01", "--until", "2026-12-05", "--tenant", "team-b", "--format", "json"
        ).stdout
    )
    assert [row["request_id"] for row in only_b] == ["req-3"]
    assert set(only_b[0]) >= {"tenant", "key_id", "prompt_tokens", "completion_tokens", "status", "node", "at"}
    wrong = _usage(db, "export", "--since", "yesterday", "--until", "2026-12-03")
    assert wrong.returncode == 2 and "not a date" in wrong.stderr
