"""Opening the database, brought to the newest schema: a SQLite file for a single node (0600, its folder
created), or a server (PostgreSQL) that several nodes share, named by a SQLAlchemy URL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError

_MIGRATIONS = str(Path(__file__).with_name("migrations"))


@dataclass(frozen=True)
class Database:
    engine: Engine

    def connect(self) -> Connection:
        return self.engine.connect()


def open_database(path: Path, url: str | None = None) -> Database:
    """The database at `url` when one is given, else the SQLite file at `path`; created when missing and
    upgraded to the newest revision."""
    database = _server(url) if url else _sqlite(path)
    upgrade(database)
    return database


def _sqlite(path: Path) -> Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The file holds key hashes: never readable by others, even for the moment before a chmod.
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(descriptor)
    path.chmod(0o600)
    # The default rollback journal, not WAL: the deployment runs `keys sync` as root, and WAL's -shm file
    # made by root would stay behind, unreadable by the service user.
    return Database(create_engine(f"sqlite:///{path}", connect_args={"timeout": 10}))


def server_url(url: str) -> URL:
    """The SQLAlchemy URL of a database server setting, or ValueError saying what is wrong with it."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError("not a database URL such as postgresql://user:password@host/db") from exc
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"only postgresql:// is supported (or none: the SQLite keys_db), not {parsed.drivername}")
    return parsed.set(drivername="postgresql+psycopg") if parsed.drivername == "postgresql" else parsed


def _server(url: str) -> Database:
    parsed = server_url(url)
    # pre_ping: a connection the server closed (restart, failover) is replaced instead of failing a request.
    return Database(create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=5))


def alembic_config(database: Database) -> Config:
    config = Config()
    config.set_main_option("script_location", _MIGRATIONS)
    config.attributes["engine"] = database.engine
    return config


def upgrade(database: Database) -> None:
    command.upgrade(alembic_config(database), "head")
