"""From a parsed request to what the engine runs: the prompt's token ids and the sampling parameters.

The checks that cost nothing come first (parameters the server does not implement, the model name, a
prompt too big to fit whatever its tokens): a 6 MB prompt is refused without being tokenized. The rest,
tokenizing and rendering the chat template, runs in a worker thread so that /health and every stream keep
being served while it works.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Literal

from app.api.errors import APIError
from app.api.protocol import ChatCompletionRequest, CompletionRequest
from app.engine import Engine, PromptError, SamplingParams
from app.engine.sampler import GREEDY_TEMPERATURE
from app.serving.safety import Safety

Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class Prepared:
    kind: Kind
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    # The prompt's texts as the model is given them (each message's content, or the prompt; personal data
    # redacted when pii_mode_prompt says so), for the content filter and the archive, and their parameter.
    texts: tuple[str, ...] = ()
    prompt_param: str = "messages"
    # Each text's role (user, system, ...; "prompt" for a completion), for the conversation archive.
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    """The server's own bounds on an answer (settings max_tokens_default and max_tokens_limit)."""

    default_max_tokens: int
    max_tokens_limit: int | None = None


async def prepare_chat(body: ChatCompletionRequest, engine: Engine, limits: Limits, safety: Safety) -> Prepared:
    _check_common(body, engine)
    if not engine.has_chat_template():
        raise APIError(400, "This model has no chat template; use /v1/completions.", param="messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    text_bytes = sum(len(m["content"].encode()) for m in messages)
    _refuse_if_it_cannot_fit(engine, engine.fewest_tokens(text_bytes, len(messages)), "messages")
    screened = await safety.screen_prompt([m["content"] for m in messages], "messages")
    messages = [{**m, "content": text} for m, text in zip(messages, screened, strict=True)]
    try:
        prompt_ids = await asyncio.to_thread(engine.encode_chat, messages)
    except PromptError as exc:
        raise APIError(400, f"Invalid 'messages': {exc}.", param="messages", code="invalid_value") from exc
    requested: int | None = body.max_tokens
    param = "max_tokens"
    if body.max_completion_tokens is not None:
        # The older name, when given too, must be valid as well.
        _refuse_if_over_the_context(engine, body.max_tokens, "max_tokens")
        requested, param = body.max_completion_tokens, "max_completion_tokens"
    prepared = _prepared("chat", body, engine, prompt_ids, requested, limits, "messages", param)
    return replace(prepared, texts=tuple(m["content"] for m in messages), roles=tuple(m["role"] for m in messages))


async def prepare_completion(body: CompletionRequest, engine: Engine, limits: Limits, safety: Safety) -> Prepared:
    _check_common(body, engine)
    prompt = body.prompt_text()
    _refuse_if_it_cannot_fit(engine, engine.fewest_tokens(len(prompt.encode())), "prompt")
    (prompt,) = await safety.screen_prompt([prompt], "prompt")
    prompt_ids = await asyncio.to_thread(engine.encode_prompt, prompt)
    if not prompt_ids:
        raise APIError(400, "The prompt is empty: it must hold a token.", param="prompt", code="invalid_value")
    prepared = _prepared("completion", body, engine, prompt_ids, body.max_tokens, limits, "prompt", "max_tokens")
    return replace(prepared, texts=(prompt,), prompt_param="prompt", roles=("prompt",))


def _check_common(body: ChatCompletionRequest | CompletionRequest, engine: Engine) -> None:
    unsupported = body.unsupported_set()
    if unsupported:
        raise APIError(
            400,
            f"The parameter '{unsupported[0]}' is not supported by this server.",
            param=unsupported[0],
            code="unsupported_parameter",
        )
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true.", param="stream_options")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs is only allowed with logprobs=true.", param="top_logprobs")
    if body.model != engine.model_name:
        raise APIError(
            404,
            f"The model '{body.model}' does not exist. This server serves '{engine.model_name}'.",
            param="model",
            code="model_not_found",
        )


def _refuse_if_it_cannot_fit(engine: Engine, fewest_tokens: int, param: str) -> None:
    if fewest_tokens >= engine.context_length:
        raise APIError(
            400,
            f"This model's maximum context length is {engine.context_length} tokens. However, your prompt "
            f"takes at least {fewest_tokens} tokens, which leaves no room for the completion.",
            param=param,
            code="context_length_exceeded",
        )


def _refuse_if_over_the_context(engine: Engine, requested: int | None, param: str) -> None:
    # OpenAI answers 400 when max_tokens alone exceeds the window; within it, clamp to what is left.
    if requested is not None and requested > engine.context_length:
        raise APIError(
            400,
            f"{param} is too large: {requested}. This model's maximum context length is "
            f"{engine.context_length} tokens.",
            param=param,
            code="context_length_exceeded",
        )


def _prepared(
    kind: Kind,
    body: ChatCompletionRequest | CompletionRequest,
    engine: Engine,
    prompt_ids: list[int],
    requested: int | None,
    limits: Limits,
    prompt_param: str,
    max_tokens_param: str,
) -> Prepared:
    limit = engine.context_length
    if len(prompt_ids) >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{len(prompt_ids)} tokens, which leaves no room for the completion.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    _refuse_if_over_the_context(engine, requested, max_tokens_param)
    temperature = 1.0 if body.temperature is None else body.temperature
    params = SamplingParams(
        max_tokens=min(
            requested if requested is not None else limits.default_max_tokens,
            limits.max_tokens_limit or limit,
            limit - len(prompt_ids),
        ),
        # Below this, sampling is greedy on both backends (the distribution is one-hot to float precision).
        temperature=0.0 if temperature < GREEDY_TEMPERATURE else temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logprobs=_logprobs(body),
    )
    return Prepared(
        kind=kind,
        model=engine.model_name,
        prompt_ids=prompt_ids,
        params=params,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


def _logprobs(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many alternatives each token's log probability comes with; None: no log probabilities."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs
