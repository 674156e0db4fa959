"""The ``astra`` command line: database set-up, schema, inspecting and re-running tasks, template grids."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def schema_sql() -> str:
    """The PostgreSQL DDL of every table, generated from the ORM models (``schema/astradb.sql``)."""
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from astra_provider.database import SCHEMA
    from astra_provider.database.astradb import Base

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
    text = "\n\n".join(statements) + "\n"
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def _show_task(pk: int) -> dict:
    from astra_provider.database.astradb import Task

    task = Task.get_by_id(pk)
    return {
        "pk": task.pk,
        "task": f"{task.task_module}.{task.task_name}",
        "task_id": task.task_id,
        "version": task.version,
        "status": task.status.name,
        "created": task.created.isoformat(),
        "modified": task.modified.isoformat(),
        "parameters": task.parameters,
        "timings": {
            "duration": task.duration,
            "pre_execute": task.time_pre_execute,
            "execute": task.time_execute,
            "post_execute": task.time_post_execute,
            "bundle_overhead": task.time_bundle_overhead,
        },
        "error": {"stage": task.error_stage, "message": task.error_message} if task.error_stage else None,
        "inputs": [dp.path for dp in task.input_data_products],
        "outputs": [dp.path for dp in task.output_data_products],
        "output_pk": task.output_pk,
        "result": task.result,
    }


def airflow_setup(database_url: str | None, conn_id: str = "astra_default", test: bool = True) -> int:
    """Create or update the Airflow connection ``conn_id`` of the astra database and print it redacted.

    The URL is ``database_url``, else ``ASTRA_DATABASE_URL``, else the embedded SQLite default (said so).
    Needs Airflow's metadata database (``airflow db migrate``). With ``test``, connects once (``SELECT 1``).
    """
    import os

    from sqlalchemy import select

    from astra_provider.database import redact
    from astra_provider.hooks.astra import (
        AstraHook,
        connection_from_url,
        default_database_url,
        url_from_connection,
    )

    url, source = database_url, "--database-url"
    if not url:
        url, source = os.environ.get("ASTRA_DATABASE_URL"), "ASTRA_DATABASE_URL"
    if not url:
        url = default_database_url()
        source = "the embedded SQLite default (set ASTRA_DATABASE_URL for a PostgreSQL server)"
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    value = connection_from_url(url)
    if value.startswith("{"):
        new = Connection.from_json(value, conn_id=conn_id)
    else:  # SQLite: an astra connection (so that the connection form's Test button can test it)
        new = Connection(conn_id, conn_type="astra", schema=Connection(uri=value).schema)
    fields = ("conn_type", "host", "schema", "login", "password", "port", "extra")
    try:
        with create_session() as session:
            existing = session.scalar(select(Connection).where(Connection.conn_id == conn_id))
            if existing is None:
                session.add(new)
            for name in fields if existing is not None else ():
                setattr(existing, name, getattr(new, name))
    except Exception as error:  # e.g. no metadata database yet
        print(
            f"cannot store the connection {conn_id!r} in Airflow's metadata database: {error}",
            file=sys.stderr,
        )
        print("(run `airflow db migrate` with the same AIRFLOW_HOME first)", file=sys.stderr)
        return 1
    action = "Created" if existing is None else "Updated"
    print(f"{action} the Airflow connection {conn_id!r} (type {new.conn_type}) from {source}: {redact(url)}")
    if os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}"):
        print(f"note: AIRFLOW_CONN_{conn_id.upper()} is set in this environment and takes precedence")
    if not test:
        return 0
    ok, message = AstraHook.check_database(url_from_connection(new))
    print(f"{'Connection test OK' if ok else 'Connection test FAILED'}: {message}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="astra", description="astra-provider: tasks with provenance.")
    parser.add_argument(
        "--database-url", help="SQLAlchemy URL (default: $ASTRA_DATABASE_URL or embedded SQLite)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("initdb", help="create the astra schema and tables in the database")
    commands.add_parser("schema", help="print the PostgreSQL schema (the content of schema/astradb.sql)")
    show = commands.add_parser("show", help="show a task: parameters, timings, status, inputs, outputs")
    show.add_argument("pk", type=int)
    rerun = commands.add_parser("rerun", help="rebuild a task from the database and execute it again")
    rerun.add_argument("pk", type=int)
    rerun.add_argument("--debug", action="store_true", help="raise the first exception (for pdb)")
    setup = commands.add_parser(
        "airflow-setup",
        help="create or update the Airflow connection astra_default from ASTRA_DATABASE_URL",
        description="Create or update the Airflow connection of the astra database (in Airflow's metadata "
        "database, for the AIRFLOW_HOME of this environment) from --database-url, else ASTRA_DATABASE_URL, "
        "else the embedded SQLite default; print it with the password hidden, and test it.",
    )
    setup.add_argument("--conn-id", default="astra_default", help="connection id (default: astra_default)")
    setup.add_argument("--no-test", action="store_true", help="do not connect to test it")
    from astra_provider.synthetic.cli import DESCRIPTION as SURVEY_DESCRIPTION
    from astra_provider.synthetic.cli import add_arguments as add_survey_arguments

    synthetic = commands.add_parser(
        "synthetic-survey",
        help="write a synthetic SDSS survey with a known truth",
        description=SURVEY_DESCRIPTION,
    )
    add_survey_arguments(synthetic)
    demo = commands.add_parser(
        "demo",
        help="run the pipeline through Airflow on a synthetic survey with a known truth; print a summary",
        description="Run the APOGEE pipeline (The Cannon training, then discovery, continuum, Doppler and "
        "The Cannon) through Airflow on a synthetic survey with a known truth, and print a summary with the "
        "accuracy against the truth. Data, databases, plots and logs go under $ASTRA_HOME.",
    )
    from astra_provider.demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    from astra_provider.catalogue import cli as export_cli
    from astra_provider.sources import cli as source_cli

    source_cli.register(commands)
    export_cli.register(commands)
    from astra_provider import run_step

    run_step.add_arguments(
        commands.add_parser(
            "run-step",
            help="run one step of a DAG (and the steps it needs) in a run; exit 1 if a task failed",
            description=run_step.__doc__.split("\n\n")[1],
        )
    )
    from astra_provider.templates.cli import add_arguments as add_templates_arguments

    templates = commands.add_parser(
        "templates", help="import public template grids; install Doppler's grids as instrument-ready models"
    )
    add_templates_arguments(templates)

    args = parser.parse_args(argv)
    if args.command == "templates":
        from astra_provider.templates.cli import run as run_templates

        return run_templates(args)
    from astra_provider import database

    if args.database_url:
        database.configure(args.database_url)

    if args.command == "airflow-setup":
        return airflow_setup(args.database_url, args.conn_id, test=not args.no_test)
    if args.command == "schema":
        sys.stdout.write(schema_sql())
    elif args.command == "initdb":
        database.get_engine()
        print(f"astra database ready: {database.get_database_url()}")
    elif args.command == "show":
        print(json.dumps(_show_task(args.pk), indent=2, default=str))
    elif args.command == "rerun":
        from astra_provider.base import TaskInstance
        from astra_provider.database.astradb import Task

        instance = TaskInstance.from_task(Task.get_by_id(args.pk))
        result = instance.execute(force=True, debug=args.debug)
        print(json.dumps({"summary": instance.summary(), "result": result}, indent=2, default=str))
    elif args.command == "synthetic-survey":
        from astra_provider.synthetic.cli import run as run_survey

        return run_survey(args)
    elif args.command in ("source", "export"):
        return args.run(args)
    elif args.command == "demo":
        from astra_provider.demo import run as run_demo

        return run_demo(args)
    elif args.command == "run-step":
        return run_step.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
