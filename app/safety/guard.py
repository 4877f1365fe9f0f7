"""The answer filter: text comes in as the engine makes it and goes out as soon as no blocked term can
still begin in it. Only the tail that the longest term needs is held back (a term split across two engine
chunks is still caught); text from a blocked term's first character on never goes out."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.safety.words import FOLDED, Match, WordFilter


@dataclass
class AnswerGuard:
    words: WordFilter
    # The answer's text received and not released yet, and where in the whole answer it starts.
    _pending: str = ""
    _base: int = 0
    # Normal form of the last released characters (as many as an allowed term covering a later match may
    # reach back: _history of them), then of the pending text; for each pending normal-form character, the
    # position in the answer of the character it came from.
    _normal: str = ""
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
        position = self._base + len(self._pending)
        self._pending += text
        added = []
        origin = self._origin
        # The answer filter's hot loop (a call per engine chunk): a dictionary look-up per character.
        for index, character in enumerate(text, start=position):
            folded = FOLDED[ord(character)]
            if len(folded) == 1:
                added.append(folded)
                origin.append(index)
            elif folded:
                added.append(folded)
                origin.extend([index] * len(folded))
        normal = self._normal + "".join(added)
        match, undecided = self.words.first_match(normal, since=self._history, complete=complete)
        if match is not None:
            return self._release_to(self._origin[match.start - self._history]), match
        if complete:
            return self._release_to(self._base + len(self._pending)), None
        # A term of longest_term characters starting at `cut` or later may still be completed by more text.
        cut = max(self._history, len(normal) - max(0, self.words.longest_term - 1))
        if undecided is not None:
            cut = min(cut, undecided)
        held_from = cut - self._history
        # A character that folds into several (a ligature) is held or released whole.
        while 0 < held_from < len(origin) and origin[held_from - 1] == origin[held_from]:
            held_from -= 1
        cut = held_from + self._history
        released = self._release_to(origin[held_from] if held_from < len(origin) else position + len(text))
        self._origin = origin[held_from:]
        # What is released stays in view only as far as an allowed term covering a later match reaches back.
        keep = min(max(0, self.words.longest_allowed - 1), cut)
        self._normal = normal[cut - keep :]
        self._history = keep
        return released, None

    def _release_to(self, end: int) -> str:
        """The pending text before position `end` of the answer, which leaves the pending text."""
        released, self._pending = self._pending[: end - self._base], self._pending[end - self._base :]
        self._base = end
        return released
