"""The encrypted conversation archive: a data key per day (wrapped by a master key), sealed records, and
the record of every export.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "archive_data_keys",
        sa.Column("day", sa.String, primary_key=True),
        sa.Column("master_kid", sa.String, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "archive_records",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String, nullable=False),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("day", sa.String, nullable=False),
        sa.Column("node", sa.String, nullable=False),
        sa.Column("tenant", sa.String, nullable=False),
        sa.Column("key_id", sa.String, nullable=False),
        sa.Column("model", sa.String, nullable=False),
        sa.Column("endpoint", sa.String, nullable=False),
        sa.Column("finish_reason", sa.String),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
    )
    op.create_index("archive_records_day", "archive_records", ["day"])
    op.create_index("archive_records_tenant_at", "archive_records", ["tenant", "at_ms"])
    op.create_index("archive_records_request", "archive_records", ["request_id"])
    op.create_table(
        "archive_exports",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("exported_by", sa.String, nullable=False),
        sa.Column("tenant", sa.String),
        sa.Column("since_ms", sa.BigInteger, nullable=False),
        sa.Column("until_ms", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.String),
        sa.Column("records", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("archive_exports")
    op.drop_table("archive_records")
    op.drop_table("archive_data_keys")
