"""Log probabilities through the answer guards: a token's goes out only once the text it spells has, so that
none tells of what a guard held back or cut off (the API suite checks log probabilities on a real model)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.engine import GenerationChunk, TokenLogprob
from app.safety import AnswerGuard, WordFilter
from app.serving.safety import guarded_answer

TOKENS = ["The", " file", " is", " top", " secret", " now", "."]


async def engine_stream(tokens: list[str]) -> AsyncIterator[GenerationChunk]:
    for index, token in enumerate(tokens):
        last = index == len(tokens) - 1
        yield GenerationChunk(
            text=token,
            logprobs=(TokenLogprob(token, -0.5),),
            finish_reason="stop" if last else None,
            prompt_tokens=3 if last else 0,
            completion_tokens=len(tokens) if last else 0,
        )


def through_guard(blocked: list[str]) -> list[GenerationChunk]:
    guard = AnswerGuard(WordFilter({"secrets": blocked}, []))

    async def collect() -> list[GenerationChunk]:
        return [chunk async for chunk in guarded_answer(engine_stream(TOKENS), [guard], prompt_tokens=3)]

    return asyncio.run(collect())


def test_every_token_goes_out_with_an_answer_nothing_cuts():
    chunks = through_guard(["classified"])
    assert "".join(c.text for c in chunks) == "".join(TOKENS)
    assert [t.token for c in chunks for t in c.logprobs] == TOKENS
    # Held back with the text the guard held back, never ahead of it.
    sent = 0
    spelled = 0
    for chunk in chunks:
        sent += len(chunk.text)
        spelled += sum(len(t.token) for t in chunk.logprobs)
        assert spelled <= sent


def test_no_token_of_a_cut_term_goes_out():
    chunks = through_guard(["top secret"])
    assert chunks[-1].finish_reason == "content_filter"
    answer = "".join(c.text for c in chunks)
    assert "top" not in answer and "secret" not in answer
    tokens = [t.token for c in chunks for t in c.logprobs]
    assert not {" top", " secret", " now", "."} & set(tokens)
    assert "".join(tokens) == answer[: len("".join(tokens))]
