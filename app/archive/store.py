"""The encrypted conversation archive in the tenancy database: records are queued by requests and written
in batches by a thread (app/store/queued.py), each sealed with its day's data key. Reading (an auditor's
export), retention (a day's data key destroyed, then its rows) and re-wrapping under a new master key work
on the same tables, from the app or its command line."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from app.archive.keys import KEY_BYTES, MasterKeys, open_sealed, seal
from app.metrics import Metrics
from app.store import Database
from app.store.queued import QueuedWriter
from app.store.schema import archive_data_keys, archive_exports, archive_records

log = logging.getLogger("app.archive")

BATCH_RECORDS = 200


@dataclass(frozen=True)
class Conversation:
    """What one request said and was answered, and whose it was."""

    request_id: str
    at_ms: int
    node: str
    tenant: str
    key_id: str
    model: str
    endpoint: str
    finish_reason: str | None
    messages: tuple[tuple[str, str], ...]
    answer: str


def day_of(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, UTC).date().isoformat()


def _retention_cutoff(retention_days: int, today: date | None = None) -> str:
    """The first day still kept: days before it are past retention."""
    return ((today or datetime.now(UTC).date()) - timedelta(days=retention_days)).isoformat()


def _context(record: dict[str, Any]) -> bytes:
    # The columns a reader relies on are authenticated with the text: a row moved to another tenant or
    # request does not open.
    return "|".join(str(record[name]) for name in ("request_id", "tenant", "key_id", "at_ms", "day")).encode()


class DataKeys:
    """Each day's data key: made, wrapped and stored the first time a day is written, unwrapped once."""

    def __init__(self, database: Database, master: MasterKeys) -> None:
        self._db = database
        self.master = master
        self._known: dict[str, bytes] = {}

    def for_writing(self, day: str) -> bytes:
        # Read from the database, not memory: after a restore from a backup (playbooks/restore.yml, while nodes
        # serve) a day's key this node made since may be gone, and records sealed with it could never open.
        key = self._read(day)
        if key is None:
            kid, wrapped = self.master.wrap(os.urandom(KEY_BYTES), day)
            try:
                with self._db.engine.begin() as db:
                    db.execute(
                        insert(archive_data_keys).values(
                            day=day, master_kid=kid, wrapped_key=wrapped, created_at_ms=int(time.time() * 1000)
                        )
                    )
            except IntegrityError:
                pass  # another node made the day's key first: use that one
            key = self._read(day)
            assert key is not None
        self._known[day] = key
        return key

    def forget_before(self, retention_days: int) -> None:
        cutoff = _retention_cutoff(retention_days)
        for day in [day for day in self._known if day < cutoff]:
            del self._known[day]

    def for_reading(self, day: str) -> bytes | None:
        """The day's data key, or None once retention destroyed it."""
        if day not in self._known:
            key = self._read(day)
            if key is None:
                return None
            self._known[day] = key
        return self._known[day]

    def _read(self, day: str) -> bytes | None:
        with self._db.connect() as db:
            row = db.execute(select(archive_data_keys).where(archive_data_keys.c.day == day)).mappings().first()
        if row is None:
            return None
        return self.master.unwrap(row["master_kid"], row["wrapped_key"], day)


# How often a running app applies retention (and once as it starts): a day's data key goes within the
# hour after the day passes retention.
PURGE_INTERVAL_S = 3600.0


class Archive(QueuedWriter[Conversation]):
    """The app's archive writer (app/store/queued.py). Its thread also keeps the archive in order: retention
    as it starts and hourly, and, whenever it gets master keys (at start, on reload), every data key
    re-wrapped under the primary, so that a rotation needs no command run by hand."""

    batch_size = BATCH_RECORDS
    what = "archive"

    def __init__(
        self,
        database: Database,
        master: MasterKeys,
        retention_days: int,
        flush_interval_s: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__("archive", flush_interval_s, log)
        self._db = database
        self._keys = DataKeys(database, master)
        self._metrics = metrics
        self._retention_days = retention_days
        self._purged_at = 0.0
        self._rewrap_due = True
        self.start()

    def use_keys(self, master: MasterKeys) -> None:
        """New master keys (a reload): new days are wrapped by their primary, and the background re-wraps
        the older ones. Data keys already read stay in memory: they are the same keys."""
        self._keys.master = master
        self._rewrap_due = True

    def write(self, batch: list[Conversation]) -> None:
        days = {day_of(conversation.at_ms) for conversation in batch}
        keys = {day: self._keys.for_writing(day) for day in days}
        rows = [self._sealed(conversation, keys) for conversation in batch]
        with self._db.engine.begin() as db:
            db.execute(insert(archive_records), rows)

    def after_flush(self) -> None:
        if time.monotonic() - self._purged_at >= PURGE_INTERVAL_S or not self._purged_at:
            self._purge()
        if self._rewrap_due:
            self._rewrap()

    def _rewrap(self) -> None:
        master = self._keys.master
        self._rewrap_due = False
        try:
            moved, _ = rewrap(self._db, master)
        except Exception:
            # Another node may be on keys this one lacks yet: tried again after the next flush.
            self._rewrap_due = True
            log.exception("archive data keys not re-wrapped yet")
            return
        if moved:
            fields = {"data_keys": moved, "primary": master.primary_id}
            log.info("archive data keys re-wrapped", extra={"fields": fields})
        if self._metrics is not None and self._keys.master is master:
            self._metrics.archive_primary_key.clear()
            self._metrics.archive_primary_key.labels(kid=master.primary_id).set(1)

    def _purge(self) -> None:
        self._purged_at = time.monotonic()
        try:
            days, records = purge(self._db, self._retention_days)
        except Exception:
            log.exception("archive retention failed; it is tried again in an hour")
            return
        self._keys.forget_before(self._retention_days)
        if days or records:
            fields = {"days_destroyed": days, "records_deleted": records}
            log.info("archive retention applied", extra={"fields": fields})

    def _sealed(self, conversation: Conversation, keys: dict[str, bytes]) -> dict[str, Any]:
        fields = asdict(conversation)
        text = json.dumps({"messages": fields.pop("messages"), "answer": fields.pop("answer")}, ensure_ascii=False)
        row = {**fields, "day": day_of(conversation.at_ms)}
        # surrogatepass: a lone surrogate a client sent must not make the batch fail at every try.
        row["sealed"] = seal(keys[row["day"]], text.encode("utf-8", "surrogatepass"), _context(row))
        return row


def read(
    database: Database,
    master: MasterKeys,
    since: datetime,
    until: datetime,
    tenant: str | None = None,
    request_id: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The records in [since, until), decrypted, oldest first; days whose key retention destroyed are gone."""
    keys = DataKeys(database, master)
    query = (
        select(archive_records)
        .where(archive_records.c.at_ms >= int(since.timestamp() * 1000))
        .where(archive_records.c.at_ms < int(until.timestamp() * 1000))
        .order_by(archive_records.c.at_ms, archive_records.c.id)
    )
    if tenant is not None:
        query = query.where(archive_records.c.tenant == tenant)
    if request_id is not None:
        query = query.where(archive_records.c.request_id == request_id)
    with database.connect() as db:
        rows = list(db.execute(query).mappings())
    for row in rows:
        key = keys.for_reading(row["day"])
        if key is None:
            continue
        record = {name: value for name, value in row.items() if name not in ("id", "sealed")}
        record.update(json.loads(open_sealed(key, row["sealed"], _context(record)).decode("utf-8", "surrogatepass")))
        yield record


def record_export(
    database: Database,
    by: str,
    tenant: str | None,
    since: datetime,
    until: datetime,
    request_id: str | None,
    count: int,
) -> None:
    """Every export is itself on record: who, when, what, how many."""
    with database.engine.begin() as db:
        db.execute(
            insert(archive_exports).values(
                at_ms=int(time.time() * 1000),
                exported_by=by,
                tenant=tenant,
                since_ms=int(since.timestamp() * 1000),
                until_ms=int(until.timestamp() * 1000),
                request_id=request_id,
                records=count,
            )
        )


def purge(database: Database, retention_days: int, today: date | None = None) -> tuple[int, int]:
    """Destroy the data keys of the days past retention, then delete their records: (days, records)."""
    cutoff = _retention_cutoff(retention_days, today)
    with database.engine.begin() as db:
        days = db.execute(delete(archive_data_keys).where(archive_data_keys.c.day < cutoff)).rowcount
        records = db.execute(delete(archive_records).where(archive_records.c.day < cutoff)).rowcount
    return days, records


def rewrap(database: Database, master: MasterKeys) -> tuple[int, int]:
    """Wrap every data key with the primary master key (a rotation): (re-wrapped, already under it)."""
    with database.connect() as db:
        rows = list(db.execute(select(archive_data_keys)).mappings())
    moved = 0
    for row in rows:
        if row["master_kid"] == master.primary_id:
            continue
        data_key = master.unwrap(row["master_kid"], row["wrapped_key"], row["day"])
        kid, wrapped = master.wrap(data_key, row["day"])
        with database.engine.begin() as db:
            db.execute(
                update(archive_data_keys)
                .where(archive_data_keys.c.day == row["day"])
                .where(archive_data_keys.c.master_kid == row["master_kid"])
                .values(master_kid=kid, wrapped_key=wrapped)
            )
        moved += 1
    return moved, len(rows) - moved
