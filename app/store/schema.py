"""The tables as the code reads them; app/store/migrations/ is how a database gets there."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table

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
