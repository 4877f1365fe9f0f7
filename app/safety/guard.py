"""The answer filter: text comes in as the engine makes it and goes out as soon as no blocked term can
still begin in it. Only the tail that the longest term needs is held back (a term split across two engine
chunks is still caught); text from a blocked term's first character on never goes out."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.safety.words import Match, WordFilter, fold


@dataclass
class AnswerGuard:
    words: WordFilter
    # The answer's text received and not released yet.
    _pending: str = ""
    # Normal form of the last released characters (as many as an allowed term covering a later match may
    # reach back), then of the pending text; and, for each pending normal-form character, where in _pending
    # the character it came from starts.
    _normal: list[str] = field(default_factory=list)
    _history: int = 0
    _origin: list[int] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, Match | None]:
        """The text that may go out now, and the blocked match that ends the answer (its text before the
        match is what goes out)."""
        return self._take(text, complete=False)

    def finish(self, text: str = "") -> tuple[str, Match | None]:
        """The answer's end: all that is left, unless it holds a blocked match."""
        return self._take(text, complete=True)

    def _take(self, text: str, complete: bool) -> tuple[str, Match | None]:
        offset = len(self._pending)
        self._pending += text
        for index, character in enumerate(text, start=offset):
            for folded in fold(character):
                self._normal.append(folded)
                self._origin.append(index)
        normal = "".join(self._normal)
        match, undecided = self.words.first_match(normal, since=self._history, complete=complete)
        if match is not None:
            released = self._pending[: self._origin[match.start - self._history]]
            self._pending = ""
            return released, match
        if complete:
            released, self._pending = self._pending, ""
            return released, None
        # A term of longest_term characters starting at `cut` or later may still be completed by more text.
        cut = max(self._history, len(normal) - max(0, self.words.longest_term - 1))
        if undecided is not None:
            cut = min(cut, undecided)
        held_from = cut - self._history
        # A character that folds into several (a ligature) is held or released whole.
        while 0 < held_from < len(self._origin) and self._origin[held_from - 1] == self._origin[held_from]:
            held_from -= 1
        cut = held_from + self._history
        if held_from >= len(self._origin):
            released, self._pending, self._origin = self._pending, "", []
        else:
            boundary = self._origin[held_from]
            released, self._pending = self._pending[:boundary], self._pending[boundary:]
            self._origin = [index - boundary for index in self._origin[held_from:]]
        # What is released stays in view only as far as an allowed term covering a later match reaches back.
        keep = max(0, self.words.longest_allowed - 1)
        self._normal = list(normal[max(0, cut - keep) : cut]) + list(normal[cut:])
        self._history = min(keep, cut)
        return released, None
