"""The embedded model loaded once in this process, and engines over it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.engine import GenerationChunk
from app.engine.loader import LoadedModel, load_model
from app.engine.transformers_engine import TransformersEngine
from app.metrics import Metrics

CACHE = Path.home() / ".cache" / "private-llm" / "models"


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model("", cache_dir=CACHE, device="cpu", dtype="auto")


def engine_for(loaded: LoadedModel, **options: Any) -> TransformersEngine:
    return TransformersEngine(loaded, Metrics(), max_batch_size=8, max_queued_requests=8, **options)


async def collect(stream: AsyncIterator[GenerationChunk]) -> tuple[str, GenerationChunk]:
    parts, last = [], GenerationChunk(text="")
    async for chunk in stream:
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last
