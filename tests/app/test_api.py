"""The OpenAI API through the official client (and raw HTTP where the client hides the wire format)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import httpx
import openai
import pytest

from tests.app.conftest import COUNTING, MODEL, Server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answers_the_embedded_model_question(server: Server) -> None:
    reply = server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_content_as_text_parts_equals_plain_string(server: Server) -> None:
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is the capital of "}, {"type": "text", "text": "France?"}],
        }
    ]
    client = server.client()
    as_parts = client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    as_text = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert "Paris" in (as_parts.choices[0].message.content or "")


def test_text_completion(server: Server) -> None:
    reply = server.client().completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert reply.id.startswith("cmpl-")
    assert reply.choices[0].text
    assert reply.choices[0].finish_reason in {"stop", "length"}


def test_models_lists_the_served_model(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == [MODEL]


def test_streaming_with_usage(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_stream_wire_format_ends_with_done(server: Server) -> None:
    body = {"model": MODEL, "messages": QUESTION, "stream": True, "max_tokens": 4, "temperature": 0}
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_answer(server: Server) -> None:
    reply = server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, stop=[" Paris"])
    text = reply.choices[0].message.content or ""
    assert "Paris" not in text
    assert text.startswith("The capital of France is")
    assert reply.choices[0].finish_reason == "stop"


def test_max_tokens_gives_finish_reason_length(server: Server) -> None:
    reply = server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3
    newer = server.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_completion_tokens=2, temperature=0
    )
    assert newer.usage is not None
    assert newer.usage.completion_tokens == 2


def test_seeded_sampling_is_reproducible(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]

    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=1.0,
            seed=seed,  # type: ignore[arg-type]
            max_tokens=24,
        )
        return reply.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert sample(99) != first


def test_top_k_1_and_min_p_1_sample_only_the_likeliest_token(server: Server) -> None:
    """vLLM's extras, on both backends: at their tightest, a sampled answer is the greedy one, whatever the seed."""
    client = server.client()
    greedy = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=12, temperature=0)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        for seed in (1, 2):
            sampled = client.completions.create(
                model=MODEL, prompt="The sea is", max_tokens=12, temperature=1.0, seed=seed, extra_body=extra
            )
            assert sampled.choices[0].text == greedy.choices[0].text, extra


@pytest.mark.parametrize(
    "penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.5}]
)
def test_penalties_keep_a_greedy_answer_from_repeating_itself(server: Server, penalty: dict[str, float]) -> None:
    client = server.client()
    prompt = "1, 2, 3, 4, 5, 6,"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    # repetition_penalty is vLLM's, not in the SDK's signature.
    options = {"extra_body": penalty} if "repetition_penalty" in penalty else penalty
    penalised = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, **options)  # type: ignore[call-overload]
    # Greedy counting repeats ", " after every number; a penalty on repeated tokens breaks the pattern.
    assert plain.choices[0].text.count(",") > penalised.choices[0].text.count(","), (plain, penalised)


def test_chat_logprobs_are_the_answers_tokens_with_their_likeliest_alternatives(small_server: Server) -> None:
    # The small server filters no answer (the main one redacts personal data: see the test below).
    reply = small_server.client().chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.logprobs is not None and choice.logprobs.content is not None
    tokens = choice.logprobs.content
    assert reply.usage is not None and len(tokens) == reply.usage.completion_tokens == 5
    assert "".join(token.token for token in tokens) == choice.message.content
    for token in tokens:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        alternatives = [top.logprob for top in token.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        # Greedy: the chosen token is the likeliest one.
        assert token.top_logprobs[0].token == token.token
        assert token.logprob == pytest.approx(alternatives[0], abs=1e-4)
    # An answer the model ends itself: its end-of-sequence token is no token of the answer.
    whole = small_server.client().chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, logprobs=True
    )
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].logprobs is not None
    assert "".join(t.token for t in whole.choices[0].logprobs.content or []) == whole.choices[0].message.content


def test_streamed_logprobs_add_up_to_the_streamed_answer(small_server: Server) -> None:
    stream = small_server.client().chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        # Ends for length, before the end-of-sequence token (which vLLM counts in the usage, and is no token of the
        # answer).
        max_tokens=6,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, tokens, usage, finish = "", [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            if choice.logprobs is not None and choice.logprobs.content:
                tokens.extend(choice.logprobs.content)
    assert finish == "length" and usage is not None and len(tokens) == usage.completion_tokens == 6
    assert "".join(token.token for token in tokens) == text
    assert all(token.top_logprobs == [] for token in tokens)


def test_completion_logprobs_in_the_legacy_form(small_server: Server) -> None:
    client = small_server.client()
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.text_offset
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 6
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    assert logprobs.top_logprobs is not None
    # Two alternatives, one key each: fewer only when two tokens read the same.
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_logprobs_are_refused_where_answers_are_redacted(server: Server) -> None:
    """A token is the model's own text: where personal data in answers is replaced, it would show it."""
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, logprobs=True)
    assert refused.value.body["param"] == "logprobs"  # type: ignore[index]
    assert refused.value.body["code"] == "unsupported_parameter"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": QUESTION}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": QUESTION, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": QUESTION, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": QUESTION, "top_p": 0}, "top_p"),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 100000}, "max_tokens"),
        ({"model": MODEL, "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": QUESTION, "n": 2}, "n"),
        ({"model": MODEL, "messages": QUESTION, "tools": [{"type": "function"}]}, "tools"),
        ({"model": MODEL, "messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
        ({"model": MODEL, "messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"model": MODEL, "messages": QUESTION, "logprobs": 1}, "logprobs"),
        ({"model": MODEL, "messages": QUESTION, "response_format": {"type": "json_object"}}, "response_format"),
        ({"model": MODEL, "messages": QUESTION, "frequency_penalty": 2.5}, "frequency_penalty"),
        ({"model": MODEL, "messages": QUESTION, "presence_penalty": True}, "presence_penalty"),
        ({"model": MODEL, "messages": QUESTION, "top_k": -2}, "top_k"),
        ({"model": MODEL, "messages": QUESTION, "top_k": 1.5}, "top_k"),
        ({"model": MODEL, "messages": QUESTION, "min_p": 1.5}, "min_p"),
        ({"model": MODEL, "messages": QUESTION, "repetition_penalty": 0}, "repetition_penalty"),
        ({"model": MODEL, "messages": QUESTION, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": MODEL, "messages": QUESTION, "bogus": 1}, "bogus"),
    ],
)
def test_bad_requests_get_openai_shaped_400(server: Server, body: dict[str, object], param: str) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {server.key}"}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b"", b"null", '{"model": "\u00e9"'.encode()])
def test_malformed_bodies_get_400(server: Server, payload: bytes) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=payload,
        headers={"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_prompt_over_the_context_length_is_refused_with_counts(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model=MODEL, prompt="hello " * 9000, max_tokens=5)
    message = caught.value.body["message"]  # type: ignore[index]
    assert "8192" in message
    assert "9001" in message or "9000" in message
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_unknown_model_is_404(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="gpt-9", messages=QUESTION)  # type: ignore[arg-type]
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_missing_and_unknown_keys_are_401(server: Server) -> None:
    missing = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    forged = server.key[:-4] + "AAAA"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=forged, max_retries=0).models.list()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-not-ours", max_retries=0).models.list()


def test_body_over_the_limit_is_413(server: Server) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {server.key}"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_one_request_id_end_to_end(server: Server) -> None:
    """The gateway's X-Request-ID comes back in the answer and is in the app's access-log line, with the id
    of the key that was used: a gateway line and an app line can be matched."""
    given = secrets.token_hex(16)
    headers = {"Authorization": f"Bearer {server.key}", "X-Request-ID": given}
    answered = httpx.post(
        f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}, headers=headers
    )
    assert answered.status_code == 200
    assert answered.headers["x-request-id"] == given
    # Without one, or with one that is not a plain token, the app makes its own (never echoing the header).
    for sent in ({}, {"X-Request-ID": "two words; and more"}, {"X-Request-ID": "x" * 200}):
        own = httpx.get(f"{server.url}/health", headers=sent).headers["x-request-id"]
        assert len(own) == 32 and int(own, 16) >= 0
    key_id = server.key.removeprefix("sk-pli-").partition("_")[0]
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("request_id") == given]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(mine) == 1, "the access-log line with the gateway's request id"
    assert mine[0]["route"] == "/v1/completions" and mine[0]["key_id"] == key_id


def test_health_and_ready_need_no_key(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert httpx.get(f"{server.url}/nope").status_code == 404


def test_both_engines_move_vllms_series_the_same_way(server: Server) -> None:
    """One accounting both backends feed (app/engine/accounting.py), under vLLM's metric names and labels:
    a request moves the series by what its usage says, whichever engine served it."""

    def series(name: str, **labels: str) -> float:
        return server.metric(name, model_name=MODEL, engine="0", **labels)

    counted = [
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
    ]
    reasons = ["stop", "length", "abort", "error"]
    before = {name: series(name) for name in counted}
    finished_before = {reason: series("vllm:request_success_total", finished_reason=reason) for reason in reasons}

    answer = server.client().completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", max_tokens=6, temperature=0
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None

    moved = {name: series(name) - before[name] for name in counted}
    assert moved["vllm:prompt_tokens_total"] == answer.usage.prompt_tokens
    assert moved["vllm:generation_tokens_total"] == answer.usage.completion_tokens
    assert moved["vllm:time_to_first_token_seconds_count"] == 1
    assert moved["vllm:e2e_request_latency_seconds_count"] == 1
    assert moved["vllm:request_queue_time_seconds_count"] == 1
    # One observation per engine step after the first; a step may bring several tokens.
    assert 1 <= moved["vllm:inter_token_latency_seconds_count"] <= answer.usage.completion_tokens - 1
    finished = {r: series("vllm:request_success_total", finished_reason=r) - finished_before[r] for r in reasons}
    assert finished == {"stop": 0, "length": 1, "abort": 0, "error": 0}
    assert series("vllm:num_requests_running") == 0
    assert series("vllm:num_requests_waiting") == 0
    assert server.metric("private_llm_state", state="ready") == 1
    assert server.metric("private_llm_state") == 1, "one state at a time"
    text = httpx.get(f"{server.url}/metrics").text
    assert 'private_llm_http_responses_total{route="/v1/completions",status="200"}' in text


def test_sixteen_concurrent_streams_are_batched(server: Server) -> None:
    steps_before = server.metric("private_llm_batch_size_count")
    seqs_before = server.metric("private_llm_batch_size_sum")
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)

    async def one(i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 20}."}],
            max_tokens=32,
            temperature=0,
            stream=True,
        )
        parts, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def all_of_them() -> list[tuple[str, str | None]]:
        return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(asyncio.wait_for(all_of_them(), timeout=240))
    assert len(results) == 16
    assert all(text and finish in {"stop", "length"} for text, finish in results)
    steps = server.metric("private_llm_batch_size_count") - steps_before
    sequences = server.metric("private_llm_batch_size_sum") - seqs_before
    mean_batch = sequences / steps
    assert mean_batch > 4, f"mean decode batch was {mean_batch:.2f}: requests were not batched"


def test_answers_given_together_equal_answers_given_alone(server: Server) -> None:
    """Prompts of different lengths (with and without a system prompt) admitted together are prefilled in
    one padded pass and decoded in one padded batch: padding, positions and masks must change nothing."""
    conversations = [
        [{"role": "user", "content": "Hi"}],
        QUESTION,
        [{"role": "system", "content": "Answer in one short sentence."}, *QUESTION],
        [{"role": "user", "content": "Name three rivers of Europe and the seas they flow into, with their lengths."}],
        [{"role": "user", "content": "Why is the sky blue?"}],
        [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write about rain."}],
    ]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)

    async def answer(messages: list[dict[str, str]]) -> str:
        reply = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=16,
            temperature=0,
        )
        return reply.choices[0].message.content or ""

    async def alone_then_together() -> tuple[list[str], list[str]]:
        alone = [await answer(messages) for messages in conversations]
        together = await asyncio.gather(*(answer(messages) for messages in conversations))
        return alone, list(together)

    alone, together = asyncio.run(asyncio.wait_for(alone_then_together(), timeout=240))
    assert all(alone)
    assert together == alone


def test_client_disconnect_frees_its_slot(server: Server) -> None:
    body = {**COUNTING, "max_tokens": 2000, "stream": True}
    answered_before = server.metric("vllm:request_success_total", finished_reason="stop") + server.metric(
        "vllm:request_success_total", finished_reason="length"
    )
    aborted_before = server.metric("vllm:request_success_total", finished_reason="abort")
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {server.key}"}, timeout=60
    ) as response:
        # Keep the line iterator alive: breaking out of a for-loop would close it, and with it the
        # connection, before the running gauge below is read.
        stream_lines = response.iter_lines()
        lines: list[str] = []
        while len(lines) < 3:
            line = next(stream_lines)
            if line:
                lines.append(line)
        running = server.metric("vllm:num_requests_running")
        assert running == 1, f"running={running}, lines={lines}"
    # Left the with-block: connection closed mid-stream.
    for _ in range(100):
        if server.metric("vllm:num_requests_running") == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert server.metric("vllm:num_requests_running") == 0
    answered = server.metric("vllm:request_success_total", finished_reason="stop") + server.metric(
        "vllm:request_success_total", finished_reason="length"
    )
    assert answered == answered_before, "the request ran to its end"
    assert server.metric("vllm:request_success_total", finished_reason="abort") == aborted_before + 1


def test_queue_overflow_is_429_with_retry_after(small_server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 60}
    headers = {"Authorization": f"Bearer {small_server.key}"}

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as client:
            return list(
                await asyncio.gather(
                    *(client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(4))
                )
            )

    responses = asyncio.run(fire())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2
    refused = [r for r in responses if r.status_code == 429]
    assert refused, statuses
    assert refused[0].headers["Retry-After"] == "3"
    assert refused[0].json()["error"]["code"] == "queue_full"
