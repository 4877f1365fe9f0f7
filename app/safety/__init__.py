"""Content safety: the sensitive-word filter on prompts and answers (app/safety/words.py, guard.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from app.metrics import Metrics
from app.safety.guard import AnswerGuard
from app.safety.words import Match, WordFilter, WordListError, normalize, read_word_file

__all__ = ["AnswerGuard", "ContentFilter", "Match", "WordFilter", "WordListError", "normalize", "read_word_file"]

_log = logging.getLogger("app.safety")


class ContentFilter:
    """The word lists in force. `reload` (SIGHUP) reads the files again and swaps the compiled lists in one
    assignment: a request holds the lists it started with, none waits, and a list that no longer reads
    leaves the previous ones in force."""

    def __init__(self, blocked_files: Sequence[Path], allowed_files: Sequence[Path], metrics: Metrics) -> None:
        self._blocked_files = tuple(blocked_files)
        self._allowed_files = tuple(allowed_files)
        self._metrics = metrics
        self._reloading = threading.Lock()
        self.words = WordFilter.from_files(self._blocked_files, self._allowed_files)
        self._publish()

    def reload(self) -> bool:
        # The journal first, then the count: whoever waits for the count finds the line written.
        with self._reloading:
            try:
                words = WordFilter.from_files(self._blocked_files, self._allowed_files)
            except WordListError as exc:
                _log.error("word lists not reloaded, the previous ones stay in force: %s", exc)
                self._metrics.content_filter_reloads.labels(result="failed").inc()
                return False
            self.words = words
            self._publish()
            _log.info(
                "word lists reloaded",
                extra={"fields": {"blocked_terms": words.blocked_terms, "allowed_terms": words.allowed_terms}},
            )
            self._metrics.content_filter_reloads.labels(result="ok").inc()
            return True

    def blocked(self, direction: str, category: str) -> None:
        self._metrics.content_filter_blocks.labels(direction=direction, category=category).inc()

    def _publish(self) -> None:
        self._metrics.content_filter_terms.labels(list="blocked").set(self.words.blocked_terms)
        self._metrics.content_filter_terms.labels(list="allowed").set(self.words.allowed_terms)
