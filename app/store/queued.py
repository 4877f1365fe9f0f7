"""Writing to the database off the request path: requests hand their item to a queue and go on; a thread
writes the queue in batches about every interval. A failed write keeps its items for the next try, and
closing (on drain) writes everything still queued. The usage ledger and the conversation archive are two."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Generic, TypeVar

Item = TypeVar("Item")

_STOP = object()


class QueuedWriter(Generic[Item]):
    batch_size = 500
    # What is written, in the journal's words ("ledger").
    what = "queue"

    def __init__(self, name: str, interval_s: float, log: logging.Logger) -> None:
        self._interval = interval_s
        self._log = log
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending: list[Item] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def record(self, item: Item) -> None:
        """Called on the request path: never waits for the database."""
        self._queue.put(item)

    def pending(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write everything recorded so far, then stop."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._pending:
            self._log.error(f"{self.what} not written at exit", extra={"fields": {"count": len(self._pending)}})

    def write(self, batch: list[Item]) -> None:
        """Write one batch, or raise: the batch is then kept for the next flush."""
        raise NotImplementedError

    def after_flush(self) -> None:
        """The thread's other work, done after each flush (at least every interval)."""

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=self._interval)
                while True:
                    if item is _STOP:
                        stopping = True
                    else:
                        self._pending.append(item)  # type: ignore[arg-type]
                    if len(self._pending) >= self.batch_size:
                        break
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            self._flush(final=stopping)
            self.after_flush()

    def _flush(self, final: bool) -> None:
        while self._pending:
            batch = self._pending[: self.batch_size]
            try:
                self.write(batch)
            except Exception:
                # Kept for the next flush (never dropped); at exit there is no next one.
                fields = {"count": len(self._pending), "final": final}
                self._log.exception(f"{self.what} write failed", extra={"fields": fields})
                return
            del self._pending[: len(batch)]
