"""Engine interface shared by the backends: what the API layer may ask of an engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]
# What ends an answer: an engine's reason, or content_filter when the serving pipeline's answer filter does.
AnswerFinishReason = Literal["stop", "length", "content_filter"]


class EngineError(Exception):
    """Base class of the errors an engine reports to the API layer."""


class QueueFullError(EngineError):
    """The waiting queue is at max_queued_requests."""


class EngineUnavailableError(EngineError):
    """The engine is loading, draining or has failed."""


class PromptError(EngineError):
    """The messages cannot be made into a prompt (the model's chat template refused them)."""


@dataclass(frozen=True)
class SamplingParams:
    """What decides each next token; the defaults change nothing. The meanings are vLLM's (top_k 0: off;
    repetition_penalty 1: off)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # None: no log probabilities; N: each generated token's, and its N most likely alternatives'.
    logprobs: int | None = None

    def penalises(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text and log probability (from the model's raw logits, as vLLM reports them), and
    the most likely tokens at its place, likeliest first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class GenerationChunk:
    """One step of a generation: new text, and on the last chunk the finish reason and token counts. With
    log probabilities asked for, those of the tokens generated since the chunk before (a token's text may
    come in a later chunk than its log probability: text is held back while it could still be a stop
    string or an unfinished character)."""

    text: str
    finish_reason: AnswerFinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


class HFTokenization:
    """Prompt encoding shared by the backends: both hold a Hugging Face tokenizer (vLLM's wraps one).

    Tokenizing is CPU work proportional to the input; the API layer runs it off the event loop, and first
    asks `fewest_tokens` whether the prompt could fit at all, which costs nothing."""

    _tokenizer: Any
    # Upper bound of the bytes of text one token stands for, and the fewest tokens the chat template adds
    # per message: set by `measure_tokenizer` when the engine starts.
    _bytes_per_token: int = 0
    _tokens_per_message: int = 0

    def has_chat_template(self) -> bool:
        return getattr(self._tokenizer, "chat_template", None) is not None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        from jinja2 import TemplateError

        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise PromptError(f"the model's chat template refused these messages: {exc}") from exc
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self._tokenizer(prompt)["input_ids"])

    def measure_tokenizer(self) -> None:
        # The longest text one token decodes to (often a run of spaces). A normaliser (NFKC, lower-casing)
        # may shrink the text before tokenizing, by up to about three times (a full-width letter's three
        # bytes become one): then the bound allows for that.
        decode = self._tokenizer.decode
        longest = max((len(decode([i]).encode("utf-8", "replace")) for i in range(len(self._tokenizer))), default=1)
        normalizer = getattr(getattr(self._tokenizer, "backend_tokenizer", None), "normalizer", None)
        probe = "\uff21\ufb01\u2460"  # full-width A, the fi ligature, a circled 1: what NFKC shrinks
        shrinks = normalizer is not None and normalizer.normalize_str(probe) != probe
        self._bytes_per_token = max(1, longest) * (3 if shrinks else 1)
        if self.has_chat_template():
            empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
            try:
                one = len(self.encode_chat(empty[:1]))
                three = len(self.encode_chat([*empty, empty[0]]))
                self._tokens_per_message = max(0, (three - one) // 2)
            except PromptError:
                self._tokens_per_message = 0

    def fewest_tokens(self, text_bytes: int, messages: int = 0) -> int:
        """A lower bound of the tokens a prompt of `text_bytes` bytes in `messages` chat messages takes."""
        per_token = self._bytes_per_token or text_bytes or 1
        return -(-text_bytes // per_token) + messages * self._tokens_per_message


class Engine(Protocol):
    model_name: str
    context_length: int

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def encode_prompt(self, prompt: str) -> list[int]: ...

    def has_chat_template(self) -> bool: ...

    def fewest_tokens(self, text_bytes: int, messages: int = 0) -> int: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def is_ready(self) -> bool: ...

    def failure(self) -> str | None: ...

    def busy_for(self) -> float: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]: ...
