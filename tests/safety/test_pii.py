"""Personal data detectors on real numbers (valid and invalid by their own checks), redaction, and the
answer guard fed the way an engine streams, split at every place."""

from __future__ import annotations

import asyncio
import random

import pytest

from app.api.errors import APIError
from app.metrics import Metrics
from app.safety.pii import PiiGuard, find_pii, redact
from app.serving.safety import Safety

# A resident ID number with a valid GB 11643 check digit and birth date (the standard's own example), the
# same with a wrong check digit, and one with 13 as its month.
VALID_ID = "11010519491231002X"
WRONG_CHECK_ID = "110105194912310021"
BAD_DATE_ID = "110105194913310020"
# A Luhn-valid card number of 19 digits, and the same with its last digit changed.
VALID_CARD = "6222020200112233446"
WRONG_CARD = "6222020200112233447"


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("call 13812345678 now", ["phone"]),
        ("电话：+86 138 1234 5678。", ["phone"]),
        ("tel 138-1234-5678", ["phone"]),
        ("0086 13912345678", ["phone"]),
        (f"身份证号{VALID_ID}，", ["id"]),
        (f"id {VALID_ID.lower()}", ["id"]),
        (f"card {VALID_CARD}", ["card"]),
        ("card 6222 0202 0011 2233 446", ["card"]),
        ("mail li.lei+cn@example.com.cn please", ["email"]),
        (f"{VALID_ID} and 13812345678 and a@b.io", ["id", "phone", "email"]),
    ],
)
def test_personal_data_is_found_as_people_write_it(text: str, kinds: list[str]) -> None:
    assert [found.kind for found in find_pii(text)] == kinds


@pytest.mark.parametrize(
    "text",
    [
        f"order {WRONG_CHECK_ID}",  # 18 digits, check digit wrong: not an ID (nor a card: Luhn fails too)
        f"order {BAD_DATE_ID}",
        f"card {WRONG_CARD}",
        "call 12812345678",  # no mobile number starts 12
        "138123456789",  # 12 digits: no mobile number
        "version 1.13812345678",
        "not@an address",
    ],
)
def test_numbers_that_fail_their_check_are_no_personal_data(text: str) -> None:
    assert find_pii(text) == []


def test_redaction_puts_a_placeholder_for_each_kind() -> None:
    text = f"ID {VALID_ID}, phone +86 138 1234 5678, card {VALID_CARD}, mail x@example.org."
    assert redact(text) == "ID [ID], phone [PHONE], card [CARD], mail [EMAIL]."


TEXT = f"联系我：13812345678，或 li.lei@example.com；身份证 {VALID_ID}，卡号 6222 0202 0011 2233 446 谢谢"


@pytest.mark.parametrize("seed", range(200))
def test_the_answer_guard_redacts_however_the_answer_is_split(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randrange(0, 25)))
    guard = PiiGuard(blocking=False)
    out = ""
    for a, b in zip([0, *cuts], cuts, strict=False):
        released, stop = guard.feed(TEXT[a:b])
        assert stop is None
        out += released
    out += guard.finish(TEXT[cuts[-1] if cuts else 0 :])[0]
    assert out == redact(TEXT) == "联系我：[PHONE]，或 [EMAIL]；身份证 [ID]，卡号 [CARD] 谢谢"


@pytest.mark.parametrize("seed", range(50))
def test_a_blocking_answer_guard_ends_before_the_first_piece_and_never_lets_a_digit_of_it_out(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randrange(0, 25)))
    guard = PiiGuard(blocking=True)
    out, stop = "", None
    for a, b in zip([0, *cuts], [*cuts, len(TEXT)], strict=True):
        released, stop = guard.feed(TEXT[a:b]) if b < len(TEXT) else guard.finish(TEXT[a:b])
        out += released
        if stop is not None:
            break
    assert stop is not None and stop.kind == "phone"
    assert out == "联系我："


def test_only_a_trailing_run_that_may_still_grow_is_held_back() -> None:
    guard = PiiGuard(blocking=False)
    assert guard.feed("Paris is the capital of France, ")[0] == "Paris is the capital of France, "
    # A word could still become an e-mail address's local part; digits a number.
    assert guard.feed("call 138")[0] == "call "
    assert guard.feed(" 1234 5678 today")[0] == "[PHONE] "
    assert guard.finish()[0] == "today"


def screen(mode: str, texts: list[str]) -> list[str]:
    safety = Safety(None, mode, "off", Metrics())  # type: ignore[arg-type]
    return asyncio.run(safety.screen_prompt(texts, "messages"))


def test_prompt_modes_pass_redact_or_refuse_naming_the_kinds_only() -> None:
    texts = ["hello", f"my id is {VALID_ID}, phone 13812345678"]
    assert screen("off", texts) == texts
    assert screen("redact_stored", texts) == texts
    assert screen("redact", texts) == ["hello", "my id is [ID], phone [PHONE]"]
    with pytest.raises(APIError) as refused:
        screen("block", texts)
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "pii_detected", "messages")
    assert "id, phone" in refused.value.message and VALID_ID not in refused.value.message
    assert screen("block", ["no personal data here"]) == ["no personal data here"]
