"""``astra initdb``, ``astra schema``, ``astra status`` and ``astra recover``: the astra database itself."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def schema_sql() -> str:
    """The PostgreSQL DDL of every table, generated from the ORM models (``schema/astradb.sql``)."""
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from astra_provider.database import SCHEMA
    from astra_provider.database.astradb import Base
    from astra_provider.database.schema import task_parameter_view

    dialect = postgresql.dialect()
    statements = [
        "-- The astra database schema, generated from astra_provider.database.astradb by `astra schema`.",
        "-- Load into an empty PostgreSQL database with:  psql < schema/astradb.sql",
        f"CREATE SCHEMA IF NOT EXISTS {SCHEMA};",
    ]
    for table in Base.metadata.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=dialect)).strip() + ";")
        for index in sorted(table.indexes, key=lambda index: index.name or ""):
            statements.append(str(CreateIndex(index).compile(dialect=dialect)).strip() + ";")
    statements.append(task_parameter_view("postgresql") + ";")
    text = "\n\n".join(statements) + "\n"
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


_PARSERS: dict[str, tuple[str, str | None]] = {  # command: (help, description)
    "initdb": (
        "create the astra schema and tables, or upgrade them (idempotent)",
        "Create the astra schema and its missing tables, and upgrade the tables of an earlier version, in "
        "one transaction (concurrent runs wait for each other). Needs a role that may create tables; every "
        "other command works with read-only access.",
    ),
    "schema": ("print the PostgreSQL schema (the content of schema/astradb.sql)", None),
    "status": (
        "count tasks by class and status; show running tasks whose run stopped (stale)",
        "Count the tasks of each class by status. RUNNING counts the tasks of live runs; STALE the running "
        "tasks whose run stopped (its lease expired, or its process on this host is gone): a new run of the "
        "same tasks takes them over, and `astra recover` marks them failed.",
    ),
    "recover": (
        "mark stale running tasks failed, so that they run again (idempotent)",
        "Mark every stale RUNNING task FAILED, with error stage 'lease' and a message naming the lease of "
        "the run that stopped, and release its claim: the next run of those tasks runs them again. Tasks of "
        "live runs are left alone; running it again finds nothing to do.",
    ),
}


def add_arguments(commands: Any) -> None:
    """The database subcommands, on the ``astra`` parser's subparsers."""
    parsers = {
        name: commands.add_parser(name, help=summary, description=description)
        for name, (summary, description) in _PARSERS.items()
    }
    parsers["recover"].add_argument("--dry-run", action="store_true", help="only say what would be recovered")
    for name in ("status", "recover"):
        parsers[name].add_argument("--json", action="store_true", help="print JSON")


def initdb() -> int:
    from astra_provider import database

    done = database.init_database()
    url = database.redact(database.normalize_url(database.get_database_url()))
    for line in done:
        print(f"  {line}")
    print(f"astra database ready: {url}" + ("" if done else " (already current)"))
    return 0


def status(args: argparse.Namespace) -> int:
    from astra_provider.database.leases import task_status
    from astra_provider.database.retry import run_transaction

    report = run_transaction(task_status, description="counting tasks")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    _print_status(report)
    return 0


def _print_status(report: dict[str, Any]) -> None:
    from astra_provider import database

    print(f"astra database: {database.redact(database.normalize_url(database.get_database_url()))}")
    columns = ["CREATED", "RUNNING", "STALE", "COMPLETED", "FAILED"]
    rows = [[entry["task"], *(str(entry.get(c, 0)) for c in columns)] for entry in report["classes"]]
    if not rows:
        print("no tasks")
        return
    widths = [max(len(r[i]) for r in [["task class", *columns], *rows]) for i in range(len(columns) + 1)]
    for row in [["task class", *columns], *rows]:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
            )
        )
    print(f"running: {report['live']} live, {report['stale']} stale")
    for lease in report["leases"]:
        what = "stale" if lease["stale"] else "live"
        owner = lease["owner"] or "(none: recorded by an earlier version)"
        print(
            f"  {what} lease {owner}: {lease['tasks']} task(s), {lease['reason']}, "
            f"expires {lease['expires']}, oldest task {lease['oldest_task_modified']}"
        )
    if report["stale"]:
        print("stale tasks run again when their bundle runs again (it takes them over);")
        print("`astra recover` marks them failed now.")


def recover(args: argparse.Namespace) -> int:
    from astra_provider.database.leases import recover_stale_tasks
    from astra_provider.database.retry import run_transaction

    report = run_transaction(
        lambda session: recover_stale_tasks(session, dry_run=args.dry_run),
        description="recovering stale tasks",
    )
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    if args.dry_run:
        print(f"would mark {report['would_recover']} stale task(s) failed")
    elif report["recovered"]:
        print(
            f"marked {report['recovered']} stale task(s) failed; they run again when their bundle runs again"
        )
    else:
        print("no stale tasks")
    for lease in report["leases"]:
        print(f"  lease {lease['owner'] or '(none)'}: {lease['reason']}, expires {lease['expires']}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "schema":
        sys.stdout.write(schema_sql())
        return 0
    if args.command == "initdb":
        return initdb()
    if args.command == "status":
        return status(args)
    return recover(args)


COMMANDS = tuple(_PARSERS)
