"""The tables as the code reads them; app/store/migrations/ is how a database gets there."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, LargeBinary, MetaData, String, Table

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String, primary_key=True),
    Column("name", String, nullable=False),
    Column("key_hash", String, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger),
    Column("tenant", String, nullable=False),
    # Keys loaded by the deployment ("deployed") are revoked when the vault no longer lists them; keys
    # made on the host ("cli") are the operator's.
    Column("source", String, nullable=False),
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("max_concurrent", Integer),
    Column("tokens_per_day", Integer),
    Column("expires_at", BigInteger),
    Column("last_used_at", BigInteger),
)

# One row per request (app/ledger); never prompt or completion text.
usage = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String, nullable=False),
    Column("at_ms", BigInteger, nullable=False),
    Column("node", String, nullable=False),
    Column("tenant", String, nullable=False),
    Column("key_id", String, nullable=False),
    Column("model", String, nullable=False),
    Column("endpoint", String, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("status", Integer, nullable=False),
    Column("finish_reason", String),
    Column("ttft_ms", Integer),
    Column("latency_ms", Integer, nullable=False),
    Column("prev_hash", String, nullable=False),
    Column("row_hash", String, nullable=False),
)

# The encrypted conversation archive (app/archive): each day's data key wrapped by a master key, records
# sealed with their day's key (no text in the clear), and every export made.
archive_data_keys = Table(
    "archive_data_keys",
    metadata,
    Column("day", String, primary_key=True),
    Column("master_kid", String, nullable=False),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

archive_records = Table(
    "archive_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String, nullable=False),
    Column("at_ms", BigInteger, nullable=False),
    Column("day", String, nullable=False),
    Column("node", String, nullable=False),
    Column("tenant", String, nullable=False),
    Column("key_id", String, nullable=False),
    Column("model", String, nullable=False),
    Column("endpoint", String, nullable=False),
    Column("finish_reason", String),
    Column("sealed", LargeBinary, nullable=False),
)

archive_exports = Table(
    "archive_exports",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at_ms", BigInteger, nullable=False),
    Column("exported_by", String, nullable=False),
    Column("tenant", String),
    Column("since_ms", BigInteger, nullable=False),
    Column("until_ms", BigInteger, nullable=False),
    Column("request_id", String),
    Column("records", Integer, nullable=False),
)
