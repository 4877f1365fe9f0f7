"""What a generation looks like on the wire, for chat and text completions alike: the whole answer as one
JSON object, or its events one by one. Built from the typed models in app/api/protocol.py."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    FinishReason,
    Usage,
)
from app.engine import GenerationChunk
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

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.prepared.kind == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    # --- one answer ----------------------------------------------------------------------------------
    def answer(self, text: str, last: GenerationChunk) -> dict[str, Any]:
        reason: FinishReason = last.finish_reason or "stop"
        common = {"id": self.id, "created": self.created, "model": self.prepared.model, "usage": usage_of(last)}
        if self.prepared.kind == "chat":
            choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)
            return ChatCompletion(choices=[choice], **common).model_dump(mode="json")
        return Completion(choices=[CompletionChoice(text=text, finish_reason=reason)], **common).model_dump(mode="json")

    # --- events --------------------------------------------------------------------------------------
    def opening(self) -> list[dict[str, Any]]:
        """Chat streams start by naming the role, as OpenAI's do."""
        if self.prepared.kind != "chat":
            return []
        return [self._chat_event(ChatDelta(role="assistant", content=""), None)]

    def delta(self, text: str) -> dict[str, Any]:
        if self.prepared.kind == "chat":
            return self._chat_event(ChatDelta(content=text), None)
        return self._completion_event(text, None)

    def closing(self, last: GenerationChunk) -> list[dict[str, Any]]:
        """The finishing event (with the last text for completions), then the usage event if asked for."""
        reason = last.finish_reason
        if self.prepared.kind == "chat":
            events = ([self.delta(last.text)] if last.text else []) + [self._chat_event(ChatDelta(), reason)]
        else:
            events = [self._completion_event(last.text, reason)]
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

    def _chat_event(self, delta: ChatDelta, reason: FinishReason | None) -> dict[str, Any]:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.prepared.model,
            choices=[ChatChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=reason)],
        )
        return self._event(chunk.model_dump(mode="json", exclude_unset=True))

    def _completion_event(self, text: str, reason: FinishReason | None) -> dict[str, Any]:
        chunk = Completion(
            id=self.id,
            created=self.created,
            model=self.prepared.model,
            choices=[CompletionChoice(index=0, text=text, logprobs=None, finish_reason=reason)],
        )
        return self._event(chunk.model_dump(mode="json", exclude_unset=True))

    def _event(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload["object"] = "chat.completion.chunk" if self.prepared.kind == "chat" else "text_completion"
        # Clients that asked for usage get `usage: null` on every event until the last.
        if self.prepared.include_usage:
            payload["usage"] = None
        return payload
