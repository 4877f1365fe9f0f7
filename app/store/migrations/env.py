"""Alembic's entry: migrations run on the engine app/store/database.py hands over, never from an ini."""

from alembic import context
from sqlalchemy import text

# Nodes sharing one PostgreSQL start together: one migrates, the others wait for it, then see the head.
_MIGRATION_LOCK = 727_201

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    context.configure(connection=connection, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
