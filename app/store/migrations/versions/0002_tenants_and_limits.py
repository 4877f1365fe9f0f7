"""Keys belong to a tenant and carry limits, an expiry and when they were last used.

Keys from before get the tenant "default" and the source "cli" (the operator's, never revoked by a
deployment); the first deployment after the upgrade marks the keys its vault lists as "deployed".

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


_ADDED = ("tenant", "source", "rpm", "tpm", "max_concurrent", "tokens_per_day", "expires_at", "last_used_at")


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.add_column(sa.Column("tenant", sa.String, nullable=False, server_default="default"))
        table.add_column(sa.Column("source", sa.String, nullable=False, server_default="cli"))
        for name in ("rpm", "tpm", "max_concurrent", "tokens_per_day"):
            table.add_column(sa.Column(name, sa.Integer))
        table.add_column(sa.Column("expires_at", sa.BigInteger))
        table.add_column(sa.Column("last_used_at", sa.BigInteger))
    op.create_index("api_keys_tenant", "api_keys", ["tenant"])


def downgrade() -> None:
    op.drop_index("api_keys_tenant", "api_keys")
    with op.batch_alter_table("api_keys") as table:
        for name in _ADDED[::-1]:
            table.drop_column(name)
