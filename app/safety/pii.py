"""Personal data in text: mainland China mobile numbers, resident ID numbers, bank card numbers and e-mail
addresses. A number counts only when its own check passes (an ID number's GB 11643 check digit and birth
date, a card's Luhn digit, python-stdnum's checks): an order number of 18 digits is not an ID and stays.

PiiGuard does for an answer what AnswerGuard does for sensitive words: it releases text as it comes, holding
back only a trailing run of characters that could still grow into a number or an address."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from stdnum import luhn
from stdnum.cn import ric

PiiKind = Literal["phone", "id", "card", "email"]
PLACEHOLDERS: dict[PiiKind, str] = {"phone": "[PHONE]", "id": "[ID]", "card": "[CARD]", "email": "[EMAIL]"}

# Digits may come in groups split by one space or dash ("138 1234 5678", "6222-0202-..."), as people write.
# Not after a digit, nor after a decimal point (1.13812345678 is a number, not a phone).
_MOBILE = re.compile(r"(?<![\d+])(?<!\d\.)(?:\+86[ -]?|0086[ -]?)?1[3-9]\d(?:[ -]?\d){8}(?!\d)")
_ID = re.compile(r"(?<![\dA-Za-z])\d{6}(?:19|20)\d{2}[01]\d[0-3]\d\d{3}[\dXx](?![\dA-Za-z])")
_CARD = re.compile(r"(?<![\d-])(?<!\d\.)\d(?:[ -]?\d){12,18}(?![\d-])")
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}(?![\w-])")
# A trailing run that may still become one of the above: digits with their separators, or an address.
_OPEN_NUMBER = re.compile(r"[+\d][\d \-Xx]*$")
_OPEN_ADDRESS = re.compile(r"[A-Za-z0-9._%+\-]+@?[A-Za-z0-9.\-]*$")
# Longer runs are no number or address a detector would take: release them rather than hold them for ever.
_LONGEST_OPEN = 320


@dataclass(frozen=True)
class Found:
    kind: PiiKind
    start: int
    end: int


def _digits(text: str) -> str:
    return re.sub(r"[ -]", "", text)


def find_pii(text: str) -> list[Found]:
    """Every piece of personal data in `text`, in order, none overlapping (ID numbers first: an ID of
    valid digits is no card even when its Luhn digit happens to fit)."""
    found: list[Found] = []

    def free(start: int, end: int) -> bool:
        return all(end <= f.start or f.end <= start for f in found)

    for match in _ID.finditer(text):
        if ric.is_valid(match.group()):
            found.append(Found("id", match.start(), match.end()))
    for match in _MOBILE.finditer(text):
        if free(match.start(), match.end()):
            found.append(Found("phone", match.start(), match.end()))
    for match in _CARD.finditer(text):
        if free(match.start(), match.end()) and luhn.is_valid(_digits(match.group())):
            found.append(Found("card", match.start(), match.end()))
    for match in _EMAIL.finditer(text):
        if free(match.start(), match.end()):
            found.append(Found("email", match.start(), match.end()))
    return sorted(found, key=lambda f: f.start)


def redact(text: str, found: list[Found] | None = None) -> str:
    """`text` with each piece of personal data replaced by its placeholder ([PHONE], [ID], [CARD], [EMAIL])."""
    pieces, last = [], 0
    for item in find_pii(text) if found is None else found:
        pieces.append(text[last : item.start])
        pieces.append(PLACEHOLDERS[item.kind])
        last = item.end
    pieces.append(text[last:])
    return "".join(pieces)


@dataclass
class PiiGuard:
    """Redacts (or, blocking, stops at) personal data in an answer as it streams; `on_found` hears of each
    piece by kind."""

    blocking: bool
    on_found: Callable[[PiiKind], None] = lambda kind: None
    _pending: str = ""

    def feed(self, text: str) -> tuple[str, Found | None]:
        self._pending += text
        cut = len(self._pending)
        for still_open in (_OPEN_NUMBER, _OPEN_ADDRESS):
            match = still_open.search(self._pending, max(0, cut - _LONGEST_OPEN))
            if match is not None and match.end() - match.start() < _LONGEST_OPEN:
                cut = min(cut, match.start())
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        return self._released(ready)

    def finish(self, text: str = "") -> tuple[str, Found | None]:
        ready, self._pending = self._pending + text, ""
        return self._released(ready)

    def _released(self, text: str) -> tuple[str, Found | None]:
        found = find_pii(text)
        if not found:
            return text, None
        if self.blocking:
            self.on_found(found[0].kind)
            return text[: found[0].start], found[0]
        for item in found:
            self.on_found(item.kind)
        return redact(text, found), None
