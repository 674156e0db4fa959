"""The ``astra`` command line: database set-up, schema, inspecting and re-running tasks."""

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
    from astra_provider.synthetic.survey import DESCRIPTION as SURVEY_DESCRIPTION
    from astra_provider.synthetic.survey import add_arguments as add_survey_arguments

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
    from astra_provider import run_step

    run_step.add_arguments(
        commands.add_parser(
            "run-step",
            help="run one step of a DAG (and the steps it needs) in a run; exit 1 if a task failed",
            description=run_step.__doc__.split("\n\n")[1],
        )
    )

    args = parser.parse_args(argv)
    from astra_provider import database

    if args.database_url:
        database.configure(args.database_url)

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
        from astra_provider.synthetic.survey import run as run_survey

        return run_survey(args)
    elif args.command == "demo":
        from astra_provider.demo import run as run_demo

        return run_demo(args)
    elif args.command == "run-step":
        return run_step.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
