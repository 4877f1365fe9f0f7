"""Personal data in the real server with the real model: an answer that repeats a mobile number reaches the
client as [PHONE] (streamed or not) on the main server (pii_mode_answer redact); on the small one
(pii_mode_prompt redact) the model is given the redacted prompt, token for token; and no log line, at
debug level, holds a prompt's text or its ID number."""

from __future__ import annotations

import json
import uuid

import httpx

from tests.app.conftest import MODEL, Server

PHONE = "13812345678"
# A resident ID number with a valid GB 11643 check digit and birth date (the standard's own example).
ID_NUMBER = "11010519491231002X"
REPEAT = [{"role": "user", "content": f"Repeat exactly, nothing else: {PHONE}"}]


def post(server: Server, path: str, body: dict[str, object]) -> dict[str, object]:
    response = httpx.post(
        f"{server.url}{path}",
        json={"model": MODEL, "temperature": 0, **body},
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    payload: dict[str, object] = response.json()
    return payload


def test_an_answer_repeating_a_mobile_number_reaches_the_client_redacted(server: Server) -> None:
    before = server.metric("private_llm_pii_detections_total", direction="answer", kind="phone", action="redacted")
    answer = post(server, "/v1/chat/completions", {"messages": REPEAT, "max_tokens": 24})
    content = answer["choices"][0]["message"]["content"]  # type: ignore[index]
    assert "[PHONE]" in content and PHONE not in content, content

    streamed = ""
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": REPEAT, "max_tokens": 24, "temperature": 0, "stream": True},
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=120,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: ") :])
                streamed += "".join(choice["delta"].get("content") or "" for choice in event["choices"])
    assert streamed == content
    after = server.metric("private_llm_pii_detections_total", direction="answer", kind="phone", action="redacted")
    assert after == before + 2


def test_the_model_is_given_the_redacted_prompt(server: Server, small_server: Server) -> None:
    prompt = f"Phone: {PHONE}\nPhone: {PHONE}\nPhone:"
    redacted_by_hand = "Phone: [PHONE]\nPhone: [PHONE]\nPhone:"
    # The small server redacts prompts; the main one takes the redacted text as it is.
    redacted = post(small_server, "/v1/completions", {"prompt": prompt, "max_tokens": 8})
    by_hand = post(server, "/v1/completions", {"prompt": redacted_by_hand, "max_tokens": 8})
    assert redacted["usage"]["prompt_tokens"] == by_hand["usage"]["prompt_tokens"]  # type: ignore[index]
    # The model goes on with the pattern it was shown: the placeholder, not the number.
    answer = redacted["choices"][0]["text"]  # type: ignore[index]
    assert "[PHONE]" in answer and PHONE not in answer, answer


def test_no_log_line_holds_a_prompts_text_or_its_personal_data(small_server: Server, server: Server) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    for target in (small_server, server):
        post(
            target,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": f"{marker} {ID_NUMBER}"}], "max_tokens": 4},
        )
        post(target, "/v1/completions", {"prompt": f"{marker} {ID_NUMBER}", "max_tokens": 4})
    for target in (small_server, server):
        log = target.log.read_text()
        assert '"level": "debug"' in log or target is server  # the small server logs at debug level
        assert marker not in log and ID_NUMBER not in log and ID_NUMBER.lower() not in log
