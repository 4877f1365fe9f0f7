"""Writing the ledger: requests hand their row to a queue and go on; a thread writes the queue in
batches, chaining each row to its node's previous one. A failed write keeps the rows for the next try,
and closing (on drain) writes everything still queued."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import asdict, dataclass

from sqlalchemy import insert, select

from app.ledger.chain import row_hash
from app.store import Database
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


_STOP = object()


class UsageLedger:
    def __init__(self, database: Database, node: str, flush_interval_s: float = 1.0) -> None:
        self._db = database
        self.node = node
        self._interval = flush_interval_s
        self._queue: queue.SimpleQueue[UsageRecord | object] = queue.SimpleQueue()
        self._pending: list[UsageRecord] = []
        self._head = self._read_head()
        self._thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
        self._thread.start()

    def record(self, row: UsageRecord) -> None:
        """Called on the request path: never waits for the database."""
        self._queue.put(row)

    def pending(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write everything recorded so far, then stop (the drain on SIGTERM ends here)."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._pending:
            log.error("ledger rows not written at exit", extra={"fields": {"rows": len(self._pending)}})

    def _read_head(self) -> str:
        with self._db.connect() as db:
            query = select(usage.c.row_hash).where(usage.c.node == self.node).order_by(usage.c.id.desc()).limit(1)
            return db.execute(query).scalar_one_or_none() or ""

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=self._interval)
                while True:
                    if item is _STOP:
                        stopping = True
                    elif isinstance(item, UsageRecord):
                        self._pending.append(item)
                    if len(self._pending) >= BATCH_ROWS:
                        break
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            self._flush(final=stopping)

    def _flush(self, final: bool) -> None:
        while self._pending:
            batch = self._pending[:BATCH_ROWS]
            head = self._head
            rows = []
            for record in batch:
                fields = asdict(record)
                digest = row_hash(head, fields)
                rows.append({**fields, "prev_hash": head, "row_hash": digest})
                head = digest
            try:
                with self._db.engine.begin() as db:
                    db.execute(insert(usage), rows)
            except Exception:
                # Kept for the next flush (rows are never dropped); at exit there is no next one.
                log.exception("ledger write failed", extra={"fields": {"rows": len(self._pending), "final": final}})
                return
            del self._pending[: len(batch)]
            self._head = head
            # The head in the journal: what `usage verify` can be compared with if rows are cut off the end.
            log.info("ledger flushed", extra={"fields": {"rows": len(batch), "node": self.node, "head": head}})
