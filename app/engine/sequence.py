"""One request in the transformers engine: its tokens, its stream of chunks, and the text it may send.

Text goes out as soon as it is final: an unfinished UTF-8 character and whatever could still grow into a
stop string are held back until the next token decides them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.engine import FinishReason, GenerationChunk, SamplingParams, TokenLogprob
from app.engine.accounting import RequestAccount
from app.engine.prefill import Prompt


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[GenerationChunk]
    account: RequestAccount
    generated: list[int] = field(default_factory=list)
    # Log probabilities of generated tokens not yet sent (they go with the next chunk).
    logprobs: list[TokenLogprob] = field(default_factory=list)
    emitted_chars: int = 0
    next_input: int = -1
    length: int = 0  # real (unpadded) tokens in the cache
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))

    def send(self, chunk: GenerationChunk) -> None:
        # A closed event loop (shutdown) raises: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, chunk)

    def send_text(self, text: str, **last: object) -> None:
        """Text (and, on the last chunk, its finish reason and counts) with the log probabilities so far."""
        logprobs, self.logprobs = tuple(self.logprobs), []
        self.send(GenerationChunk(text=text, logprobs=logprobs, **last))  # type: ignore[arg-type]

    def text_step(self, decode: Callable[[list[int]], str], room_left: bool) -> tuple[str, FinishReason | None]:
        """After a token joined `generated`: the text that may go out now, and why the answer ends here
        (a stop string, or no room left: max_tokens or the context) or None."""
        text = decode(self.generated)
        stops = self.params.stop
        if stops:
            search_from = max(0, self.emitted_chars - max(len(s) for s in stops))
            hits = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
            if hits:
                return self.tail(text[: min(hits)]), "stop"
        if not room_left or len(self.generated) >= self.params.max_tokens:
            return self.tail(text), "length"
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        if stops:
            safe = min(safe, len(text) - (max(len(s) for s in stops) - 1))
        if safe <= self.emitted_chars:
            return "", None
        out, self.emitted_chars = text[self.emitted_chars : safe], safe
        return out, None

    def tail(self, final_text: str) -> str:
        """What of the final text has not gone out yet."""
        return final_text[self.emitted_chars :] if len(final_text) > self.emitted_chars else ""


@dataclass(eq=False)
class Admission:
    """A sequence that holds a batch slot while its prompt is prefilled."""

    seq: Sequence
    prompt: Prompt


def torch_seed(seed: int) -> int:
    """The API takes any signed 64-bit seed; torch's generator takes 0 ... 2**64 - 1."""
    return seed % (1 << 64)
