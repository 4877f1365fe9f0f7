"""What the sensitive-word filter costs: 50 000 terms, a 4 000-character answer streamed in engine-sized
chunks through the answer filter, and the same answer checked whole as a prompt. Target: under 1 ms per
1 000 characters. Writes bench/results/content-filter.json.

Usage: .venv/bin/python bench/content_filter.py [--terms 50000] [--chars 4000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from app.safety import AnswerGuard, WordFilter

RESULTS = Path(__file__).resolve().parent / "results" / "content-filter.json"
# Mixed Chinese and English text, as the answers of the sites this is for.
HAN = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同"
    "工也能下过子说产种面而方后多定行学法所民得经"
)
LATIN = "abcdefghijklmnopqrstuvwxyz"


def terms(count: int, rng: random.Random) -> list[str]:
    chosen: set[str] = set()
    while len(chosen) < count:
        if rng.random() < 0.7:
            chosen.add("".join(rng.choice(HAN) for _ in range(rng.randint(2, 6))))
        else:
            chosen.add("".join(rng.choice(LATIN) for _ in range(rng.randint(5, 12))))
    return sorted(chosen)


def answer(chars: int, words: WordFilter, rng: random.Random) -> str:
    """Text of about `chars` characters holding no term (one that would would end the stream early)."""
    parts: list[str] = []
    while sum(map(len, parts)) < chars:
        if rng.random() < 0.5:
            piece = "".join(rng.choice(HAN) for _ in range(rng.randint(4, 16))) + "，"
        else:
            piece = " ".join("".join(rng.choice(LATIN) for _ in range(rng.randint(2, 8))) for _ in range(3)) + ". "
        if words.find("".join(parts[-2:]) + piece) is None:
            parts.append(piece)
    return "".join(parts)[:chars]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--terms", type=int, default=50_000)
    parser.add_argument("--chars", type=int, default=4_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--chunk-chars", type=int, default=3, help="characters per engine chunk (about a token)")
    args = parser.parse_args()
    rng = random.Random(0)

    started = time.perf_counter()
    words = WordFilter({"bench": terms(args.terms, rng)})
    compile_s = time.perf_counter() - started
    text = answer(args.chars, words, rng)
    chunks = [text[i : i + args.chunk_chars] for i in range(0, len(text), args.chunk_chars)]

    streamed, whole = [], []
    for _ in range(args.rounds):
        guard = AnswerGuard(words)
        started = time.perf_counter()
        released = "".join(guard.feed(chunk)[0] for chunk in chunks) + guard.finish()[0]
        streamed.append(time.perf_counter() - started)
        assert released == text, "the answer filter changed an answer that holds no term"
        started = time.perf_counter()
        assert words.find(text) is None
        whole.append(time.perf_counter() - started)

    per_1000 = {
        "answer_stream_ms_per_1000_chars": round(statistics.median(streamed) * 1000 / len(text) * 1000, 3),
        "prompt_ms_per_1000_chars": round(statistics.median(whole) * 1000 / len(text) * 1000, 3),
    }
    result = {
        "terms": words.blocked_terms,
        "longest_term": words.longest_term,
        "answer_chars": len(text),
        "chunks": len(chunks),
        "rounds": args.rounds,
        "compile_s": round(compile_s, 3),
        **per_1000,
        "target_ms_per_1000_chars": 1.0,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
