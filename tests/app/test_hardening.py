"""What an attacker or a careless client could do to the service: numerically extreme but valid sampling
parameters, malformed values, prompts far too big, clients that hang up. Both backends."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from tests.app.conftest import COUNTING, MODEL, Server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# Valid by the API's own rules, and at the edges of float and integer ranges.
EXTREMES: list[dict[str, Any]] = [
    {"temperature": 1e-300},
    {"temperature": 5e-324},  # the smallest subnormal double
    {"temperature": 1e-45},
    {"temperature": 9.999e-6},  # just under the greedy threshold
    {"temperature": 1e-5},
    {"temperature": 2.0},
    {"top_p": 5e-324},
    {"top_p": 1e-300, "temperature": 2.0},
    {"temperature": 1e-300, "top_p": 1e-300},
    {"seed": -(2**63)},
    {"seed": 2**63 - 1},
    {"seed": 0, "temperature": 2.0, "top_p": 1.0},
    {"max_tokens": 1},
    {"stop": ["\u0000", "\uffff", "x" * 500, ""]},
    {"repetition_penalty": 0.01, "temperature": 2.0},
    {"repetition_penalty": 10.0},
    {"frequency_penalty": -2.0, "presence_penalty": -2.0, "temperature": 2.0},
    {"frequency_penalty": 2.0, "presence_penalty": 2.0, "max_tokens": 32},
    {"min_p": 5e-324, "top_k": 2**31 - 1},
    {"min_p": 1.0, "top_k": 1, "top_p": 5e-324, "temperature": 2.0},
]


def _post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {server.key}"}, timeout=120)


def _still_answers(server: Server) -> None:
    reply = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("index", range(len(EXTREMES)), ids=[json.dumps(e)[:60] for e in EXTREMES])
def test_extreme_sampling_values_are_served_and_the_engine_goes_on(server: Server, index: int) -> None:
    # Chat, text completion and a stream in turn: each value through one of the three paths.
    extreme = EXTREMES[index]
    path = ("chat", "completion", "stream")[index % 3]
    if path == "completion":
        reply = _post(server, "/v1/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 8, **extreme})
        assert reply.status_code == 200, reply.text
    elif path == "chat":
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, **extreme}
        reply = _post(server, "/v1/chat/completions", body)
        assert reply.status_code == 200, reply.text
    else:
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "stream": True, **extreme}
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {server.key}"}
        ) as streamed:
            lines = [line for line in streamed.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert not any('"error"' in line for line in lines), lines
    _still_answers(server)


def test_tiny_temperatures_are_greedy(server: Server) -> None:
    """Below 1e-5 sampling is greedy on both backends: the same answer as temperature 0, whatever the seed."""

    def answer(**extra: Any) -> str:
        reply = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 12, **extra})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["message"]["content"])

    greedy = answer(temperature=0)
    assert answer(temperature=1e-300, seed=1) == greedy
    assert answer(temperature=9e-6, seed=2) == greedy


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": True}, "temperature"),
        ({"top_p": False}, "top_p"),
        ({"presence_penalty": True}, "presence_penalty"),
        ({"max_tokens": True}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "caf\ud800"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content"),
        ({"model": "smollm2\ud83d"}, "model"),
        ({"stop": "\ud800"}, "stop"),
        ({"user": "\udc00"}, "user"),
        ({"n": 2}, "n"),
        ({"temperature": float("inf")}, "temperature"),  # json.dumps writes Infinity, which Python parses
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_malformed_values_are_400_naming_the_parameter(server: Server, body: dict[str, Any], param: str) -> None:
    payload = {"model": MODEL, "messages": QUESTION, **body}
    # json.dumps writes lone surrogates as \\ud800 escapes: valid JSON, as an attacker would send it.
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=json.dumps(payload),
        headers={"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_lone_surrogate_in_a_completion_prompt_is_400(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/v1/completions",
        content=json.dumps({"model": MODEL, "prompt": ["\ud800 hello"]}),
        headers={"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"


def test_an_empty_completion_prompt_is_400(server: Server) -> None:
    response = _post(server, "/v1/completions", {"model": MODEL, "prompt": ""})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"


def test_prompt_that_cannot_fit_is_refused_without_tokenizing(server: Server) -> None:
    """900 kB of text cannot fit 8192 tokens however it tokenizes: refused from its size alone ("at least")."""
    response = _post(server, "/v1/completions", {"model": MODEL, "prompt": "a" * 900_000})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "at least" in error["message"], error


def test_tens_of_thousands_of_messages_are_refused_without_rendering_them(server: Server) -> None:
    messages = [{"role": "user", "content": ""}] * 25_000
    response = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert "at least" in response.json()["error"]["message"]
    _still_answers(server)


def _answered(server: Server) -> float:
    return sum(server.metric("vllm:request_success_total", finished_reason=reason) for reason in ("stop", "length"))


def test_non_streamed_request_is_cancelled_when_its_client_goes(server: Server) -> None:
    body = {**COUNTING, "max_tokens": 2000}
    answered_before = _answered(server)
    aborted_before = server.metric("vllm:request_success_total", finished_reason="abort")
    tokens_before = server.metric("vllm:generation_tokens_total")

    async def give_up_after_a_few_tokens() -> None:
        async with httpx.AsyncClient(base_url=server.url) as client:
            request = asyncio.create_task(
                client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {server.key}"})
            )
            for _ in range(600):
                if server.metric("vllm:generation_tokens_total") - tokens_before >= 3:
                    break
                await asyncio.sleep(0.1)
            request.cancel()  # closes the connection mid-generation
            await asyncio.gather(request, return_exceptions=True)

    asyncio.run(give_up_after_a_few_tokens())
    deadline = time.monotonic() + 30
    while server.metric("vllm:num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("vllm:num_requests_running") == 0
    assert _answered(server) == answered_before, "the request ran to its end"
    assert server.metric("vllm:request_success_total", finished_reason="abort") == aborted_before + 1
    assert server.metric("vllm:generation_tokens_total") - tokens_before < 1000


def test_systemd_is_told_the_state_and_fed_the_watchdog(server: Server) -> None:
    """The server runs with NOTIFY_SOCKET and WATCHDOG_USEC as under systemd (conftest): it says READY
    once (Type=notify: the watchdog is armed from then on), that its engine is ready (within a tick of
    /ready saying so), and it pings the watchdog while its engine is healthy."""
    messages: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        messages += server.notified()
        if "STATUS=ready" in messages and messages[messages.index("STATUS=ready") :].count("WATCHDOG=1") >= 2:
            break
        time.sleep(0.2)
    assert "STATUS=ready" in messages, messages
    assert messages[messages.index("STATUS=ready") :].count("WATCHDOG=1") >= 2, messages
    assert messages.count("READY=1") == 1, messages
    assert messages.index("READY=1") < messages.index("STATUS=ready"), messages
    log = server.log.read_text()
    assert "Traceback" not in log, "an unexpected error was logged"
