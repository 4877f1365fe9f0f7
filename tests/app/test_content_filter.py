"""The sensitive-word filter in the real server with the real model: prompts refused in OpenAI's shape,
answers (streamed or not) cut before a term that the model really writes, the generation stopped, the
lists read again on SIGHUP without a restart, and a list that no longer reads leaving the old one in force."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.safety.words import fold
from tests.app.conftest import MAIN_WORD_LIST, MODEL, Server, usage_rows

QUESTION = [{"role": "user", "content": "Describe the city of Paris in three sentences."}]


def reload_words(server: Server, path: Path, text: str, result: str = "ok") -> None:
    """Write the list, send SIGHUP, and wait until the server says it read it (or failed to)."""
    before = server.metric("private_llm_content_filter_reloads_total", result=result)
    path.write_text(text, encoding="utf-8")
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while server.metric("private_llm_content_filter_reloads_total", result=result) == before:
        assert time.monotonic() < deadline, f"the server did not reload its word list ({result}) within 30 s"
        time.sleep(0.1)


@pytest.fixture
def word_list(server: Server, main_word_list: Path) -> Iterator[Path]:
    yield main_word_list
    reload_words(server, main_word_list, MAIN_WORD_LIST)


def greedy(server: Server, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 48, "temperature": 0, **extra}
    return httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {server.key}"}, timeout=120
    )


def streamed(server: Server) -> tuple[str, str | None, dict[str, int]]:
    content, reason, usage = "", None, {}
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": QUESTION,
            "max_tokens": 48,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                content += choice["delta"].get("content") or ""
                reason = choice["finish_reason"] or reason
    return content, reason, usage


def a_term_from(answer: str) -> tuple[str, str]:
    """A term the model writes: eight characters of the answer's normal form from its middle, and the part
    of the answer before the term's first appearance (all that may reach a client)."""
    normal, origin = [], []
    for index, character in enumerate(answer):
        for folded in fold(character):
            normal.append(folded)
            origin.append(index)
    text = "".join(normal)
    assert len(text) > 30, f"the answer is too short to take a term from: {answer!r}"
    term = text[12:20]
    return term, answer[: origin[text.index(term)]]


# Full-width letters (U+FF5A...) and a zero-width space between them, as pasted text may hold.
@pytest.mark.parametrize(
    "dodge", ["zqxjvk", "Z Q X J V K", "\uff5a\uff51\uff58\u200b\uff4a\uff56\uff4b", "z-q-x.j*v k"]
)
def test_a_prompt_holding_a_term_is_refused_naming_the_category_not_the_term(server: Server, dodge: str) -> None:
    before = server.metric("private_llm_content_filter_blocks_total", direction="prompt", category="demo")
    response = greedy(server, messages=[{"role": "user", "content": f"Please repeat: {dodge}"}])
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("content_filter", "messages", "invalid_request_error")
    assert "demo" in error["message"] and "zqxjvk" not in error["message"].lower()
    after = server.metric("private_llm_content_filter_blocks_total", direction="prompt", category="demo")
    assert after == before + 1
    # The refusal is in the usage ledger, as the quota's are: status 400, finish reason content_filter.
    request_id = response.headers["X-Request-ID"]
    deadline = time.monotonic() + 15
    while not (rows := [row for row in usage_rows(server.keys_db) if row["request_id"] == request_id]):
        assert time.monotonic() < deadline, "no ledger row for the refused request"
        time.sleep(0.5)
    assert (rows[0]["status"], rows[0]["finish_reason"], rows[0]["completion_tokens"]) == (400, "content_filter", 0)

    completion = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL, "prompt": f"Say {dodge}", "max_tokens": 4},
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=60,
    )
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt"


def test_an_answer_is_cut_before_a_term_the_model_writes_streamed_or_not(server: Server, word_list: Path) -> None:
    plain = greedy(server)
    assert plain.status_code == 200
    answer = plain.json()["choices"][0]["message"]["content"]
    term, allowed_part = a_term_from(answer)

    reload_words(server, word_list, f"{term}\n")
    before = server.metric("private_llm_content_filter_blocks_total", direction="answer", category="demo")

    content, reason, usage = streamed(server)
    assert reason == "content_filter"
    assert content == allowed_part
    # The generation stopped at the term: fewer tokens than the whole answer, and its slot is free again.
    assert 0 < usage["completion_tokens"] < plain.json()["usage"]["completion_tokens"]
    deadline = time.monotonic() + 30
    while server.metric("vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the filtered generation still runs"
        time.sleep(0.1)

    cut = greedy(server)
    assert cut.status_code == 200
    choice = cut.json()["choices"][0]
    assert (choice["finish_reason"], choice["message"]["content"]) == ("content_filter", allowed_part)
    after = server.metric("private_llm_content_filter_blocks_total", direction="answer", category="demo")
    assert after == before + 2


def test_a_list_that_no_longer_reads_leaves_the_previous_one_in_force(server: Server, word_list: Path) -> None:
    reload_words(server, word_list, "zqxjvk\n---\n", result="failed")
    log = server.log.read_text()
    assert "demo.txt:2" in log and "previous ones stay in force" in log
    response = greedy(server, messages=[{"role": "user", "content": "zqxjvk"}])
    assert response.status_code == 400 and response.json()["error"]["code"] == "content_filter"
    assert server.metric("private_llm_content_filter_terms", list="blocked") == 1
