"""The sensitive-word filter on its own: lists read from real files, the normal form, the allow list, and the
answer filter fed the way an engine streams, split at every possible place."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from app.safety import AnswerGuard, WordFilter, WordListError, normalize, read_word_file
from app.settings import Settings


def fullwidth(text: str) -> str:
    """ASCII letters as their full-width forms (U+FF01 on), as a Chinese input method types them."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def words(blocked: dict[str, list[str]], allowed: list[str] | None = None) -> WordFilter:
    return WordFilter(blocked, allowed or [])


@pytest.mark.parametrize(
    "dodged",
    [
        "机密文件",
        "机 密 文 件",  # spaces
        "机\u200b密\u200d文\ufeff件",  # zero-width characters
        "机-密.文*件",  # punctuation between the characters
        "机★密⭐文件",  # symbols
        "请把机密。文件发给我",  # inside a sentence, full stop in the middle
    ],
)
def test_a_term_is_found_however_it_is_spaced_or_punctuated(dodged: str) -> None:
    match = words({"secrets": ["机密文件"]}).find(dodged)
    assert match is not None and match.category == "secrets"


@pytest.mark.parametrize(
    "dodged", ["FORBIDDEN", fullwidth("Forbidden"), "f o r b i d d e n", "F.O.R.B.I.D.D.E.N", "\ufb01forbidden"]
)
def test_width_and_case_do_not_matter(dodged: str) -> None:
    assert words({"demo": ["forbidden"]}).find(dodged) is not None


def test_text_without_a_term_is_not_matched() -> None:
    filtered = words({"secrets": ["机密文件"], "demo": ["forbidden"]})
    assert filtered.find("机密的文件 are for bidding") is None
    assert filtered.find("") is None


def test_an_allowed_longer_term_wins_over_the_term_it_holds() -> None:
    filtered = words({"demo": ["sex", "赌博"]}, allowed=["Sussex", "反赌博"])
    assert filtered.find("He lives in Sussex.") is None
    assert filtered.find("这是反赌博宣传") is None
    # Outside the allowed word the term is still blocked, in the same text too.
    match = filtered.find("Sussex sex")
    assert match is not None and match.start == len("sussex")
    assert filtered.find("赌博网站") is not None


def test_the_earliest_then_longest_match_is_reported() -> None:
    filtered = words({"short": ["abc"], "long": ["abcdef"], "later": ["xyz"]})
    match = filtered.find("xx abcdef xyz")
    assert match is not None and (match.category, match.start, match.end) == ("long", 2, 8)


def test_a_list_is_read_from_its_file_with_its_name_as_category(tmp_path: Path) -> None:
    blocked = tmp_path / "gambling.txt"
    blocked.write_text("\ufeff# comments and blank lines are skipped\n\n赌博\n  online casino  \n", encoding="utf-8")
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("反赌博\n", encoding="utf-8")
    assert read_word_file(blocked) == ["赌博", "online casino"]
    filtered = WordFilter.from_files([blocked], [allowed])
    assert (filtered.blocked_terms, filtered.allowed_terms, filtered.categories) == (2, 1, ("gambling",))
    match = filtered.find("Online-Casino")
    assert match is not None and match.category == "gambling"
    assert filtered.find("反赌博") is None


def test_a_line_that_cannot_match_anything_is_refused_with_its_place(tmp_path: Path) -> None:
    path = tmp_path / "demo.txt"
    path.write_text("fine\n---\n", encoding="utf-8")
    with pytest.raises(WordListError, match=r"demo\.txt:2: '---' has no letter or digit"):
        read_word_file(path)
    with pytest.raises(WordListError, match="cannot read"):
        read_word_file(tmp_path / "missing.txt")
    # The settings check says so before a server starts (the role's validate runs it).
    with pytest.raises(ValueError, match=r"demo\.txt:2"):
        Settings(sensitive_word_files=[path])


def stream_through(guard: AnswerGuard, text: str, cuts: list[int]) -> tuple[list[str], str, object]:
    """Feed `text` cut at `cuts`; the releases after each piece, all that went out, and the match if any."""
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    released: list[str] = []
    for piece in pieces[:-1]:
        out, match = guard.feed(piece)
        released.append(out)
        if match is not None:
            return released, "".join(released), match
    out, match = guard.finish(pieces[-1])
    released.append(out)
    return released, "".join(released), match


ANSWER_FILTER = words({"demo": ["forbidden", "机密文件"]}, allowed=["unforbiddenness"])


@pytest.mark.parametrize("seed", range(200))
def test_the_answer_filter_releases_all_before_a_term_and_nothing_of_it_however_it_is_split(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "abc de,f。机密文件的 unforbidde"
    before = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    term = rng.choice(["forbidden", "for bid-den", "机 密\u200b文件", fullwidth("FORBIDDEN")])
    after = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
    text = before + term + after
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 12))))
    _, released, match = stream_through(AnswerGuard(ANSWER_FILTER), text, cuts)
    assert match is not None
    # Whatever went out is the text up to the first term; the term's first character never does.
    first = ANSWER_FILTER.find(text)
    assert first is not None
    assert text.startswith(released)
    assert normalize(released) == normalize(text)[: first.start]
    assert ANSWER_FILTER.find(released) is None


@pytest.mark.parametrize("seed", range(100))
def test_an_answer_without_a_term_goes_out_whole_and_only_a_short_tail_is_ever_held(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "abcdefor idn,。机密的文 unforbiddenness"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120)))
    if ANSWER_FILTER.find(text) is not None:
        text = text.replace("forbidden", "forbade").replace("机密文件", "机密的")
    assert ANSWER_FILTER.find(text) is None
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 30))))
    guard = AnswerGuard(ANSWER_FILTER)
    sent = ""
    for a, b in zip([0, *cuts], cuts, strict=False):
        out, match = guard.feed(text[a:b])
        assert match is None
        sent += out
        # Held back: no more of the normal form than a term needs to be completed.
        assert len(normalize(text[:b])) - len(normalize(sent)) <= ANSWER_FILTER.longest_term - 1
    out, match = guard.finish(text[cuts[-1] if cuts else 0 :])
    assert match is None and sent + out == text


def test_an_allowed_word_spanning_chunks_is_released_and_a_term_after_it_is_stopped() -> None:
    guard = AnswerGuard(ANSWER_FILTER)
    _, sent, match = stream_through(guard, "an unforbiddenness and then forbidden text", [5, 9, 14, 20, 31])
    assert match is not None
    assert sent == "an unforbiddenness and then "
