"""The usage ledger: one row per request (never its text) for billing and audit, written off the hot path
in batches, each node's rows a hash chain that `python -m app usage verify` checks."""

from app.ledger.chain import ChainBreak, row_hash, verify_chain
from app.ledger.writer import UsageLedger, UsageRecord

__all__ = ["ChainBreak", "UsageLedger", "UsageRecord", "row_hash", "verify_chain"]
