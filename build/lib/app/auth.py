"""API keys: random bearer tokens, stored only as SHA-256 hashes in SQLite, checked in constant time.

The keys carry 256 bits of randomness, so a fast hash is the right tool (a password hash such as argon2
protects low-entropy secrets and would add tens of milliseconds to every request). Each key starts with a
public id, which finds the row; the hash comparison itself is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "sk-pli-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
)
"""


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    name: str
    created_at: int
    revoked_at: int | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return f"{KEY_PREFIX}{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def _split(key: str) -> tuple[str, str] | None:
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, _, secret = key[len(KEY_PREFIX) :].partition("_")
    if not key_id or not secret:
        return None
    return key_id, secret


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._prepared = False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self._prepare(), timeout=10)
        try:
            yield connection
            connection.commit()
        finally:
            connection.close()

    def _prepare(self) -> Path:
        """Create the database, its table and its 0600 mode once, not on every request's key check."""
        if not self._prepared:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch(mode=0o600, exist_ok=True)
            self.path.chmod(0o600)
            connection = sqlite3.connect(self.path, timeout=10)
            try:
                connection.execute(_SCHEMA)
                connection.commit()
            finally:
                connection.close()
            self._prepared = True
        return self.path

    def create(self, name: str) -> str:
        """Create a key and return it; this is the only time the plain key exists."""
        key = generate_key()
        key_id = key[len(KEY_PREFIX) :].partition("_")[0]
        with self._connect() as db:
            db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, NULL)", (key_id, name, hash_key(key), int(time.time()))
            )
        return key

    def import_hash(self, name: str, key_id: str, key_hash: str) -> bool:
        """Load a key known only by its hash (deployment from a vault). Returns True when it was new."""
        with self._connect() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO api_keys VALUES (?, ?, ?, ?, NULL)", (key_id, name, key_hash, int(time.time()))
            )
            return cursor.rowcount == 1

    def list(self) -> list[KeyRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT key_id, name, created_at, revoked_at FROM api_keys ORDER BY created_at"
            ).fetchall()
        return [KeyRecord(*row) for row in rows]

    def revoke(self, key_id_or_name: str) -> int:
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE (key_id = ? OR name = ?) AND revoked_at IS NULL",
                (int(time.time()), key_id_or_name, key_id_or_name),
            )
            return cursor.rowcount

    def active_count(self) -> int:
        if not self.path.exists():
            return 0
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0])

    def verify(self, key: str) -> KeyRecord | None:
        parts = _split(key)
        if parts is None:
            return None
        with self._connect() as db:
            row = db.execute(
                "SELECT key_id, name, created_at, revoked_at, key_hash FROM api_keys WHERE key_id = ?", (parts[0],)
            ).fetchone()
        if row is None or row[3] is not None:
            return None
        if not hmac.compare_digest(row[4], hash_key(key)):
            return None
        return KeyRecord(*row[:4])
