"""Command line: `python -m app serve|check-config ...` and `python -m app keys ...`."""

from __future__ import annotations

import argparse
import sys
import typing

from pydantic import ValidationError

from app.cli_archive import add_archive_commands
from app.cli_keys import add_keys_commands, open_app_database, run_keys_command
from app.cli_usage import add_usage_commands, run_usage_command
from app.settings import Settings


def _add_settings_options(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or name} (env PLI_{name.upper()}; default: {default})"
        if field.annotation is bool:
            # --name and --no-name: a setting that defaults to on (prefix caching) can be switched off here.
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        if typing.get_origin(field.annotation) is list:
            parser.add_argument(flag, dest=name, action="append", default=None, help=help_text + "; repeatable")
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
    add_keys_commands(keys)
    add_usage_commands(commands.add_parser("usage", help="the usage ledger: verify its chains, export for billing"))
    add_archive_commands(
        commands.add_parser("archive", help="the encrypted conversation archive: keys, export, retention")
    )
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

    if args.command == "usage":
        return run_usage_command(args, open_app_database(args))
    if args.command == "archive":
        from app.cli_archive import run_archive_command

        return run_archive_command(args)
    return run_keys_command(args)


if __name__ == "__main__":
    sys.exit(main())
