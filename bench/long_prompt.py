"""What running streams feel while a long prompt arrives: their inter-token latency (ITL) during its prefill.

For each configuration the app (transformers backend) is started on 127.0.0.1; four streams generate
long answers; once they run, a ~6 000-token prompt is sent, and one second later a 4-token request. The
gaps between the running streams' chunks while the long prompt is prefilled are the ITL samples.

- `one-pass`: --prefill-chunk-tokens 100000, the whole prompt in one forward pass (what the app did before)
- `chunked`: the default 512-token chunks between the running batch's decode steps

Writes bench/results/long-prompt.json and the table in bench/README.md (LONG PROMPT markers). Bounded:
six requests per configuration, each with a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import MODEL, ROOT, percentile, wait_ready  # the sibling benchmark's helpers

CONFIGURATIONS = {"one-pass": 100_000, "chunked": 512}
RUNNING_STREAMS = 4


def long_prompt(sentences: int) -> str:
    facts = " ".join(f"Fact {i}: the river number {i} flows into sea number {i % 7}." for i in range(sentences))
    return facts + " Which sea does river 3 flow into?"


async def stream(
    client: openai.AsyncOpenAI,
    content: str,
    max_tokens: int,
    arrivals: list[float],
    decoding: asyncio.Event | None = None,
) -> float:
    """Streams one chat answer, recording when each chunk with text arrives (and setting `decoding` at the
    fifth); returns the TTFT."""
    started = time.perf_counter()
    response = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    first = 0.0
    async for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            arrivals.append(now)
            first = first or now - started
            if decoding is not None and len(arrivals) == 5:
                decoding.set()
    return first


async def measure(url: str, key: str, prompt: str) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=900)
    runners: list[list[float]] = [[] for _ in range(RUNNING_STREAMS)]
    decoding = [asyncio.Event() for _ in runners]
    try:
        running = [
            asyncio.create_task(stream(client, "Count from 1 to 1000, comma separated.", 1500, arrivals, event))
            for arrivals, event in zip(runners, decoding, strict=True)
        ]
        await asyncio.gather(*(event.wait() for event in decoding))  # all four are decoding
        long_arrivals: list[float] = []
        sent = time.perf_counter()
        long_request = asyncio.create_task(stream(client, prompt, 8, long_arrivals))
        await asyncio.sleep(1.0)
        short_ttft = await stream(client, "Hi", 4, [])
        long_ttft = await long_request
        window_end = long_arrivals[0]
        gaps = [
            later - earlier
            for arrivals in runners
            for earlier, later in itertools.pairwise(arrivals)
            if later > sent and earlier < window_end
        ]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    finally:
        await client.close()
    return {
        "long_prompt_ttft_s": round(long_ttft, 2),
        "short_request_ttft_s": round(short_ttft, 2),
        "itl_samples": len(gaps),
        "itl_p50_s": round(percentile(gaps, 0.5), 3) if gaps else None,
        "itl_p99_s": round(percentile(gaps, 0.99), 3) if gaps else None,
        "itl_max_s": round(max(gaps), 3) if gaps else None,
        "itl_mean_s": round(statistics.fmean(gaps), 3) if gaps else None,
    }


def start(port: int, chunk_tokens: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    keys_db = workdir / "keys.db"
    key = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "keys",
            "create",
            "--name",
            "bench",
            "--tenant",
            "bench",
            "--keys-db",
            str(keys_db),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.strip()
    log = (workdir / f"server-{chunk_tokens}.log").open("wb")
    command = [sys.executable, "-m", "app", "serve", "--port", str(port), "--keys-db", str(keys_db)]
    command += ["--engine", "transformers", "--prefill-chunk-tokens", str(chunk_tokens), "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_ready(f"http://127.0.0.1:{port}", "/ready", process)
    return process, key


def markdown(results: dict[str, dict[str, Any]], prompt_tokens: int) -> str:
    lines = [
        f"Prompt of {prompt_tokens} tokens arriving while {RUNNING_STREAMS} streams decode:",
        "",
        "| prefill | running streams' ITL p50 / p99 / max s | long prompt TTFT s | 4-token request TTFT s |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['itl_p50_s']} / {r['itl_p99_s']} / {r['itl_max_s']} | {r['long_prompt_ttft_s']} | "
            f"{r['short_request_ttft_s']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=340, help="length of the long prompt (~18 tokens each)")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    prompt = long_prompt(args.sentences)
    results: dict[str, dict[str, Any]] = {}
    prompt_tokens = 0
    with tempfile.TemporaryDirectory(prefix="pli-bench-long-") as tmp:
        for name, chunk_tokens in CONFIGURATIONS.items():
            process, key = start(args.port, chunk_tokens, Path(tmp))
            try:
                url = f"http://127.0.0.1:{args.port}"
                usage = httpx.post(
                    f"{url}/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=900,
                ).json()["usage"]
                prompt_tokens = usage["prompt_tokens"]
                # A different prompt for the measurement: the one above now sits in the prefix cache.
                results[name] = asyncio.run(measure(url, key, "Again. " + prompt))
                print(name, results[name], flush=True)
            finally:
                process.terminate()
                process.wait(timeout=120)
    out = ROOT / "bench" / "results" / "long-prompt.json"
    out.write_text(json.dumps({"prompt_tokens": prompt_tokens, "results": results}, indent=2) + "\n")
    table = markdown(results, prompt_tokens)
    print(table)
    if not args.no_readme:
        readme = ROOT / "bench" / "README.md"
        text = readme.read_text()
        start_marker, end_marker = "<!-- LONG PROMPT START -->", "<!-- LONG PROMPT END -->"
        head, _, rest = text.partition(start_marker)
        _, _, tail = rest.partition(end_marker)
        readme.write_text(f"{head}{start_marker}\n{table}\n{end_marker}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
