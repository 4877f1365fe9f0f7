"""`python -m app usage …`: check the ledger's hash chains, and export usage for billing."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import select

from app.cli_keys import add_database_options
from app.ledger import verify_chain
from app.ledger.chain import HASHED_FIELDS
from app.store import Database
from app.store.schema import usage

GROUPS = ("tenant", "key_id", "model", "day", "node")
# Never text: these are all a row holds (its time as ISO 8601 instead of milliseconds).
ROW_FIELDS = ("id", "at", *(name for name in HASHED_FIELDS if name != "at_ms"))


def moment(text: str) -> datetime:
    """A date (midnight UTC) or an ISO 8601 time; naive times are UTC."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (2026-12-01) or an ISO 8601 time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _groups(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"group by any of {', '.join(GROUPS)}, not {text!r}")
    return names


def add_usage_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="usage_command", required=True)
    verify = commands.add_parser(
        "verify",
        help="check every node's hash chain; report the first edited or deleted row",
        description="Exit 0 when every chain holds, 1 naming the first break of each chain that does not. "
        "Prints each node's head (rows, hash) to compare with the 'ledger flushed' lines in its journal.",
    )
    export = commands.add_parser("export", help="usage for billing, as CSV or JSON (never any text)")
    for command in (verify, export):
        add_database_options(command)
    export.add_argument("--since", type=moment, required=True, help="from this date or time (UTC), inclusive")
    export.add_argument("--until", type=moment, required=True, help="to this date or time (UTC), exclusive")
    export.add_argument("--tenant", default=None, help="only this tenant")
    export.add_argument("--group-by", type=_groups, default=None, help=f"sum by any of {','.join(GROUPS)}")
    export.add_argument("--format", choices=("csv", "json"), default="csv")


def _rows(database: Database, since: datetime, until: datetime, tenant: str | None) -> Iterator[dict[str, Any]]:
    query = (
        select(usage)
        .where(usage.c.at_ms >= int(since.timestamp() * 1000))
        .where(usage.c.at_ms < int(until.timestamp() * 1000))
        .order_by(usage.c.id)
    )
    if tenant is not None:
        query = query.where(usage.c.tenant == tenant)
    with database.connect() as db:
        for row in db.execute(query).mappings():
            at = datetime.fromtimestamp(row["at_ms"] / 1000, UTC)
            yield {**row, "at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "day": at.date()}


def _grouped(rows: Iterator[dict[str, Any]], by: list[str]) -> list[dict[str, Any]]:
    totals: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row[name] for name in by)
        total = totals.setdefault(
            key, {**dict(zip(by, key, strict=True)), "requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        )
        total["requests"] += 1
        total["prompt_tokens"] += row["prompt_tokens"]
        total["completion_tokens"] += row["completion_tokens"]
    out = []
    for key in sorted(totals, key=lambda k: tuple(str(part) for part in k)):
        total = totals[key]
        total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
        out.append({name: value.isoformat() if isinstance(value, date) else value for name, value in total.items()})
    return out


def run_usage_command(args: argparse.Namespace, database: Database) -> int:
    if args.usage_command == "verify":
        with database.connect() as db:
            chain = [dict(row) for row in db.execute(select(usage).order_by(usage.c.id)).mappings()]
        breaks, heads = verify_chain(chain)
        for head in heads:
            print(f"{head.node}\t{head.rows} rows\thead {head.hash}")
        for problem in breaks:
            print(f"error: {problem.describe()}", file=sys.stderr)
        return 1 if breaks else 0
    if args.until <= args.since:
        print("error: --until must be after --since", file=sys.stderr)
        return 2
    rows = _rows(database, args.since, args.until, args.tenant)
    if args.group_by:
        records = _grouped(rows, args.group_by)
        fields = [*args.group_by, "requests", "prompt_tokens", "completion_tokens", "total_tokens"]
    else:
        records = [{name: row[name] for name in ROW_FIELDS} for row in rows]
        fields = list(ROW_FIELDS)
    if args.format == "json":
        json.dump(records, sys.stdout, indent=1)
        print()
        return 0
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return 0


__all__ = ["add_usage_commands", "run_usage_command"]
