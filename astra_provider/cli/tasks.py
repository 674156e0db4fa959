"""``astra show`` and ``astra rerun``: one task of the astra database."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_arguments(commands: Any) -> None:
    """The task subcommands, on the ``astra`` parser's subparsers."""
    show = commands.add_parser("show", help="show a task: parameters, timings, status, inputs, outputs")
    show.add_argument("pk", type=int)
    rerun = commands.add_parser("rerun", help="rebuild a task from the database and execute it again")
    rerun.add_argument("pk", type=int)
    rerun.add_argument("--debug", action="store_true", help="raise the first exception (for pdb)")
    rerun.add_argument("--verbose", action="store_true", help="log each stage and task as it runs")


def show_task(pk: int) -> dict:
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


def run(args: argparse.Namespace) -> int:
    if args.command == "show":
        print(json.dumps(show_task(args.pk), indent=2, default=str))
        return 0
    from astra_provider.base import TaskInstance
    from astra_provider.database.astradb import Task

    instance = TaskInstance.from_task(Task.get_by_id(args.pk))
    result = instance.execute(force=True, debug=args.debug, verbose=args.verbose)
    print(json.dumps({"summary": instance.summary(), "result": result}, indent=2, default=str))
    return 0


COMMANDS = ("show", "rerun")
