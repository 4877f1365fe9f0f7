"""`python -m app keys …`: the operator's commands for API keys."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.auth import DeployedKey, KeyLimits, KeyRecord, KeyStore, generate_key
from app.store import Database, open_database

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_LIMITS = {
    "rpm": "requests per minute",
    "tpm": "tokens (prompt and completion) per minute",
    "max_concurrent": "requests at the same time",
    "tokens_per_day": "tokens per UTC day",
}


def parse_duration(text: str) -> int:
    """'90d', '12h', '1d12h', '3600s' -> seconds."""
    if not text or _DURATION.sub("", text) != "":
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90d, 12h, 1d12h or 3600s")
    seconds = sum(int(number) * _UNIT_S[unit] for number, unit in _DURATION.findall(text))
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a duration must be longer than 0")
    return seconds


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def add_keys_commands(keys: argparse.ArgumentParser) -> None:
    commands = keys.add_subparsers(dest="keys_command", required=True)
    help_texts = {
        "create": "create a key and print it alone on stdout (shown once)",
        "generate": "print a new key without storing it (to keep in a vault; the deployment loads its hash)",
        "sync": "make the deployed keys those listed as JSON on stdin (by id and hash; absent ones revoked)",
        "list": "list keys: tenant, limits, expiry, last use (never the keys themselves)",
        "revoke": "revoke a key by id or name",
    }
    for name, help_text in help_texts.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        if name != "generate":
            add_database_options(command)
        if name == "create":
            command.add_argument("--name", required=True, help="who or what the key is for")
            command.add_argument("--tenant", required=True, help="the team or customer it is billed to")
            for limit, meaning in _LIMITS.items():
                command.add_argument(
                    "--" + limit.replace("_", "-"), type=_positive, default=None, help=f"at most N {meaning}"
                )
            command.add_argument(
                "--expires-in", type=parse_duration, default=None, help="lifetime such as 90d or 12h (default: none)"
            )
        if name == "revoke":
            command.add_argument("key", help="key id or name")


def add_database_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--keys-db", type=Path, default=None, help="SQLite database file (env PLI_KEYS_DB)")
    command.add_argument(
        "--database-url", default=None, help="PostgreSQL URL instead of the file (env PLI_DATABASE_URL)"
    )


def open_app_database(args: argparse.Namespace) -> Database:
    """The database the server with these settings uses (flags over PLI_* variables)."""
    from app.settings import Settings

    settings = Settings()
    return open_database(args.keys_db or settings.keys_db, args.database_url or settings.database_url)


def _when(timestamp: int | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _deployed(entry: Any) -> DeployedKey:
    if not isinstance(entry, dict):
        raise ValueError("every entry must be an object")
    missing = [field for field in ("name", "key_id", "hash", "tenant") if not entry.get(field)]
    if missing:
        raise ValueError(f"entry {entry.get('name', '?')}: missing {', '.join(missing)}")
    well_formed = re.fullmatch(r"[0-9a-f]{64}", str(entry["hash"])) and re.fullmatch(
        r"[0-9A-Za-z-]+", str(entry["key_id"])
    )
    if not well_formed:
        raise ValueError(f"entry {entry['name']}: hash must be 64 lowercase hex digits and key_id letters, digits or -")
    limits = {}
    for limit in _LIMITS:
        value = entry.get(limit)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"entry {entry['name']}: {limit} must be a whole number of at least 1")
        limits[limit] = value
    expires = entry.get("expires_at")
    try:
        expires_at = int(datetime.fromisoformat(str(expires).replace("Z", "+00:00")).timestamp()) if expires else None
    except ValueError as exc:
        raise ValueError(f"entry {entry['name']}: expires_at {expires!r} is not an ISO 8601 time") from exc
    return DeployedKey(
        name=str(entry["name"]),
        key_id=str(entry["key_id"]),
        key_hash=str(entry["hash"]),
        tenant=str(entry["tenant"]),
        limits=KeyLimits(**limits),
        expires_at=expires_at,
    )


def _line(record: KeyRecord, now: float) -> str:
    fields = (
        record.key_id,
        record.name,
        record.tenant,
        record.limits.describe(),
        _when(record.expires_at),
        _when(record.last_used_at),
        record.state(now),
    )
    return "\t".join(fields)


def run_keys_command(args: argparse.Namespace) -> int:
    if args.keys_command == "generate":
        print(generate_key())
        return 0
    store = KeyStore(open_app_database(args))
    if args.keys_command == "create":
        limits = KeyLimits(**{limit: getattr(args, limit) for limit in _LIMITS})
        expires_at = int(time.time()) + args.expires_in if args.expires_in else None
        print(store.create(args.name, args.tenant, limits, expires_at))
        return 0
    if args.keys_command == "sync":
        try:
            entries = json.load(sys.stdin)
            if not isinstance(entries, list):
                raise ValueError("expected a JSON list of keys")
            changes = store.sync_deployed([_deployed(entry) for entry in entries])
        except (ValueError, json.JSONDecodeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(changes))
        return 0
    if args.keys_command == "list":
        now = time.time()
        print("\t".join(("id", "name", "tenant", "limits", "expires", "last used", "state")))
        for record in store.list():
            print(_line(record, now))
        return 0
    revoked = store.revoke(args.key)
    if revoked == 0:
        print(f"error: no active key with id or name '{args.key}'", file=sys.stderr)
        return 1
    print(f"revoked {revoked} key(s)", file=sys.stderr)
    return 0
