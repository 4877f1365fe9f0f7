"""The app's database (API keys; the usage ledger joins it): SQLAlchemy Core over one URL, its schema
versioned by Alembic migrations that every entry point applies before use (`open_database`)."""

from app.store.database import Database, open_database

__all__ = ["Database", "open_database"]
