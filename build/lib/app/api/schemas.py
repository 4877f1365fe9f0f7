"""Request models of the OpenAI API subset we serve. Unknown fields are refused (extra="forbid")."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

# Accepted by OpenAI, not implemented here: declared with this type so a client that sets one gets a 400
# naming it (see unsupported_set), rather than "unrecognized argument".
_UNSUPPORTED = "unsupported"
Unsupported = Annotated[Any, _UNSUPPORTED]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def unsupported_set(self) -> list[str]:
        """The unsupported parameters this request sets (null and false count as unset)."""
        return [
            name
            for name, info in type(self).model_fields.items()
            if _UNSUPPORTED in info.metadata and getattr(self, name) not in (None, False)
        ]


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None


class _Common(_Strict):
    model: StrictStr
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stop: Stop = None
    seed: StrictInt | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None

    tools: Unsupported = None
    tool_choice: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    parallel_tool_calls: Unsupported = None
    logprobs: Unsupported = None
    top_logprobs: Unsupported = None
    response_format: Unsupported = None
    logit_bias: Unsupported = None
    metadata: Unsupported = None
    store: Unsupported = None
    service_tier: Unsupported = None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    audio: Unsupported = None
    modalities: Unsupported = None
    prediction: Unsupported = None
    reasoning_effort: Unsupported = None
    web_search_options: Unsupported = None


class CompletionRequest(_Common):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
    suffix: Unsupported = None
    echo: Unsupported = None
    best_of: Unsupported = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
