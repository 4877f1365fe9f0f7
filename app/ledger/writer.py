"""Writing the ledger (app/store/queued.py: queued, in batches, kept on failure, all written on drain),
each row chained to its node's previous one."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from sqlalchemy import insert, select

from app.ledger.chain import row_hash
from app.store import Database
from app.store.queued import QueuedWriter
from app.store.schema import usage

log = logging.getLogger("app.ledger")

BATCH_ROWS = 500


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    at_ms: int
    node: str
    tenant: str
    key_id: str
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    status: int
    finish_reason: str | None
    ttft_ms: int | None
    latency_ms: int


class UsageLedger(QueuedWriter[UsageRecord]):
    batch_size = BATCH_ROWS
    what = "ledger"

    def __init__(self, database: Database, node: str, flush_interval_s: float = 1.0) -> None:
        super().__init__("usage-ledger", flush_interval_s, log)
        self._db = database
        self.node = node
        self.start()

    def write(self, batch: list[UsageRecord]) -> None:
        # The head is read in the transaction that appends, never kept between batches: after a restore from a
        # backup (playbooks/restore.yml, which runs while nodes serve) the node chains onto the restored rows.
        with self._db.engine.begin() as db:
            query = select(usage.c.row_hash).where(usage.c.node == self.node).order_by(usage.c.id.desc()).limit(1)
            head = db.execute(query).scalar_one_or_none() or ""
            rows = []
            for record in batch:
                fields = asdict(record)
                digest = row_hash(head, fields)
                rows.append({**fields, "prev_hash": head, "row_hash": digest})
                head = digest
            db.execute(insert(usage), rows)
        # The head in the journal: what `usage verify` can be compared with if rows are cut off the end.
        log.info("ledger flushed", extra={"fields": {"rows": len(batch), "node": self.node, "head": head}})
