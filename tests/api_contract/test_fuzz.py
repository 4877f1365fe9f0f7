"""A bounded fuzzer of our own, beside schemathesis: it mutates valid requests the way clients and attackers
get them wrong — wrong types, extreme numbers, missing and unknown fields, odd Unicode, broken or hostile
JSON, wrong content types and methods — and asserts that the server never answers 5xx, that every refusal
is an OpenAI-shaped JSON error, that streams end properly, and that an ordinary request still answers.
Seeded and bounded (PLI_FUZZ_REQUESTS requests), so a failure can be replayed."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any

import httpx

from tests.app.conftest import MODEL, Server

REQUESTS = int(os.environ.get("PLI_FUZZ_REQUESTS", "300"))
SEED = int(os.environ.get("PLI_FUZZ_SEED", "20261201"))

ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**63,
    -(2**63) - 1,
    2**64,
    10**400,
    1e-300,
    -1e-300,
    1e308,
    -0.0,
    0.5,
    "",
    " ",
    "0",
    "NaN",
    "Infinity",
    "\x00",
    "\u202e\u200b\ufeff",
    "é" * 3,
    "\U0001d518\U0001d52b\U0001d526",  # mathematical letters: NFKC folds them
    "x" * 5000,
    [],
    [None],
    [[]],
    ["a"] * 100,
    {},
    {"a": {"b": {"c": []}}},
]

CHAT_FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "user",
]
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "echo"]


def valid_chat(rng: random.Random) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": rng.choice(["Hi", "What is 2+2?", "Name a colour."])}],
        "max_tokens": rng.randint(1, 8),
        "temperature": rng.choice([0, 0.7, 1.5]),
        "stream": rng.random() < 0.3,
    }


def valid_completion(rng: random.Random) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "The capital of France is", "max_tokens": rng.randint(1, 8)}


def mutate_message(rng: random.Random, body: dict[str, Any]) -> None:
    message = body["messages"][0]
    choice = rng.randrange(6)
    if choice == 0:
        message["role"] = rng.choice(["", "admin", "tool", "function", 7, None])
    elif choice == 1:
        message["content"] = rng.choice(ODD_VALUES)
    elif choice == 2:
        message["content"] = [{"type": rng.choice(["text", "image_url", "audio", ""]), "text": "hi"}]
    elif choice == 3:
        message.pop("content", None)
    elif choice == 4:
        body["messages"] = [message] * rng.choice([0, 2, 50])
    else:
        message[rng.choice(["name", "tool_calls", "extra", "refusal"])] = rng.choice(ODD_VALUES)


def mutated(rng: random.Random, body: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(5)
        if choice == 0:
            body[rng.choice(fields)] = rng.choice(ODD_VALUES)
        elif choice == 1:
            body.pop(rng.choice(list(body) or ["model"]), None)
        elif choice == 2:
            body[rng.choice(["logit_bias", "tools", "response_format", "x" * 40, "__proto__"])] = rng.choice(ODD_VALUES)
        elif (
            choice == 3
            and isinstance(body.get("messages"), list)
            and body["messages"]
            and isinstance(body["messages"][0], dict)
        ):
            mutate_message(rng, body)
        else:
            body["max_tokens"] = rng.choice([0, -5, 8, 10**9, "8", 8.0, 8.5])
    return body


def hostile_bytes(rng: random.Random) -> bytes:
    text = json.dumps(valid_chat(rng))
    return rng.choice(
        [
            b"",
            b"{",
            text[: len(text) // 2].encode(),
            b"[" * 50_000 + b"]" * 50_000,
            b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
            text.replace('"Hi"', '"\\ud800"').replace('"What is 2+2?"', '"\\udfff"').encode(),
            b'{"model": "\xff\xfe", "messages": []}',
            text.replace('"max_tokens": ', '"max_tokens": NaN, "x": ').encode(),
            text.replace("{", '{"model": "a", ', 1).encode(),
            b"null",
            b"[]",
            b'"string"',
            b"1e999999",
            text.encode("utf-16"),
        ]
    )


Case = tuple[str, str, dict[str, str], bytes]


def cases(rng: random.Random) -> Callable[[], Case]:
    def one() -> Case:
        kind = rng.randrange(10)
        headers = {"content-type": "application/json"}
        if kind < 5:
            return (
                "POST",
                "/v1/chat/completions",
                headers,
                json.dumps(mutated(rng, valid_chat(rng), CHAT_FIELDS)).encode(),
            )
        if kind < 7:
            body = mutated(rng, valid_completion(rng), COMPLETION_FIELDS)
            return "POST", "/v1/completions", headers, json.dumps(body).encode()
        if kind < 9:
            path = rng.choice(["/v1/chat/completions", "/v1/completions"])
            return "POST", path, rng.choice([headers, {"content-type": "text/plain"}, {}]), hostile_bytes(rng)
        method, path = rng.choice(
            [
                ("GET", "/v1/chat/completions"),
                ("PUT", "/v1/completions"),
                ("DELETE", "/v1/models"),
                ("GET", "/v1/models/" + "x" * 2000),
                ("GET", "/v1/../../etc/passwd"),
                ("POST", "/v1/embeddings"),
                ("GET", "/v1/models/%00"),
            ]
        )
        return method, path, headers, b""

    return one


def assert_answer_is_sound(response: httpx.Response, case: Case) -> None:
    method, path, _, body = case
    where = f"{method} {path} {body[:300]!r}"
    assert response.status_code < 500, f"{response.status_code} for {where}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], where
        assert isinstance(error["type"], str), where
    elif "text/event-stream" in response.headers.get("content-type", ""):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", f"stream did not end for {where}: {response.text[-500:]}"
        assert not any('"error"' in line for line in events), f"error inside a stream for {where}"


def test_mutated_requests_never_get_a_5xx_and_the_server_goes_on(contract_server: Server) -> None:
    rng = random.Random(SEED)
    next_case = cases(rng)
    statuses: dict[int, int] = {}
    auth = {"authorization": f"Bearer {contract_server.key}"}
    with httpx.Client(base_url=contract_server.url, timeout=120) as client:
        for _ in range(REQUESTS):
            case = next_case()
            method, path, headers, body = case
            response = client.request(method, path, headers={**auth, **headers}, content=body)
            assert_answer_is_sound(response, case)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        ordinary_body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        ordinary = client.post("/v1/chat/completions", headers=auth, json=ordinary_body)
    print(f"{REQUESTS} fuzzed requests, statuses: {dict(sorted(statuses.items()))}")
    assert ordinary.status_code == 200, ordinary.text
    assert ordinary.json()["choices"][0]["message"]["role"] == "assistant"
    # Not a fuzzer that only ever hits the front door: valid requests get through too.
    assert statuses.get(200, 0) >= REQUESTS // 20, statuses
    assert "Traceback" not in contract_server.log.read_text(), "the server logged an unexpected error"
