"""One timed recording of a bundle, in its own process, for ``bench/bench_recording.py``.

    python bench/recording_worker.py URL FILES_DIR N_TASKS OFFSET

Runs with whatever ``astra_provider`` is first on ``PYTHONPATH`` (this branch, or a baseline exported from
git), creates the schema first if needed (outside the timing; ``N_TASKS`` 0: only that), then records a
bundle of ``N_TASKS`` tasks (3 parameters, 1 input data product each) through ``TaskInstance.execute()``
and prints one JSON line: wall time, this process's CPU time, and the number of completed tasks.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from astra_provider import database
from astra_provider.base import Parameter, TaskInstance


class RecordingBenchTask(TaskInstance):
    model_path = Parameter(bundled=True)
    initial_teff = Parameter()
    initial_logg = Parameter()

    def execute(self):
        return [None for _ in self.iterable()]


def prepare(url: str) -> None:
    """The schema, outside the timing: ``astra initdb`` where engines do not create it (this branch)."""
    database.configure(url)
    try:
        from astra_provider.database.schema import create_schema  # noqa: F401  (this branch)
    except ImportError:  # a baseline whose engines create the tables on first use
        database.get_engine()
    else:
        database.init_database(url)


def main() -> None:
    url, files, n, offset = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    prepare(url)
    if n == 0:  # only the schema
        return
    paths = [str(files / f"spec-{i:06d}.fits") for i in range(n)]
    start, cpu = time.perf_counter(), time.process_time()
    instance = RecordingBenchTask(
        input_data_products=paths,
        model_path="model.npz",
        initial_teff=tuple(4000.0 + offset + i for i in range(n)),
        initial_logg=tuple(2.0 + (i % 7) / 10 for i in range(n)),
    )
    instance.execute()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    completed = instance.summary()["completed"]
    print(json.dumps({"wall": wall, "cpu": cpu, "completed": completed, "start": start, "end": start + wall}))


if __name__ == "__main__":
    main()
