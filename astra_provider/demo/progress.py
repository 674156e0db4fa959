"""Progress while a DAG runs: a background thread that polls, every few seconds, the Airflow metadata database
(the task running, its mapped bundles done) and the astra database (tasks done per pipeline step), and
prints one line when it changes (at least every 15 s)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class StepProgress:
    step: str
    task_name: str  # the astra task class of the step
    total: int  # tasks expected
    path_prefix: str  # the folder of the step's input files


class Progress(threading.Thread):
    """Every ``interval`` s: the step running in Airflow, and the tasks done per step (astra database)."""

    def __init__(
        self,
        say: Callable[[str], None],
        astra_url: str,
        dag_id: str,
        steps: list[StepProgress],
        *,
        interval: float,
        note: str = "",
    ):
        super().__init__(name=f"astra-demo-progress-{dag_id}", daemon=True)
        self.say, self.astra_url, self.dag_id, self.steps, self.note = say, astra_url, dag_id, steps, note
        self.interval = max(0.2, float(interval))
        self._stop_event = threading.Event()
        self.started = time.monotonic()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def run(self) -> None:
        last, printed = "", 0.0
        while not self._stop_event.wait(self.interval):
            try:
                line = self.line()
            except Exception as error:  # a busy database: try again at the next tick
                line = f"(progress unavailable: {type(error).__name__})"
            now = time.monotonic()
            if line != last or now - printed >= 15:
                elapsed = now - self.started
                self.say(f"  [{int(elapsed // 60)}:{int(elapsed % 60):02d}] {self.dag_id}: {line}")
                last, printed = line, now

    def line(self) -> str:
        running = airflow_running(self.dag_id)
        parts = [running or "starting"]
        if self.note:
            parts[0] += f" {self.note}"
        parts += [f"{s.step} {tasks_done(self.astra_url, s)}/{s.total} done" for s in self.steps]
        return " | ".join(parts)


def tasks_done(astra_url: str, step: StepProgress) -> int:
    """Tasks of ``step`` completed or failed, on input files under its folder (astra database)."""
    from sqlalchemy import func, select

    from astra_provider.database import get_engine
    from astra_provider.database.astradb import DataProduct, Status, Task, TaskInputDataProduct

    # A read-only transaction: on SQLite it takes no write lock, so a poll never holds up the tasks it
    # watches (a write-locking poll stuck in a crashed thread once left every later bundle "locked").
    with get_engine(astra_url).connect().execution_options(read_only=True) as connection:
        count = connection.scalar(
            select(func.count(func.distinct(Task.pk)))
            .join(TaskInputDataProduct, TaskInputDataProduct.task_pk == Task.pk)
            .join(DataProduct, DataProduct.pk == TaskInputDataProduct.data_product_pk)
            .where(
                Task.task_name == step.task_name,
                Task.status_code.in_([int(Status.COMPLETED), int(Status.FAILED)]),
                DataProduct.path.startswith(step.path_prefix),
            )
        )
        return count or 0  # COUNT always gives a row; None only satisfies the type


def airflow_running(dag_id: str) -> str:
    """``"running doppler (3/8 bundles done)"``, from the Airflow metadata database."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run_id = session.scalar(
            select(DagRun.run_id)
            .where(DagRun.dag_id == dag_id, DagRun.state == "running")
            .order_by(DagRun.id.desc())
            .limit(1)
        )
        if run_id is None:
            return ""
        rows = session.execute(
            select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state).where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id
            )
        ).all()
    active = sorted({task_id for task_id, _, state in rows if state in ("running", "deferred")})
    if not active:
        return "scheduling"
    words = []
    for task_id in active:
        mapped = [state for tid, index, state in rows if tid == task_id and index >= 0]
        if mapped:
            done = sum(state == "success" for state in mapped)
            words.append(f"{task_id} ({done}/{len(mapped)} bundles done)")
        else:
            state = next(state for tid, _, state in rows if tid == task_id)
            words.append(task_id + (" (waiting for files)" if state == "deferred" else ""))
    return "running " + ", ".join(words)
