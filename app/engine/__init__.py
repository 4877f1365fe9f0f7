"""Engine interface shared by the backends: what the API layer may ask of an engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]


class EngineError(Exception):
    """Base class of the errors an engine reports to the API layer."""


class QueueFullError(EngineError):
    """The waiting queue is at max_queued_requests."""


class EngineUnavailableError(EngineError):
    """The engine is loading, draining or has failed."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenerationChunk:
    """One step of a generation: new text, and on the last chunk the finish reason and token counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class HFTokenization:
    """Prompt encoding shared by the backends: both hold a Hugging Face tokenizer (vLLM's wraps one)."""

    _tokenizer: Any

    def has_chat_template(self) -> bool:
        return getattr(self._tokenizer, "chat_template", None) is not None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self._tokenizer(prompt)["input_ids"])


class Engine(Protocol):
    model_name: str
    context_length: int

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def encode_prompt(self, prompt: str) -> list[int]: ...

    def has_chat_template(self) -> bool: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def is_ready(self) -> bool: ...

    def failure(self) -> str | None: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]: ...
