"""Sensitive-word lists and the matching of text against them.

Text and terms are compared in one normal form, so that the usual ways round a filter do not work: each
character goes through Unicode NFKC (full-width letters and digits become ASCII ones, ligatures are split)
and case folding, and every character that is not a letter or a digit (spaces, zero-width characters,
punctuation, symbols, combining marks) is dropped. Matching is one pass of an Aho-Corasick automaton over
that form, never a loop over the terms.

An allowed term (a longer, harmless word that contains a listed one) wins over every blocked match it
covers; among blocked matches the earliest, then the longest, is the one reported.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import ahocorasick

# Unicode general categories whose characters say nothing about the word: separators (Z), punctuation (P),
# symbols (S), controls, format characters such as U+200B ZERO WIDTH SPACE and unassigned ones (C), marks (M).
_IGNORED_CATEGORIES = frozenset("ZPSCM")


class WordListError(ValueError):
    """A word list cannot be read, or holds a line that is no term."""


def fold(character: str) -> str:
    """The normal form of one character: what it stands for in matching, often one character, possibly
    none (it is dropped) or several (a ligature)."""
    folded = unicodedata.normalize("NFKC", character).casefold()
    return "".join(c for c in folded if unicodedata.category(c)[0] not in _IGNORED_CATEGORIES)


class _FoldedCharacters(dict[int, str]):
    """Each character's normal form by code point (a str.translate table), worked out the first time it is
    asked for; at most one entry per character ever seen."""

    def __missing__(self, code: int) -> str:
        folded = self[code] = fold(chr(code))
        return folded


# Shared by every filter: the normal form does not depend on the lists.
FOLDED = _FoldedCharacters()


def normalize(text: str) -> str:
    return text.translate(FOLDED)


@dataclass(frozen=True)
class Match:
    """A blocked term found in normalised text: [start, end) in that text, and the term's category."""

    start: int
    end: int
    category: str


def read_word_file(path: Path) -> list[str]:
    """The terms of one list: a term per line; blank lines and lines starting with # are skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise WordListError(f"{path}: cannot read the word list: {exc}") from exc
    terms = []
    for number, line in enumerate(text.splitlines(), start=1):
        term = line.strip()
        if not term or term.startswith("#"):
            continue
        if not normalize(term):
            raise WordListError(
                f"{path}:{number}: {term!r} has no letter or digit, so it would match nothing (matching ignores "
                "spaces, punctuation and symbols)"
            )
        terms.append(term)
    return terms


class WordFilter:
    """Blocked terms by category (a list's category is its file name without the suffix) and allowed terms,
    compiled once; immutable, so that requests may share it while a reload builds the next one."""

    def __init__(self, blocked: Mapping[str, Iterable[str]], allowed: Iterable[str] = ()) -> None:
        self._automaton = ahocorasick.Automaton()
        # Normalised term -> its category, or None for an allowed term (a term both blocked and allowed is
        # allowed: it covers itself).
        entries: dict[str, str | None] = {}
        for name, terms in blocked.items():
            for term in terms:
                entries.setdefault(normalize(term), name)
        for term in allowed:
            key = normalize(term)
            if key:
                entries[key] = None
        allowed_keys = [key for key, category in entries.items() if category is None]
        self.blocked_terms = len(entries) - len(allowed_keys)
        self.allowed_terms = len(allowed_keys)
        for key, category in entries.items():
            self._automaton.add_word(key, (category, len(key)))
        self.longest_term = max((len(key) for key in entries), default=0)
        self.longest_allowed = max((len(key) for key in allowed_keys), default=0)
        if entries:
            self._automaton.make_automaton()
        self.categories = tuple(sorted(blocked))

    @classmethod
    def from_files(cls, blocked_files: Iterable[Path], allowed_files: Iterable[Path] = ()) -> WordFilter:
        blocked: dict[str, list[str]] = {}
        for path in blocked_files:
            blocked.setdefault(path.stem, []).extend(read_word_file(path))
        allowed = [term for path in allowed_files for term in read_word_file(path)]
        return cls(blocked, allowed)

    def __bool__(self) -> bool:
        return self.blocked_terms > 0

    def first_match(self, normalised: str, since: int = 0, complete: bool = True) -> tuple[Match | None, int | None]:
        """The first blocked match starting at `since` or later that no allowed term covers, and, when the
        text may still go on (complete=False), the start of the first match that an allowed term yet to come
        could still cover: nothing from there on may be released before more text decides it."""
        if not self:
            return None, None
        allowed: list[tuple[int, int]] = []
        blocked: list[Match] = []
        for last, (category, length) in self._automaton.iter(normalised):
            start, end = last - length + 1, last + 1
            if category is None:
                allowed.append((start, end))
            elif start >= since:
                blocked.append(Match(start, end, category))
        blocked.sort(key=lambda m: (m.start, -m.end))
        for match in blocked:
            if any(a_start <= match.start and match.end <= a_end for a_start, a_end in allowed):
                continue
            # A covering allowed term starts at or before the match and is at most longest_allowed long.
            if not complete and match.start + self.longest_allowed > len(normalised):
                return None, match.start
            return match, None
        return None, None

    def find(self, text: str) -> Match | None:
        """The first blocked match in a whole text (a prompt), in normalised positions."""
        return self.first_match(normalize(text))[0]
