"""API keys: random bearer tokens, stored only as SHA-256 hashes, checked in constant time.

The keys carry 256 bits of randomness, so a fast hash is the right tool (a password hash such as argon2
protects low-entropy secrets and would add tens of milliseconds to every request). Each key starts with a
public id, which finds the row; the hash comparison itself is constant-time.

A key is looked up in the database at most every KEY_CACHE_S seconds per key: a revoked or expired key
is refused within that time on every node that shares the database.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import func, insert, select, update

from app.store import Database
from app.store.schema import api_keys

KEY_PREFIX = "sk-pli-"
KEY_CACHE_S = 5.0
# last_used_at is written at most this often per key: the hot path must not write on every request.
LAST_USED_RESOLUTION_S = 60

Source = Literal["cli", "deployed"]
KeyState = Literal["active", "revoked", "expired"]


@dataclass(frozen=True)
class KeyLimits:
    """Per-key quotas; None is unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    tokens_per_day: int | None = None

    def describe(self) -> str:
        parts = [f"{name}={value}" for name, value in vars(self).items() if value is not None]
        return ",".join(parts) or "unlimited"


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    name: str
    tenant: str
    created_at: int
    revoked_at: int | None = None
    expires_at: int | None = None
    last_used_at: int | None = None
    source: Source = "cli"
    limits: KeyLimits = field(default_factory=KeyLimits)

    def state(self, now: float) -> KeyState:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


@dataclass(frozen=True)
class DeployedKey:
    """A key as the vault describes it, known on the host only by its id and hash."""

    name: str
    key_id: str
    key_hash: str
    tenant: str
    limits: KeyLimits = field(default_factory=KeyLimits)
    expires_at: int | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return f"{KEY_PREFIX}{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, _, secret = key[len(KEY_PREFIX) :].partition("_")
    return key_id if key_id and secret else None


_COLUMNS = (
    api_keys.c.key_id,
    api_keys.c.name,
    api_keys.c.tenant,
    api_keys.c.created_at,
    api_keys.c.revoked_at,
    api_keys.c.expires_at,
    api_keys.c.last_used_at,
    api_keys.c.source,
    api_keys.c.rpm,
    api_keys.c.tpm,
    api_keys.c.max_concurrent,
    api_keys.c.tokens_per_day,
)


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        key_id=row.key_id,
        name=row.name,
        tenant=row.tenant,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        source=row.source,
        limits=KeyLimits(row.rpm, row.tpm, row.max_concurrent, row.tokens_per_day),
    )


def _limit_values(limits: KeyLimits) -> dict[str, int | None]:
    return dict(vars(limits))


class KeyStore:
    def __init__(self, database: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = database
        self._clock = clock
        self._cache: dict[str, tuple[float, KeyRecord | None, str | None]] = {}
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    # --- the operator's commands ---------------------------------------------------------------------
    def create(self, name: str, tenant: str, limits: KeyLimits = KeyLimits(), expires_at: int | None = None) -> str:
        """Create a key and return it; this is the only time the plain key exists."""
        key = generate_key()
        key_id = key_id_of(key)
        with self._db.engine.begin() as db:
            db.execute(
                insert(api_keys).values(
                    key_id=key_id,
                    name=name,
                    key_hash=hash_key(key),
                    created_at=int(self._clock()),
                    tenant=tenant,
                    source="cli",
                    expires_at=expires_at,
                    **_limit_values(limits),
                )
            )
        return key

    def sync_deployed(self, keys: Iterable[DeployedKey]) -> dict[str, list[str]]:
        """Make the deployed keys what the vault lists: add new ones, update the tenant, limits and expiry
        of known ones, revoke deployed keys it no longer lists. Names of what changed, by change."""
        wanted = {key.key_id: key for key in keys}
        changes: dict[str, list[str]] = {"added": [], "updated": [], "revoked": []}
        now = int(self._clock())
        with self._db.engine.begin() as db:
            rows = {row.key_id: row for row in db.execute(select(*_COLUMNS, api_keys.c.key_hash)).all()}
            for key_id, key in wanted.items():
                values = {
                    "name": key.name,
                    "tenant": key.tenant,
                    "source": "deployed",
                    "expires_at": key.expires_at,
                    **_limit_values(key.limits),
                }
                row = rows.get(key_id)
                if row is None:
                    db.execute(insert(api_keys).values(key_id=key_id, key_hash=key.key_hash, created_at=now, **values))
                    changes["added"].append(key.name)
                    continue
                if not hmac.compare_digest(row.key_hash, key.key_hash):
                    raise ValueError(f"key {key.name}: id {key_id} is stored with another hash")
                if row.revoked_at is not None:
                    raise ValueError(f"key {key.name}: id {key_id} was revoked; generate a new key")
                if any(getattr(row, column) != value for column, value in values.items()):
                    db.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(**values))
                    changes["updated"].append(key.name)
            for key_id, row in rows.items():
                if row.source == "deployed" and row.revoked_at is None and key_id not in wanted:
                    db.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(revoked_at=now))
                    changes["revoked"].append(row.name)
        self._forget()
        return changes

    def list(self) -> list[KeyRecord]:
        with self._db.connect() as db:
            rows = db.execute(select(*_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.key_id)).all()
        return [_record(row) for row in rows]

    def revoke(self, key_id_or_name: str) -> int:
        with self._db.engine.begin() as db:
            result = db.execute(
                update(api_keys)
                .where((api_keys.c.key_id == key_id_or_name) | (api_keys.c.name == key_id_or_name))
                .where(api_keys.c.revoked_at.is_(None))
                .values(revoked_at=int(self._clock()))
            )
        self._forget()
        return result.rowcount

    def usable_count(self) -> int:
        now = int(self._clock())
        with self._db.connect() as db:
            query = (
                select(func.count())
                .select_from(api_keys)
                .where(api_keys.c.revoked_at.is_(None))
                .where(api_keys.c.expires_at.is_(None) | (api_keys.c.expires_at > now))
            )
            return int(db.execute(query).scalar_one())

    # --- the request path ----------------------------------------------------------------------------
    def verify(self, key: str) -> tuple[KeyRecord | None, KeyState | None]:
        """(record, state) for a key whose hash matches; (None, None) for one that matches nothing."""
        key_id = key_id_of(key)
        if key_id is None:
            return None, None
        record, key_hash = self._cached(key_id)
        if record is None or key_hash is None or not hmac.compare_digest(key_hash, hash_key(key)):
            return None, None
        state = record.state(self._clock())
        if state == "active":
            self._touch(key_id)
        return record, state

    def lookup(self, key_id: str) -> KeyRecord | None:
        """The key behind an access token (which carries its id): the token dies with its key."""
        return self._cached(key_id)[0]

    def _cached(self, key_id: str) -> tuple[KeyRecord | None, str | None]:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key_id)
        if hit is not None and now - hit[0] < KEY_CACHE_S:
            return hit[1], hit[2]
        with self._db.connect() as db:
            row = db.execute(select(*_COLUMNS, api_keys.c.key_hash).where(api_keys.c.key_id == key_id)).first()
        entry = (now, _record(row) if row else None, row.key_hash if row else None)
        with self._lock:
            if len(self._cache) > 10_000:  # guessed ids must not grow the cache without end
                self._cache.clear()
            self._cache[key_id] = entry
        return entry[1], entry[2]

    def _touch(self, key_id: str) -> None:
        now = self._clock()
        with self._lock:
            if now - self._touched.get(key_id, 0.0) < LAST_USED_RESOLUTION_S:
                return
            self._touched[key_id] = now
        with self._db.engine.begin() as db:
            db.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(last_used_at=int(now)))

    def _forget(self) -> None:
        with self._lock:
            self._cache.clear()
