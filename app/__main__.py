"""Command line: `python -m app serve|check-config ...` and `python -m app keys ...`."""

from __future__ import annotations

import argparse
import re
import sys
import typing
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from app.settings import Settings


def _add_settings_options(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or name} (env PLI_{name.upper()}; default: {field.default})"
        if field.annotation is bool:
            # --name and --no-name: a setting that defaults to on (prefix caching) can be switched off here.
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        choices = None
        if typing.get_origin(field.annotation) is typing.Literal:
            choices = list(typing.get_args(field.annotation))
        parser.add_argument(
            flag, dest=name, default=None, choices=choices, help=help_text, metavar=None if choices else name.upper()
        )
    parser.add_argument("--model", dest="model_path", default=None, help="alias of --model-path")
    parser.add_argument("--config", dest="config_file", default=None, help="alias of --config-file")


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings `serve` and `check-config` run with: flags over PLI_* variables over the config file."""
    values = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    try:
        return Settings(**values)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            print(f"error: {where}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="private-llm inference service")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Settings come from flags, PLI_* environment variables and "
        "--config-file, in that order of precedence.",
    )
    _add_settings_options(serve)
    check = commands.add_parser(
        "check-config",
        help="validate settings (flags, environment, --config-file) without starting",
        description="Exit 0 when the settings are valid, 2 with one line per problem otherwise.",
    )
    _add_settings_options(check)

    keys = commands.add_parser("keys", help="manage API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    keys_help = {
        "create": "create a key and print it (shown once)",
        "generate": "print a new key without storing it (to keep in a vault; deploy it with import-hash)",
        "import-hash": "store a key known only by its id and SHA-256 hash (deployment from a vault)",
        "list": "list keys (never the keys themselves)",
        "revoke": "revoke a key by id or name",
    }
    for sub, help_text in keys_help.items():
        p = keys_commands.add_parser(sub, help=help_text)
        if sub != "generate":
            p.add_argument("--keys-db", type=Path, default=None, help="SQLite key database (env PLI_KEYS_DB)")
        if sub in ("create", "import-hash"):
            p.add_argument("--name", required=True, help="who or what the key is for")
        if sub == "import-hash":
            p.add_argument("--key-id", required=True, help="the part between sk-pli- and _ in the key")
            p.add_argument("--hash", dest="key_hash", required=True, help="SHA-256 of the whole key, hex")
        if sub == "revoke":
            p.add_argument("key", help="key id or name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        settings_from(args)
        print("settings are valid")
        return 0
    if args.command == "serve":
        from app.server import serve as run_server

        return run_server(settings_from(args))

    from app.auth import KeyStore, generate_key

    if args.keys_command == "generate":
        print(generate_key())
        return 0
    db = args.keys_db or Settings().keys_db
    store = KeyStore(db)
    if args.keys_command == "create":
        print(store.create(args.name))
        return 0
    if args.keys_command == "import-hash":
        if not re.fullmatch(r"[0-9a-f]{64}", args.key_hash) or not re.fullmatch(r"[0-9A-Za-z-]+", args.key_id):
            print("error: --hash must be 64 lowercase hex digits and --key-id letters, digits or -", file=sys.stderr)
            return 2
        print("added" if store.import_hash(args.name, args.key_id, args.key_hash) else "present")
        return 0
    if args.keys_command == "list":
        for record in store.list():
            created = datetime.fromtimestamp(record.created_at, UTC).isoformat(timespec="seconds")
            state = "revoked" if record.revoked_at else "active"
            print(f"{record.key_id}\t{record.name}\t{created}\t{state}")
        return 0
    revoked = store.revoke(args.key)
    if revoked == 0:
        print(f"error: no active key with id or name '{args.key}'", file=sys.stderr)
        return 1
    print(f"revoked {revoked} key(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
