"""``astra run-step DAG STEP``: run one step of a DAG, with the steps it needs, and fail loudly.

``airflow tasks test`` exits with status 0 when the task fails; for a mapped task it needs ``--map-index``
and a run in which the step's planner ran (a new run has no bundles); ``airflow dags test`` runs the whole
DAG; both print long tracebacks. This runs the step's tasks (for a bundled step: the planner and every
bundle) and the steps upstream of it in one DAG run, with ``dag.test()`` as ``airflow dags test`` does, sends
Airflow's output to a log file, prints one line per task instance, and on failure one line naming the task
and its error (a bad input file's path is in it) and exits with status 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

WATCHER = "any_step_failed"


class RunStepError(Exception):
    """The step could not be run (unknown DAG or step, a broken DAG file, invalid conf)."""


def add_arguments(parser: Any) -> None:
    parser.add_argument("dag_id", help="the DAG, e.g. astra_continuum")
    parser.add_argument("step", help="a step of the DAG (its task id, e.g. continuum)")
    parser.add_argument("--date", help="the run's logical date (YYYY-MM-DD or ISO datetime; default: now)")
    parser.add_argument("-c", "--conf", default="{}", help="the run's conf (params), as JSON")
    parser.add_argument("--log", type=Path, help="Airflow's output (default: $ASTRA_HOME/logs/run-step.log)")


def load_dag(dag_id: str) -> Any:
    """The DAG ``dag_id`` from Airflow's DAGs folder (its file ``<dag_id>.py`` if there is one)."""
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag

    folder = Path(conf.get("core", "dags_folder"))
    path = folder / f"{dag_id}.py"
    bag = DagBag(dag_folder=str(path if path.exists() else folder))
    if dag_id in bag.dags:
        return bag.dags[dag_id]
    errors = "; ".join(
        f"{file}: {error.strip().splitlines()[-1]}" for file, error in bag.import_errors.items()
    )
    raise RunStepError(f"DAG {dag_id!r} not found in {folder}" + (f" ({errors})" if errors else ""))


def step_task_ids(dag: Any, step: str) -> list[str]:
    """The tasks of a step: ``<step>_bundles`` and ``<step>`` for a bundled step, else ``<step>``."""
    if step not in dag.task_dict or step == WATCHER:
        steps = sorted(t for t in dag.task_dict if t != WATCHER and not t.endswith("_bundles"))
        raise RunStepError(f"DAG {dag.dag_id} has no step {step!r} (steps: {', '.join(steps)})")
    return [t for t in (f"{step}_bundles", step) if t in dag.task_dict]


def run_step(
    dag_id: str,
    step: str,
    *,
    logical_date: datetime | None = None,
    conf: dict[str, Any] | None = None,
    log_path: Path,
    say: Callable[[str], None] = print,
) -> list[tuple[str, str]]:
    """Run ``step`` of ``dag_id`` and the steps upstream of it in a new DAG run; say one line per task.

    :returns: the failures, ``(task instance, error)``; empty if every task succeeded or was skipped.
    :raises RunStepError: if the DAG, the step or the conf is wrong.
    """
    from astra_provider.demo.airflow_setup import output_to

    failures: list[tuple[str, str]] = []

    def record_failure(context: dict[str, Any]) -> None:
        ti, error = context["ti"], context.get("exception")
        name = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        failures.append((name, f"{type(error).__name__}: {error}" if error else "failed"))

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with output_to(log_path):
        dag = load_dag(dag_id)
    subset = dag.partial_subset(step_task_ids(dag, step), include_upstream=True, include_downstream=False)
    for task in subset.tasks:
        task.on_failure_callback = [record_failure]
    say(f"{dag_id}: running {', '.join(subset.task_ids)} (Airflow's output: {log_path})")
    try:
        with output_to(log_path):
            dag_run = subset.test(logical_date=logical_date, run_conf=conf or None)
    except Exception as error:  # e.g. ParamValidationError for a bad conf: nothing ran
        raise RunStepError(f"{type(error).__name__}: {str(error).strip().splitlines()[0]}") from None
    for ti in sorted(dag_run.get_task_instances(), key=lambda ti: (ti.start_date is None, ti.start_date)):
        index = f"[{ti.map_index}]" if ti.map_index >= 0 else ""
        label = f"  {ti.rendered_map_index}" if ti.rendered_map_index else ""
        say(f"  {ti.task_id}{index} {ti.state}{label}")
        if str(ti.state) in ("failed", "upstream_failed") and not any(
            n == f"{ti.task_id}{index}" for n, _ in failures
        ):
            failures.append((f"{ti.task_id}{index}", str(ti.state)))
    return failures


def _parse_date(text: str) -> datetime:
    import pendulum

    return pendulum.parse(text, tz="UTC")


def main(args: Any) -> int:
    """``astra run-step``: 0 if the step succeeded, 1 if a task failed, 2 if it could not run."""
    import sys

    from astra_provider.database import astra_home

    try:
        conf = json.loads(args.conf)
        date = _parse_date(args.date) if args.date else None
        log_path = args.log or astra_home() / "logs" / "run-step.log"
        failures = run_step(args.dag_id, args.step, logical_date=date, conf=conf, log_path=log_path)
    except (RunStepError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, message in failures:
        print(f"error: {args.dag_id}.{name} failed: {message.strip().splitlines()[0]}", file=sys.stderr)
    return 1 if failures else 0
