"""The ``astra`` command line: one module per group of commands.

- :mod:`astra_provider.cli.database`: ``initdb``, ``schema``, ``status``, ``recover``;
- :mod:`astra_provider.cli.tasks`: ``show``, ``rerun``;
- :mod:`astra_provider.cli.airflow`: ``airflow-setup``;
- ``synthetic-survey``, ``demo``, ``run-step`` and ``templates`` come from
  :mod:`astra_provider.synthetic.cli`, :mod:`astra_provider.demo`, :mod:`astra_provider.run_step` and
  :mod:`astra_provider.templates.cli`; ``source`` and ``export`` from :mod:`astra_provider.sources.cli`
  and :mod:`astra_provider.catalogue.cli`.

Every URL printed is redacted (:func:`astra_provider.database.redact`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from astra_provider.cli import airflow as airflow_cli
from astra_provider.cli import database as database_commands
from astra_provider.cli import tasks as task_commands
from astra_provider.cli.airflow import airflow_setup
from astra_provider.cli.database import schema_sql


def _add_command(commands: Any, name: str, module: ModuleType) -> None:
    """Add ``astra name`` from a module with ``HELP``, ``DESCRIPTION``, ``add_arguments`` and ``run``
    (the handler, as ``args.run``)."""
    parser = commands.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
    module.add_arguments(parser)
    parser.set_defaults(run=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astra", description="astra-provider: tasks with provenance.")
    parser.add_argument(
        "--database-url", help="SQLAlchemy URL (default: $ASTRA_DATABASE_URL or embedded SQLite)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    database_commands.add_arguments(commands)
    task_commands.add_arguments(commands)
    _add_command(commands, "airflow-setup", airflow_cli)
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

    _add_command(commands, "source", source_cli)
    _add_command(commands, "export", export_cli)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "templates":
        from astra_provider.templates.cli import run as run_templates

        return run_templates(args)
    from astra_provider import database

    if args.database_url:
        database.configure(args.database_url)
    if args.command in database_commands.COMMANDS:
        return database_commands.run(args)
    if args.command in task_commands.COMMANDS:
        return task_commands.run(args)
    if args.command == "synthetic-survey":
        from astra_provider.synthetic.cli import run as run_survey

        return run_survey(args)
    if args.command in ("source", "export", "airflow-setup"):
        return args.run(args)
    if args.command == "run-step":
        from astra_provider import run_step

        return run_step.main(args)
    from astra_provider.demo import run as run_demo

    return run_demo(args)


__all__ = ["airflow_setup", "build_parser", "main", "schema_sql"]


if __name__ == "__main__":
    sys.exit(main())
