"""Opening the database: a SQLite file (0600, its folder created) brought to the newest schema."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import Connection

_MIGRATIONS = str(Path(__file__).with_name("migrations"))


@dataclass(frozen=True)
class Database:
    engine: Engine

    def connect(self) -> Connection:
        return self.engine.connect()


def open_database(path: Path) -> Database:
    """The SQLite database at `path`, created when missing, its schema upgraded to the newest revision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The file holds key hashes: never readable by others, even for the moment before a chmod.
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(descriptor)
    path.chmod(0o600)
    # The default rollback journal, not WAL: the deployment runs `keys sync` as root, and WAL's -shm file
    # made by root would stay behind, unreadable by the service user.
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 10})
    database = Database(engine)
    upgrade(database)
    return database


def alembic_config(database: Database) -> Config:
    config = Config()
    config.set_main_option("script_location", _MIGRATIONS)
    config.attributes["engine"] = database.engine
    return config


def upgrade(database: Database) -> None:
    command.upgrade(alembic_config(database), "head")
