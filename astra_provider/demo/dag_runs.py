"""One DAG run with ``dag.test()``, with progress, and what it did: per step, the task instances, wall time,
the astra tasks done, skipped and failed (from the tasks' XComs) and their recorded compute time. A run that
does not succeed raises :class:`~.console.DemoError`, after showing its failed tasks and the log's errors."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astra_provider.demo.airflow_setup import load_dag
from astra_provider.demo.console import DemoError, format_seconds
from astra_provider.demo.progress import Progress, StepProgress


@dataclass
class StepResult:
    step: str
    task_instances: int = 0
    seconds: float = 0.0  # from the first task instance's start to the last one's end
    tasks: int = 0
    completed: int = 0
    skipped: int = 0
    failed: int = 0
    task_pks: list[int] = field(default_factory=list)
    failed_tasks: list[dict[str, Any]] = field(default_factory=list)
    compute_seconds: float | None = None  # recorded Task.duration, summed
    found: dict[str, int] | None = None  # the sensor's counts by file type
    n_spectra: int | None = None  # spectra per task (training: the training set)


@dataclass
class RunResult:
    dag_id: str
    run_id: str
    state: str
    seconds: float
    steps: dict[str, StepResult]


def run_dag(
    dag_id: str,
    conf: dict[str, Any],
    *,
    steps: list[StepProgress],
    result_steps: list[str],
    say: Callable[[str], None],
    astra_url: str,
    log_path: Path,
    progress_interval: float,
    note: str = "",
) -> RunResult:
    """Run ``dag_id`` with ``conf``, showing the progress of ``steps``; the results of ``result_steps``."""
    dag = load_dag(dag_id)
    shown = ", ".join(f"{k}={v}" for k, v in conf.items())
    say(f"\n==> DAG {dag_id}: dag.test(run_conf={{{shown}}})")
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    progress = Progress(say, astra_url, dag_id, steps, interval=progress_interval, note=note)
    progress.start()
    started = time.perf_counter()
    try:
        dag_run = dag.test(run_conf=conf)
    finally:
        progress.stop()
    seconds = time.perf_counter() - started
    state = str(dag_run.state)
    results = step_results(dag_run, result_steps)
    add_compute_times(astra_url, results)
    say(f"  {dag_id} {state} in {format_seconds(seconds)} (run {dag_run.run_id})")
    if state != "success":
        failed = [
            f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id
            for ti in dag_run.get_task_instances()
            if str(ti.state) not in ("success", "skipped")
        ]
        for result in results.values():
            for task in result.failed_tasks[:5]:
                say(f"  failed task {task['pk']} ({task['stage']}): {task['error']}")
                say(f"    inspect it with: astra show {task['pk']}")
        for line in errors_in_log(log_path, log_offset)[-3:]:
            say(f"  from the log: {line}")
        raise DemoError(
            f"DAG {dag_id} ended {state}; task instances not successful: {', '.join(failed) or '-'}. "
            f"Airflow's log is {log_path}"
        )
    return RunResult(dag_id, dag_run.run_id, state, seconds, results)


def step_results(dag_run: Any, steps: Sequence[str]) -> dict[str, StepResult]:
    """Per step: its task instances (``step`` and ``step_bundles``), wall time, and its XComs summed."""
    from astra_provider.bundling import decode_pks

    tis = list(dag_run.get_task_instances())
    xcoms = _xcoms(dag_run.dag_id, dag_run.run_id)
    results = {}
    for step in steps:
        mine = [ti for ti in tis if ti.task_id in (step, f"{step}_bundles")]
        result = StepResult(step=step, task_instances=len(mine))
        starts = [ti.start_date for ti in mine if ti.start_date]
        ends = [ti.end_date for ti in mine if ti.end_date]
        if starts and ends:
            result.seconds = (max(ends) - min(starts)).total_seconds()
        for (task_id, _), value in sorted(xcoms.items(), key=lambda item: (item[0][0], item[0][1])):
            if task_id != step or not isinstance(value, dict):
                continue
            if "counts" in value and "data_product_pks" in value:  # the sensor
                result.found = dict(value["counts"])
                continue
            result.tasks += int(value.get("n_tasks", 0))
            result.completed += int(value.get("completed", 0))
            result.skipped += int(value.get("skipped", 0))
            result.failed += int(value.get("failed", 0))
            result.task_pks += decode_pks(value.get("task_pks"))
            result.failed_tasks += list(value.get("failed_tasks") or [])
        results[step] = result
    return results


def step_output(run: RunResult, task_id: str) -> Any:
    """The XCom of an unmapped task of a run (``None`` if it pushed none)."""
    return _xcoms(run.dag_id, run.run_id).get((task_id, -1))


def _xcoms(dag_id: str, run_id: str) -> dict[tuple[str, int], Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(XComModel.task_id, XComModel.map_index, XComModel.value).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == "return_value"
            )
        ).all()
    return {(task_id, index): value for task_id, index, value in rows}


def add_compute_times(astra_url: str, results: dict[str, StepResult]) -> None:
    """Set each result's ``compute_seconds``: its tasks' recorded durations, summed."""
    from sqlalchemy import select

    from astra_provider.database import session_scope
    from astra_provider.database.astradb import Task
    from astra_provider.database.recording import select_in

    with session_scope(astra_url) as session:
        for result in results.values():
            if not result.task_pks:
                continue
            rows = select_in(session, select(Task.pk, Task.duration), Task.pk, result.task_pks)
            durations = [duration for _, duration in rows if duration is not None]
            result.compute_seconds = sum(durations) if durations else None


def errors_in_log(path: Path, offset: int) -> list[str]:
    """The distinct exception lines (``ValueError: ...``) written to the log after ``offset``."""
    import re

    try:
        with open(path, errors="replace") as handle:
            handle.seek(offset)
            text = handle.read()
    except OSError:
        return []
    pattern = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Failed\w*)): .+")
    lines: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if pattern.match(line) and line not in lines:
            lines.append(line[:300])
    return lines
