"""The pipeline's safety step: a prompt holding a blocked term is refused before the engine sees it, and an
answer is passed through the answer filter, which ends it (and its generation) at a blocked term."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from app.api.errors import APIError
from app.engine import GenerationChunk
from app.safety import AnswerGuard, ContentFilter


async def refuse_blocked_prompt(content_filter: ContentFilter, texts: Sequence[str], param: str) -> None:
    words = content_filter.words
    if not words:
        return
    # Normalising is a pass over every character of the prompt: off the event loop, as tokenizing is.
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


async def filtered_answer(
    stream: AsyncIterator[GenerationChunk], content_filter: ContentFilter, prompt_tokens: int
) -> AsyncIterator[GenerationChunk]:
    """The engine's chunks with their text passed through the answer filter. Held-back text goes out with
    a later chunk; a chunk may so carry no text. On a blocked term the last chunk has finish_reason
    content_filter, and closing the engine's stream ends the generation and frees its slot."""
    guard = AnswerGuard(content_filter.words)
    produced = 0
    try:
        async for chunk in stream:
            if chunk.error is not None:
                yield chunk
                return
            produced += 1
            if chunk.finish_reason is None:
                text, match = guard.feed(chunk.text)
            else:
                text, match = guard.finish(chunk.text)
            if match is not None:
                content_filter.blocked("answer", match.category)
                yield GenerationChunk(
                    text=text, finish_reason="content_filter", prompt_tokens=prompt_tokens, completion_tokens=produced
                )
                return
            yield GenerationChunk(
                text=text,
                finish_reason=chunk.finish_reason,
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.completion_tokens,
            )
            if chunk.finish_reason is not None:
                return
    finally:
        # Both engines' streams are async generators, whose closing cancels the generation.
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
