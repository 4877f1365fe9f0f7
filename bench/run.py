"""Load benchmark over the OpenAI API: fixed prompts, greedy decoding, concurrency 1/4/16/32.

Starts each server under test on 127.0.0.1, drives it with the official async `openai` client, and writes
bench/results/latest.json plus the markdown table in bench/README.md (between the RESULTS markers).
Bounded: every level sends a fixed number of requests and every request has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Explain how a bicycle works.",
    "Describe the water cycle.",
    "Give three tips for learning to cook.",
    "What makes a good night's sleep?",
    "Write a short story about a cat.",
    "Why is the sky blue?",
    "How do plants make food?",
    "Describe a busy city market.",
]
MODEL = "smollm2-135m-instruct"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and not first:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - started, "ttft": first, "tokens": tokens}


async def level(url: str, key: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
    queue = list(range(requests))
    results: list[dict[str, float]] = []

    async def worker() -> None:
        while queue:
            i = queue.pop()
            results.append(await one_request(client, PROMPTS[i % len(PROMPTS)], max_tokens))

    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=1800)
    finally:
        await client.close()
    elapsed = time.perf_counter() - started
    latencies = [r["latency"] for r in results]
    ttfts = [r["ttft"] for r in results]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(results) / elapsed, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in results) / elapsed, 1),
        "mean_tokens": round(statistics.mean(r["tokens"] for r in results), 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 2),
        "latency_p99_s": round(percentile(latencies, 0.99), 2),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 2),
        "ttft_p99_s": round(percentile(ttfts, 0.99), 2),
    }


def wait_ready(url: str, path: str, process: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code in (200, 405):
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready")


VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# vLLM on CPU keeps one core for itself by default; on a 2-core machine it gets both, like the others.
VLLM_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1"}


def start(kind: str, port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = (workdir / f"{kind}.log").open("wb")
    if kind == "baseline":
        cmd = [sys.executable, str(ROOT / "bench" / "baseline_server.py"), "--port", str(port)]
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        wait_ready(f"http://127.0.0.1:{port}", "/v1/chat/completions", process)
        return process, "unused"
    if kind == "vllm-serve":
        # Plain `vllm serve` on the same model folder the app serves (the embedded model, converted once).
        from app.engine.loader import resolve_model_folder
        from app.settings import Settings

        folder, name = resolve_model_folder("", cache_dir=Settings().model_cache_dir)
        cmd = [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(folder),
            "--served-model-name",
            name,
            "--dtype",
            "float32",
            "--max-num-seqs",
            "32",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **VLLM_ENV}, cwd=ROOT)
        wait_ready(f"http://127.0.0.1:{port}", "/health", process)
        return process, "unused"
    # The app, with either backend. The key database stays out of the repository: a temporary directory.
    python = str(VLLM_PYTHON) if kind == "vllm" else sys.executable
    keys_db = Path(tempfile.mkdtemp(prefix="pli-bench-")) / "keys.db"
    key = subprocess.run(
        [python, "-m", "app", "keys", "create", "--name", "bench", "--tenant", "bench", "--keys-db", str(keys_db)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.strip()
    cmd = [
        python,
        "-m",
        "app",
        "serve",
        "--port",
        str(port),
        "--keys-db",
        str(keys_db),
        "--engine",
        kind,
        "--max-batch-size",
        "32",
        "--max-queued-requests",
        "256",
        "--log-level",
        "warning",
    ]
    extra_env = {**VLLM_ENV} if kind == "vllm" else {}
    if kind == "vllm":
        cmd += ["--cpu-kv-cache-gib", VLLM_ENV["VLLM_CPU_KVCACHE_SPACE"]]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **extra_env}, cwd=ROOT)
    wait_ready(f"http://127.0.0.1:{port}", "/ready", process)
    return process, key


def markdown(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| server | concurrency | requests | req/s | tokens/s | mean tokens | latency p50 / p99 s | TTFT p50 / p99 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for server, rows in results.items():
        for r in rows:
            lines.append(
                f"| {server} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']} | "
                f"{r['tokens_per_s']} | {r['mean_tokens']} | {r['latency_p50_s']} / {r['latency_p99_s']} | "
                f"{r['ttft_p50_s']} / {r['ttft_p99_s']} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=["baseline", "transformers", "vllm", "vllm-serve"],
        default=["baseline", "transformers", "vllm", "vllm-serve"],
        help="vllm and vllm-serve need `make venv-vllm`",
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 32])
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: 2 x concurrency, at least 8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--no-readme",
        action="store_true",
        help="a trial run: leave bench/README.md and results/latest.json alone, write results/trial.json",
    )
    args = parser.parse_args()
    workdir = ROOT / "bench" / "results"
    workdir.mkdir(exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.servers}
    # Every server is up for the whole run and the servers take turns at each level, so a slow patch of a
    # shared machine hits all of them rather than whichever happened to run then. Idle servers cost nothing.
    servers: dict[str, tuple[subprocess.Popen[bytes], str, str]] = {}
    try:
        for offset, kind in enumerate(args.servers):
            process, key = start(kind, 8201 + offset, workdir)
            servers[kind] = (process, key, f"http://127.0.0.1:{8201 + offset}")
        for c in args.concurrency:
            n = args.requests_per_level or max(8, 2 * c)
            for kind, (_, key, url) in servers.items():
                row = asyncio.run(level(url, key, c, n, args.max_tokens))
                print(json.dumps({"server": kind, **row}), flush=True)
                results[kind].append(row)
    finally:
        for process, _, _ in servers.values():
            process.terminate()
        for process, _, _ in servers.values():
            process.wait(60)
    output = workdir / ("trial.json" if args.no_readme else "latest.json")
    output.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    readme = ROOT / "bench" / "README.md"
    if not args.no_readme and readme.exists():
        text = readme.read_text()
        start_marker, end_marker = "<!-- RESULTS START -->", "<!-- RESULTS END -->"
        if start_marker in text and end_marker in text:
            head, rest = text.split(start_marker, 1)
            _, tail = rest.split(end_marker, 1)
            readme.write_text(f"{head}{start_marker}\n{table}\n{end_marker}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
