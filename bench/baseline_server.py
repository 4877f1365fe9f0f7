"""Baseline for the benchmark: one request at a time through transformers' `generate`, behind FastAPI,
streaming OpenAI-style chat chunks. Same model, same chat template, greedy decoding."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import TextIteratorStreamer

from app.engine.loader import load_model


def build(cache_dir: Path) -> FastAPI:
    loaded = load_model("", cache_dir=cache_dir, device="auto", dtype="auto")
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body: dict[str, Any] = await request.json()
        ids = loaded.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        inputs = loaded.tokenizer(ids, return_tensors="pt", add_special_tokens=False)
        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)

        generated: list[int] = []

        def run() -> None:
            with lock, torch.inference_mode():  # one generation at a time: the point of the baseline
                output = loaded.model.generate(
                    **inputs, max_new_tokens=body.get("max_tokens", 64), do_sample=False, streamer=streamer
                )
            generated.append(int(output.shape[1] - inputs["input_ids"].shape[1]))

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        cid = f"chatcmpl-{uuid.uuid4().hex}"

        async def events() -> AsyncIterator[bytes]:
            iterator = iter(streamer)
            while True:
                text = await asyncio.to_thread(next, iterator, None)
                if text is None:
                    break
                if text:
                    chunk = {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": loaded.name,
                        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.to_thread(worker.join)
            usage = {
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "completion_tokens": generated[0],
                "total_tokens": int(inputs["input_ids"].shape[1]) + generated[0],
            }
            final = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": loaded.name,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(final)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8201)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "private-llm" / "models")
    args = parser.parse_args()
    uvicorn.run(build(args.cache_dir), host="127.0.0.1", port=args.port, log_level="warning")
