"""The transformers engine in-process, on the real embedded model: chunked prefill gives the same answers as
one pass and lets running streams go on; a failure is contained to the requests it hit, and an engine that
keeps failing stops and says so. Failures are injected with forward hooks on the real model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from app.engine import EngineUnavailableError, GenerationChunk, SamplingParams
from app.engine.loader import LoadedModel
from app.engine.transformers_engine import TransformersEngine
from tests.engine.conftest import collect, engine_for

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def long_prompt(engine: TransformersEngine, sentences: int) -> list[int]:
    text = " ".join(f"Fact {i}: the river number {i} flows into sea number {i % 7}." for i in range(sentences))
    return engine.encode_chat([{"role": "user", "content": text + " Which sea does river 3 flow into?"}])


@pytest.fixture
def hooks(loaded: LoadedModel) -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    handles: list[torch.utils.hooks.RemovableHandle] = []
    yield handles
    for handle in handles:
        handle.remove()


def test_chunked_prefill_answers_as_one_pass_does(loaded: LoadedModel) -> None:
    async def answers(chunk_tokens: int) -> list[str]:
        engine = engine_for(loaded, prefill_chunk_tokens=chunk_tokens)
        await engine.start()
        try:
            prompt = long_prompt(engine, 25)
            first = await collect(engine.generate(prompt, GREEDY))
            # The same prompt again: its prefix comes from the prefix cache, the rest in chunks.
            again = await collect(engine.generate(prompt[:-3] + prompt[-3:], GREEDY))
            return [first[0], again[0]]
        finally:
            await engine.shutdown()

    one_pass = asyncio.run(answers(4096))
    chunked = asyncio.run(answers(32))
    assert len(long_prompt(engine_for(loaded), 25)) > 10 * 32, "the prompt must take many chunks"
    assert chunked == one_pass
    assert one_pass[0]


def test_running_streams_get_tokens_while_a_long_prompt_is_prefilled(loaded: LoadedModel) -> None:
    """Counted in engine turns, not seconds: each turn prefills one chunk and decodes one token for every
    running stream, so a 1500-token prompt in 64-token chunks lets a running stream advance ~20 times."""

    async def scenario() -> tuple[int, int]:
        engine = engine_for(loaded, prefill_chunk_tokens=64)
        await engine.start()
        try:
            counting = engine.generate(engine.encode_prompt("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"), SamplingParams(500, 0.0))
            for _ in range(3):  # running
                await anext(counting)
            prompt = long_prompt(engine, 80)
            during = asyncio.Event()
            tokens_during_prefill = 0

            async def read_counting() -> None:
                nonlocal tokens_during_prefill
                async for _ in counting:
                    if not during.is_set():
                        tokens_during_prefill += 1

            reader = asyncio.create_task(read_counting())
            await anext(engine.generate(prompt, GREEDY))
            during.set()
            reader.cancel()
            return tokens_during_prefill, len(prompt)
        finally:
            await engine.shutdown()

    tokens, prompt_length = asyncio.run(scenario())
    assert prompt_length > 1000
    assert tokens >= (prompt_length // 64) // 2, f"{tokens} tokens while {prompt_length} prompt tokens were prefilled"


def test_a_request_without_a_valid_distribution_fails_alone(loaded: LoadedModel, hooks: list[Any]) -> None:
    engine = engine_for(loaded)
    poisoned = engine.encode_prompt(" unicorn")[-1]
    last_inputs: dict[str, torch.Tensor] = {}

    def remember_inputs(_: Any, args: Any, kwargs: dict[str, Any]) -> None:
        last_inputs["ids"] = kwargs["input_ids"][:, -1]

    def poison_rows(_: Any, __: Any, logits: torch.Tensor) -> torch.Tensor:
        rows = (last_inputs["ids"] == poisoned).nonzero().flatten()
        logits[rows] = float("nan")
        return logits

    hooks.append(loaded.model.register_forward_pre_hook(remember_inputs, with_kwargs=True))
    hooks.append(loaded.model.lm_head.register_forward_hook(poison_rows))

    async def scenario() -> tuple[GenerationChunk, str]:
        await engine.start()
        try:
            bad = engine.generate(engine.encode_prompt("Tell me about a unicorn"), GREEDY)
            good = engine.generate(engine.encode_prompt("The capital of France is"), GREEDY)
            (_, bad_last), (good_text, good_last) = await asyncio.gather(collect(bad), collect(good))
            assert good_last.finish_reason is not None
            return bad_last, good_text
        finally:
            await engine.shutdown()

    bad_last, good_text = asyncio.run(scenario())
    assert bad_last.error is not None and "non-finite" in bad_last.error
    assert good_text
    assert engine.failure() is None


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(loaded: LoadedModel, hooks: list[Any]) -> None:
    engine = engine_for(loaded)
    failures_left = [0]

    def fail_when_armed(*_: Any) -> None:
        if failures_left[0] > 0:
            failures_left[0] -= 1
            raise RuntimeError("injected failure")

    hooks.append(loaded.model.register_forward_pre_hook(fail_when_armed))

    async def scenario() -> tuple[GenerationChunk, tuple[str, GenerationChunk]]:
        await engine.start()
        try:
            failures_left[0] = 1
            _, failed = await collect(engine.generate(engine.encode_prompt("Hello there"), GREEDY))
            after = await collect(engine.generate(engine.encode_prompt("The capital of France is"), GREEDY))
            return failed, after
        finally:
            await engine.shutdown()

    failed, (text, last) = asyncio.run(scenario())
    assert failed.error is not None and "RuntimeError" in failed.error
    assert text and last.finish_reason is not None
    assert engine.failure() is None


def test_steps_that_keep_failing_stop_the_engine(loaded: LoadedModel, hooks: list[Any]) -> None:
    engine = engine_for(loaded)
    armed = threading.Event()

    def fail_when_armed(*_: Any) -> None:
        if armed.is_set():
            raise RuntimeError("device lost")

    hooks.append(loaded.model.register_forward_pre_hook(fail_when_armed))

    async def scenario() -> list[GenerationChunk]:
        await engine.start()
        try:
            armed.set()
            finals = []
            for i in range(3):  # one failed step each, in a row
                assert engine.failure() is None, f"stopped after {i} failures"
                finals.append((await collect(engine.generate(engine.encode_prompt(f"Request {i}"), GREEDY)))[1])
            with pytest.raises(EngineUnavailableError):
                engine.generate(engine.encode_prompt("after"), GREEDY)
            return finals
        finally:
            await engine.shutdown()

    finals = asyncio.run(scenario())
    assert all(last.error for last in finals), finals
    assert engine.failure() == "engine failure: RuntimeError"
