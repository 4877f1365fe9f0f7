"""`python -m app archive ...`: make a master key, export records for an auditor (each export recorded),
apply retention, re-wrap the data keys under a new primary master key."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from app.archive import ArchiveKeyError, MasterKeys, generate_master_key, purge, read, record_export, rewrap
from app.cli_keys import add_database_options, open_app_database
from app.cli_usage import moment


def add_archive_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="archive_command", required=True)
    commands.add_parser(
        "keygen",
        help="print a new master key (a line of the archive key file)",
        description="Put it in the vault; the first line of the key file is the primary.",
    )
    export = commands.add_parser(
        "export",
        help="decrypt records for an auditor, as JSON lines; the export itself is recorded",
        description="Records of days whose data key retention destroyed are gone and not listed.",
    )
    export.add_argument("--since", type=moment, required=True, help="from this date or time (UTC), inclusive")
    export.add_argument("--until", type=moment, default=None, help="to this date or time (UTC), exclusive; default now")
    export.add_argument("--tenant", default=None, help="only this tenant")
    export.add_argument("--request-id", default=None, help="only this request (its X-Request-ID)")
    export.add_argument("--by", default=None, help="who exports, as recorded (default: the login name)")
    retention = commands.add_parser(
        "purge", help="destroy the data keys of days past retention, then their records (the app does it hourly)"
    )
    retention.add_argument("--retention-days", type=int, default=None, help="default: archive_retention_days")
    rotate = commands.add_parser(
        "rewrap", help="wrap every data key with the key file's primary master key (after a new one is put first)"
    )
    for command in (export, retention, rotate):
        add_database_options(command)
    for command in (export, rotate):
        command.add_argument("--key-file", type=Path, default=None, help="default: archive_key_file")


def run_archive_command(args: argparse.Namespace) -> int:
    if args.archive_command == "keygen":
        print(generate_master_key())
        return 0
    from app.settings import Settings

    settings = Settings()
    database = open_app_database(args)
    if args.archive_command == "purge":
        days, records = purge(database, args.retention_days or settings.archive_retention_days)
        print(json.dumps({"days_destroyed": days, "records_deleted": records}))
        return 0
    key_file = args.key_file or settings.archive_key_file
    if key_file is None:
        print("error: no archive key file: give --key-file or set archive_key_file", file=sys.stderr)
        return 2
    try:
        master = MasterKeys.from_file(key_file)
        if args.archive_command == "rewrap":
            moved, kept = rewrap(database, master)
            print(json.dumps({"rewrapped": moved, "already_primary": kept, "primary": master.primary_id}))
            return 0
        until = args.until or datetime.now(UTC)
        count = 0
        for record in read(database, master, args.since, until, args.tenant, args.request_id):
            # A lone surrogate a client sent cannot be printed as UTF-8: it goes out as its JSON escape.
            line = json.dumps(record, ensure_ascii=False)
            print(line.encode("utf-8", "backslashreplace").decode())
            count += 1
    except ArchiveKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    record_export(database, args.by or getpass.getuser(), args.tenant, args.since, until, args.request_id, count)
    print(f"exported {count} records (recorded as an export by {args.by or getpass.getuser()})", file=sys.stderr)
    return 0
