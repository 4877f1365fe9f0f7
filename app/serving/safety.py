"""The pipeline's safety step. Prompts: personal data redacted before the model sees it, or the request
refused (pii_mode_prompt); a prompt holding a blocked term refused. Answers: passed through the answer
guards (sensitive words, then personal data per pii_mode_answer), which hold back only what they must,
and end the answer (and its generation) at a blocked term."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from app.api.errors import APIError
from app.api.services import Services
from app.engine import GenerationChunk, TokenLogprob
from app.metrics import Metrics
from app.safety import AnswerGuard, ContentFilter, Match
from app.safety.pii import PiiGuard, PiiKind, find_pii, redact
from app.settings import PiiMode


class StreamGuard(Protocol):
    def feed(self, text: str) -> tuple[str, object | None]: ...

    def finish(self, text: str = "") -> tuple[str, object | None]: ...


@dataclass(frozen=True)
class Safety:
    content_filter: ContentFilter | None
    pii_prompt: PiiMode
    pii_answer: PiiMode
    metrics: Metrics

    def _pii_seen(self, direction: str, action: str) -> Callable[[PiiKind], None]:
        def record(kind: PiiKind) -> None:
            self.metrics.pii_detections.labels(direction=direction, kind=kind, action=action).inc()

        return record

    async def screen_prompt(self, texts: list[str], param: str) -> list[str]:
        """The texts the model may see: as sent, or with their personal data redacted; a 400 when blocked."""
        if self.pii_prompt not in ("redact", "block"):
            return texts
        # A pass over every character of the prompt: off the event loop, as tokenizing is.
        found = await asyncio.to_thread(lambda: [find_pii(text) for text in texts])
        if self.pii_prompt == "block":
            kinds = sorted({item.kind for items in found for item in items})
            if kinds:
                record = self._pii_seen("prompt", "blocked")
                for kind in kinds:
                    record(kind)
                raise APIError(
                    400,
                    f"The request holds personal data ({', '.join(kinds)}), which this server does not accept.",
                    param=param,
                    code="pii_detected",
                )
            return texts
        record = self._pii_seen("prompt", "redacted")
        for item in (item for items in found for item in items):
            record(item.kind)
        return [redact(text, items) if items else text for text, items in zip(texts, found, strict=True)]

    async def refuse_blocked_prompt(self, texts: Sequence[str], param: str) -> None:
        content_filter = self.content_filter
        if content_filter is None or not content_filter.words:
            return
        words = content_filter.words
        match = await asyncio.to_thread(lambda: next(filter(None, map(words.find, texts)), None))
        if match is None:
            return
        content_filter.blocked("prompt", match.category)
        # The category, never the term: the answer must not teach how to get round the list.
        raise APIError(
            400,
            f"The request was refused by the content filter (category: {match.category}).",
            param=param,
            code="content_filter",
        )

    def answer_guards(self) -> list[StreamGuard]:
        guards: list[StreamGuard] = []
        if self.content_filter is not None and self.content_filter.words:
            guards.append(_Words(AnswerGuard(self.content_filter.words), self.content_filter))
        if self.pii_answer in ("redact", "block"):
            blocking = self.pii_answer == "block"
            on_found = self._pii_seen("answer", "blocked" if blocking else "redacted")
            guards.append(PiiGuard(blocking=blocking, on_found=on_found))
        return guards


@dataclass
class _Words:
    """The word guard, counting what it blocks."""

    guard: AnswerGuard
    content_filter: ContentFilter

    def feed(self, text: str) -> tuple[str, Match | None]:
        return self._counted(*self.guard.feed(text))

    def finish(self, text: str = "") -> tuple[str, Match | None]:
        return self._counted(*self.guard.finish(text))

    def _counted(self, text: str, match: Match | None) -> tuple[str, Match | None]:
        if match is not None:
            self.content_filter.blocked("answer", match.category)
        return text, match


def safety_of(services: Services) -> Safety:
    settings = services.settings
    return Safety(services.content_filter, settings.pii_mode_prompt, settings.pii_mode_answer, services.metrics)


def _through(guards: list[StreamGuard], text: str, last: bool) -> tuple[str, bool]:
    """`text` through each guard in turn; whether one of them ended the answer (the guards after it are
    finished with what it let through)."""
    stopped = False
    for guard in guards:
        text, stop = guard.finish(text) if last or stopped else guard.feed(text)
        stopped = stopped or stop is not None
    return text, stopped


class _ReleasedLogprobs:
    """Log probabilities follow the text the guards let out: a token's goes out once as much text as the
    tokens so far spell has been released, so that none tells of text a guard held back or cut off."""

    def __init__(self) -> None:
        self.pending: list[TokenLogprob] = []
        self.released_chars = 0
        self.spelled_chars = 0

    def after(self, logprobs: tuple[TokenLogprob, ...], released_text: str) -> tuple[TokenLogprob, ...]:
        self.pending.extend(logprobs)
        self.released_chars += len(released_text)
        ready = []
        while self.pending and self.spelled_chars + len(self.pending[0].token) <= self.released_chars:
            self.spelled_chars += len(self.pending[0].token)
            ready.append(self.pending.pop(0))
        return tuple(ready)


async def guarded_answer(
    stream: AsyncIterator[GenerationChunk], guards: list[StreamGuard], prompt_tokens: int
) -> AsyncIterator[GenerationChunk]:
    """The engine's chunks with their text passed through the guards. Held-back text goes out with a later
    chunk, so a chunk may carry no text. When a guard ends the answer, the last chunk has finish_reason
    content_filter, and closing the engine's stream ends the generation and frees its slot."""
    produced = 0
    logprobs = _ReleasedLogprobs()
    try:
        async for chunk in stream:
            if chunk.error is not None:
                yield chunk
                return
            produced += 1
            text, stopped = _through(guards, chunk.text, last=chunk.finish_reason is not None)
            released = logprobs.after(chunk.logprobs, text)
            if stopped:
                yield GenerationChunk(
                    text=text,
                    finish_reason="content_filter",
                    prompt_tokens=prompt_tokens,
                    completion_tokens=produced,
                    logprobs=released,
                )
                return
            if chunk.finish_reason is not None:
                # Nothing is held back any more: the answer is whole.
                released += tuple(logprobs.pending)
            yield GenerationChunk(
                text=text,
                finish_reason=chunk.finish_reason,
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.completion_tokens,
                logprobs=released,
            )
            if chunk.finish_reason is not None:
                return
    finally:
        # Both engines' streams are async generators, whose closing cancels the generation.
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
