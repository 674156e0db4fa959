"""Benchmark: recording a bundle of 10,000 tasks (3 parameters and 1 data product each).

Measures the framework's own cost of creating and recording the bundle (tasks, parameters, data products,
bundle, statuses and timings) through ``TaskInstance.execute()`` with a trivial ``execute``, on PostgreSQL (a
throwaway server started here) and on the embedded SQLite default. The tasks are inserted once (as running,
with their parameters, input data products and bundle) and updated once (final status and timings); the
time includes building the instance (one ``stat`` and path parse per input file). The baseline, measured in
the same run, is the naive way: one ``session.add`` per row and a commit per task.

The bundle is recorded ``--repeat`` times, each time into a fresh database (so every repeat does the same
work: new data products, parameters and tasks); the best and median rates are printed, with the load
average, as the machine may be shared. The ratio compares the median bulk rate with the baseline.

    .venv/bin/python bench/bench_recording.py [--tasks 10000] [--baseline-tasks 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from astra_provider import __version__, database
from astra_provider.base import Parameter, TaskInstance
from astra_provider.database.astradb import (
    DataProduct,
    Status,
    Task,
    TaskInputDataProduct,
    TaskParameter,
    parameter_value_hash,
)
from astra_provider.database.astradb import Parameter as ParameterRow
from astra_provider.devtools import create_database, temporary_postgres
from astra_provider.utils import canonical_json, stable_hash


class RecordingBenchTask(TaskInstance):
    model_path = Parameter(bundled=True)
    initial_teff = Parameter()
    initial_logg = Parameter()

    def execute(self):
        return [None for _ in self.iterable()]


def make_files(directory: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = directory / f"spec-{i:06d}.fits"
        path.touch()
        paths.append(str(path))
    return paths


CLIENT_CPU: list[float] = []


def bulk(paths: list[str], offset: float) -> float:
    start, cpu = time.perf_counter(), time.process_time()
    instance = RecordingBenchTask(
        input_data_products=paths,
        model_path="model.npz",
        initial_teff=tuple(4000.0 + offset + i for i in range(len(paths))),
        initial_logg=tuple(2.0 + (i % 7) / 10 for i in range(len(paths))),
    )
    instance.execute()
    elapsed = time.perf_counter() - start
    CLIENT_CPU.append(time.process_time() - cpu)  # this process: Python + the driver (not the server)
    assert instance.summary()["completed"] == len(paths)
    return elapsed


def naive(paths: list[str], offset: float) -> float:
    """One ORM add per row and one commit per task (get-or-create by query for shared rows)."""
    start = time.perf_counter()
    with database.session_scope() as session:
        for i, path in enumerate(paths):
            values = {
                "model_path": "model.npz",
                "initial_teff": 4000.0 + offset + i,
                "initial_logg": 2.0 + (i % 7) / 10,
            }
            task = Task(
                task_module=__name__,
                task_name="RecordingBenchTask",
                version=__version__,
                task_id=stable_hash([values, path]),
                status_code=int(Status.COMPLETED),
            )
            session.add(task)
            product = session.scalars(
                select(DataProduct).where(
                    DataProduct.filetype == "full", DataProduct.kwargs_hash == stable_hash(path)
                )
            ).first()
            if product is None:
                product = DataProduct(
                    filetype="full", kwargs={"full": path}, kwargs_hash=stable_hash(path), path=path
                )
                session.add(product)
            session.flush()
            for name, value in values.items():
                encoded = canonical_json(value)
                value_hash = parameter_value_hash(encoded)  # the unique key: (name, hash of the value)
                row = session.scalars(
                    select(ParameterRow).where(
                        ParameterRow.parameter_name == name, ParameterRow.parameter_value_hash == value_hash
                    )
                ).first()
                if row is None:
                    row = ParameterRow(
                        parameter_name=name, parameter_value=encoded, parameter_value_hash=value_hash
                    )
                    session.add(row)
                    session.flush()
                session.add(TaskParameter(task_pk=task.pk, parameter_pk=row.pk))
            session.add(TaskInputDataProduct(task_pk=task.pk, data_product_pk=product.pk))
            session.commit()
    return time.perf_counter() - start


def measure(
    label: str, new_database: Callable[[int], str], paths: list[str], baseline_paths: list[str], repeat: int
) -> None:
    """Record the bundle ``repeat`` times (a fresh database each time), then the baseline once."""
    times = []
    CLIENT_CPU.clear()
    for attempt in range(repeat):
        database.configure(new_database(attempt))
        database.get_engine()  # create the tables outside the timings
        times.append(bulk(paths, offset=0.0))
        if attempt == repeat - 1:
            naive_time = naive(baseline_paths, offset=0.5)
        database.configure(None)
        database.dispose_engines()
    best, median = len(paths) / min(times), len(paths) / statistics.median(times)
    naive_rate = len(baseline_paths) / naive_time
    bulk_text = f"{len(paths)} tasks in {min(times):.2f} s (best of {repeat}) = {best:.0f} tasks/s"
    naive_text = f"{len(baseline_paths)} tasks in {naive_time:.2f} s = {naive_rate:.0f} tasks/s"
    ratios = f"{median / naive_rate:.1f}x (median), {best / naive_rate:.1f}x (best)"
    print(f"{label:<11} bulk: {bulk_text}, median {median:.0f}/s | naive: {naive_text} | ratio {ratios}")
    print(f"{'':<11} client CPU (this process) per bundle: median {statistics.median(CLIENT_CPU):.2f} s")


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--baseline-tasks", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bulk").mkdir()
        (root / "naive").mkdir()
        paths = make_files(root / "bulk", args.tasks)
        baseline_paths = make_files(root / "naive", args.baseline_tasks)
        print(
            f"Recording a bundle of {args.tasks} tasks (3 parameters, 1 data product each); "
            f"naive baseline on {args.baseline_tasks} tasks, one add + commit per task. {load()}"
        )
        with temporary_postgres() as admin_url:
            measure(
                "PostgreSQL",
                lambda i: create_database(admin_url, f"bench_recording_{i}"),
                paths,
                baseline_paths,
                args.repeat,
            )
        measure("SQLite", lambda i: f"sqlite:///{root / f'astra-{i}.db'}", paths, baseline_paths, args.repeat)
        print(load())


if __name__ == "__main__":
    main()
