"""The usage ledger: one row per request, each node's rows chained by hash.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String, nullable=False),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("node", sa.String, nullable=False),
        sa.Column("tenant", sa.String, nullable=False),
        sa.Column("key_id", sa.String, nullable=False),
        sa.Column("model", sa.String, nullable=False),
        sa.Column("endpoint", sa.String, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("finish_reason", sa.String),
        sa.Column("ttft_ms", sa.Integer),
        sa.Column("latency_ms", sa.Integer, nullable=False),
        sa.Column("prev_hash", sa.String, nullable=False),
        sa.Column("row_hash", sa.String, nullable=False),
    )
    op.create_index("usage_at", "usage", ["at_ms"])
    op.create_index("usage_tenant_at", "usage", ["tenant", "at_ms"])
    op.create_index("usage_node_id", "usage", ["node", "id"])


def downgrade() -> None:
    op.drop_table("usage")
