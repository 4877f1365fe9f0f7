"""Request and response models of the OpenAI API subset we serve.

Requests refuse unknown fields (extra="forbid") and every malformed value with a 400 naming the parameter:
numbers are never booleans, strings never hold lone UTF-16 surrogates (valid JSON, but not text any
tokenizer can take), seeds fit 64 bits. What the schema promises is what the server accepts, so the
OpenAPI description is a contract a fuzzer can hold us to (`tests/api_contract`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr
from pydantic.json_schema import SkipJsonSchema

# Accepted by OpenAI, not implemented here: a client that sets one gets a 400 naming it (unsupported_set)
# rather than "unrecognized argument". Left out of the schema, which lists only what works.
_UNSUPPORTED = "unsupported"
Unsupported = Annotated[SkipJsonSchema[Any], _UNSUPPORTED]


def _text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair): not text") from None
    return value


def _not_a_boolean(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _integer(value: object) -> object:
    # JSON Schema's integers include 5.0; booleans and strings are not numbers at all.
    if isinstance(value, bool | str):
        raise ValueError("must be an integer")
    return value


Text = Annotated[StrictStr, AfterValidator(_text)]
# Field before the validator: the other order leaves the bounds out of the JSON schema.
Temperature = Annotated[float, Field(ge=0.0, le=2.0), BeforeValidator(_not_a_boolean)]
TopP = Annotated[float, Field(gt=0.0, le=1.0), BeforeValidator(_not_a_boolean)]
# OpenAI's range; what vLLM accepts too.
Penalty = Annotated[float, Field(ge=-2.0, le=2.0), BeforeValidator(_not_a_boolean)]
# vLLM's extras. repetition_penalty divides positive logits and multiplies negative ones: bounded so that
# neither can overflow to infinity.
TopK = Annotated[int, Field(ge=-1, le=2**31 - 1, description="0 or -1: off."), BeforeValidator(_integer)]
MinP = Annotated[float, Field(ge=0.0, le=1.0), BeforeValidator(_not_a_boolean)]
RepetitionPenalty = Annotated[
    float,
    Field(ge=0.01, le=10.0, description="1: off; above 1 discourages repeating a token."),
    BeforeValidator(_not_a_boolean),
]
SEED_RANGE = (-(2**63), 2**63 - 1)
Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1]), BeforeValidator(_integer)]
MaxTokens = Annotated[int, Field(ge=1), BeforeValidator(_integer)]
Stop = Text | Annotated[list[Text], Field(max_length=4)] | None


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
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


def _only_with(option: str, option_type: str, flag: str) -> dict[str, Any]:
    """JSON Schema for "`option`, when set, needs `flag`: true"."""
    return {
        "if": {"required": [option], "properties": {option: {"type": option_type}}},
        "then": {"required": [flag], "properties": {flag: {"const": True}}},
    }


class _Common(_Strict):
    # stream_options only with stream=true, said in the schema as well as checked.
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"allOf": [_only_with("stream_options", "object", "stream")]}
    )

    model: Text
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    stop: Stop = None
    seed: Seed | None = None
    n: Annotated[int, Field(ge=1, le=1, description="Only 1 is supported."), BeforeValidator(_integer)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = Field(default=None, description="Only with stream=true.")
    user: Text | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None

    tools: Unsupported = None
    tool_choice: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    parallel_tool_calls: Unsupported = None
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
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "allOf": [
                _only_with("stream_options", "object", "stream"),
                _only_with("top_logprobs", "integer", "logprobs"),
            ]
        },
    )

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: StrictBool | None = None
    top_logprobs: (
        Annotated[int, Field(ge=0, le=20, description="Only with logprobs=true."), BeforeValidator(_integer)] | None
    ) = None
    audio: Unsupported = None
    modalities: Unsupported = None
    prediction: Unsupported = None
    reasoning_effort: Unsupported = None
    web_search_options: Unsupported = None


# A prompt must hold a token: an empty one cannot be prefilled.
PromptText = Annotated[Text, Field(min_length=1)]


class CompletionRequest(_Common):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5), BeforeValidator(_integer)] | None = None
    suffix: Unsupported = None
    echo: Unsupported = None
    best_of: Unsupported = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# --- responses ---------------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "content_filter"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (`data: {...}`; the stream ends with
    `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A text completion, and also each event of a streamed one (then without usage until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "private-llm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str


class TokenRequest(_Strict):
    expires_in: int | None = Field(default=None, ge=60, description="seconds; at most the server's maximum")


class AccessToken(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (a scheme name, not a secret)
    expires_in: int
