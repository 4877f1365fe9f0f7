"""Each node's ledger rows form a hash chain: a row's hash covers its fields and the hash of the node's row
before it, so editing a row breaks its own hash and deleting one breaks the next row's link.

Deleting a node's newest rows leaves a shorter chain that still verifies: each flush logs the node's head
(row count and hash) to the journal, and `usage verify` prints the heads to compare with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The fields a row's hash covers, in this order; adding one needs a new chain version.
HASHED_FIELDS = (
    "request_id",
    "at_ms",
    "node",
    "tenant",
    "key_id",
    "model",
    "endpoint",
    "prompt_tokens",
    "completion_tokens",
    "status",
    "finish_reason",
    "ttft_ms",
    "latency_ms",
)


def row_hash(previous: str, fields: Mapping[str, Any]) -> str:
    canonical = json.dumps([fields[name] for name in HASHED_FIELDS], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{previous}\n{canonical}".encode()).hexdigest()


@dataclass(frozen=True)
class ChainBreak:
    node: str
    row_id: int
    kind: str  # "edited": the row's own hash; "unlinked": a row before it was deleted or rewritten

    def describe(self) -> str:
        if self.kind == "edited":
            return f"node {self.node}: row {self.row_id} was edited (its hash does not match its fields)"
        return f"node {self.node}: the chain breaks before row {self.row_id} (a row before it was deleted or rewritten)"


@dataclass(frozen=True)
class Head:
    node: str
    rows: int
    hash: str


def verify_chain(rows: Iterable[Mapping[str, Any]]) -> tuple[list[ChainBreak], list[Head]]:
    """Rows of every node in insertion order (by id): the first break of each node's chain, and each
    node's head."""
    previous: dict[str, str] = {}
    counts: dict[str, int] = {}
    broken: dict[str, ChainBreak] = {}
    for row in rows:
        node = row["node"]
        counts[node] = counts.get(node, 0) + 1
        expected_previous = previous.get(node, "")
        previous[node] = row["row_hash"]
        if node in broken:
            continue
        if row["prev_hash"] != expected_previous:
            broken[node] = ChainBreak(node, row["id"], "unlinked")
        elif row_hash(row["prev_hash"], row) != row["row_hash"]:
            broken[node] = ChainBreak(node, row["id"], "edited")
    heads = [Head(node, counts[node], previous[node]) for node in sorted(previous)]
    return list(broken.values()), heads
