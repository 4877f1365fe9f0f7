"""What a generation looks like on the wire, for chat and text completions alike: the whole answer as one
JSON object, or its events one by one. Built from the typed models in app/api/protocol.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FinishReason,
    TopLogprob,
    Usage,
)
from app.engine import GenerationChunk, TokenLogprob
from app.serving.requests import Prepared


def usage_of(chunk: GenerationChunk) -> Usage:
    return Usage(
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
    )


@dataclass
class Renderer:
    prepared: Prepared
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""
    _text_offset: int = 0

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.prepared.kind == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    # --- one answer ----------------------------------------------------------------------------------
    def answer(self, text: str, last: GenerationChunk, logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        reason: FinishReason = last.finish_reason or "stop"
        common = {"id": self.id, "created": self.created, "model": self.prepared.model, "usage": usage_of(last)}
        if self.prepared.kind == "chat":
            choice = ChatChoice(
                message=AssistantMessage(content=text), logprobs=self._chat_logprobs(logprobs), finish_reason=reason
            )
            return ChatCompletion(choices=[choice], **common).model_dump(mode="json")
        completion = CompletionChoice(text=text, logprobs=self._completion_logprobs(logprobs), finish_reason=reason)
        return Completion(choices=[completion], **common).model_dump(mode="json")

    # --- events --------------------------------------------------------------------------------------
    def opening(self) -> list[dict[str, Any]]:
        """Chat streams start by naming the role, as OpenAI's do."""
        if self.prepared.kind != "chat":
            return []
        return [self._chat_event(ChatDelta(role="assistant", content=""), None)]

    def delta(self, text: str, logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        if self.prepared.kind == "chat":
            return self._chat_event(ChatDelta(content=text), None, logprobs)
        return self._completion_event(text, None, logprobs)

    def closing(self, last: GenerationChunk) -> list[dict[str, Any]]:
        """The finishing event (with the last text for completions), then the usage event if asked for."""
        reason = last.finish_reason
        if self.prepared.kind == "chat":
            text_event = [self.delta(last.text, last.logprobs)] if last.text or last.logprobs else []
            events = [*text_event, self._chat_event(ChatDelta(), reason)]
        else:
            events = [self._completion_event(last.text, reason, last.logprobs)]
        if self.prepared.include_usage:
            usage = {"choices": [], "usage": usage_of(last).model_dump()}
            events.append(
                {
                    "id": self.id,
                    "object": events[-1]["object"],
                    "created": self.created,
                    "model": self.prepared.model,
                    **usage,
                }
            )
        return events

    def _chat_event(
        self, delta: ChatDelta, reason: FinishReason | None, logprobs: Sequence[TokenLogprob] = ()
    ) -> dict[str, Any]:
        choice = ChatChunkChoice(index=0, delta=delta, logprobs=self._chat_logprobs(logprobs), finish_reason=reason)
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.prepared.model, choices=[choice])
        return self._event(chunk.model_dump(mode="json", exclude_unset=True))

    def _completion_event(
        self, text: str, reason: FinishReason | None, logprobs: Sequence[TokenLogprob] = ()
    ) -> dict[str, Any]:
        choice = CompletionChoice(
            index=0, text=text, logprobs=self._completion_logprobs(logprobs), finish_reason=reason
        )
        chunk = Completion(id=self.id, created=self.created, model=self.prepared.model, choices=[choice])
        return self._event(chunk.model_dump(mode="json", exclude_unset=True))

    # --- log probabilities ---------------------------------------------------------------------------
    def _chat_logprobs(self, logprobs: Sequence[TokenLogprob]) -> ChatLogprobs | None:
        if self.prepared.params.logprobs is None:
            return None
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    **_top(item.token, item.logprob).model_dump(),
                    top_logprobs=[_top(token, logprob) for token, logprob in item.top],
                )
                for item in logprobs
            ]
        )

    def _completion_logprobs(self, logprobs: Sequence[TokenLogprob]) -> CompletionLogprobs | None:
        """The legacy form; text_offset counts on from the stream's earlier events."""
        if self.prepared.params.logprobs is None:
            return None
        offsets = []
        for item in logprobs:
            offsets.append(self._text_offset)
            self._text_offset += len(item.token)
        return CompletionLogprobs(
            tokens=[item.token for item in logprobs],
            token_logprobs=[_finite(item.logprob) for item in logprobs],
            top_logprobs=[{token: _finite(value) for token, value in item.top} for item in logprobs],
            text_offset=offsets,
        )

    def _event(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload["object"] = "chat.completion.chunk" if self.prepared.kind == "chat" else "text_completion"
        # Clients that asked for usage get `usage: null` on every event until the last.
        if self.prepared.include_usage:
            payload["usage"] = None
        return payload


# JSON has no -infinity: vLLM's server writes a token the model rules out as -9999.0, and so do we.
_LEAST_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, _LEAST_LOGPROB)


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=_finite(logprob), bytes=list(token.encode("utf-8")))
