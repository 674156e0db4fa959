"""Shared pieces of the benchmarks that run Airflow for real (``bench_pipeline_cores.py``,
``bench_celery.py``): Airflow processes in their own process groups on loopback ports, a survey with a
trained Cannon model, triggering and waiting for a run, and reading Airflow's own records (task instance
start, end and host) and the astra result rows back.

Not a test helper: the figures are printed, nothing is asserted about timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# the `airflow` command: this interpreter's, else the project's virtualenv's (bench_celery.py may run from a
# virtualenv that adds the Celery packages on top of the project's and has no scripts of its own)
BIN = next(
    (d for d in (Path(sys.executable).parent, REPO / ".venv" / "bin") if (d / "airflow").exists()),
    Path(sys.executable).parent,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_hostname() -> str:
    """``[core] hostname_callable`` for processes started side by side that stand for containers:
    ``$BENCH_HOSTNAME``, else the machine's name (what Airflow records in ``task_instance.hostname``)."""
    return os.environ.get("BENCH_HOSTNAME") or socket.getfqdn()


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Call ``check`` until it returns something true; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - services starting up refuse connections; keep polling
            value = None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Processes:
    """Long-running processes, each in its own session (process group), logging to files in ``logs``."""

    logs: Path
    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as out:
            process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append((name, process))
        return process

    def check_alive(self) -> None:
        """Raise, with the end of its log, if a process has exited."""
        for name, process in self.started:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to every process group, SIGKILL after 30 s; only the groups started here."""
        for _, process in reversed(self.started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for _, process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.started.clear()


def make_survey(root: Path, *, stars: int, visits: int, training_stars: int, seed: int = 7) -> dict[str, Any]:
    """A training set and its trained Cannon model (``root/thecannon.npz``), and a survey of ``stars`` stars
    with ``visits`` visits each under ``root/data`` (apStar + apVisit files, older than the sensor's
    readiness age). The model is trained against a throwaway SQLite astra database."""
    from astra_provider import database
    from astra_provider.contrib.thecannon import TrainTheCannon
    from astra_provider.synthetic.survey import generate_survey

    training = generate_survey(
        root / "training", n_stars=training_stars, visits_per_star=1, snr=(150.0, 150.0), seed=11,
        filetypes=("apStar",),
    )  # fmt: skip
    rows = [f"{r['path']},{r['teff']!r},{r['logg']!r},{r['fe_h']!r}" for r in training.of_filetype("apStar")]
    table = root / "training" / "training.csv"
    table.write_text("\n".join(["path,teff,logg,fe_h", *rows]) + "\n")
    model = root / "thecannon.npz"
    database.configure(f"sqlite:///{root / 'training.db'}")
    try:
        TrainTheCannon(input_data_products=str(table), output_path=str(model)).execute()
    finally:
        database.configure(None)
        database.dispose_engines()
    data = root / "data"
    generate_survey(
        data, n_stars=stars, visits_per_star=visits, snr=(40.0, 150.0), seed=seed,
        filetypes=("apStar", "apVisit"),
    )  # fmt: skip
    past = time.time() - 300
    for path in data.rglob("*"):
        os.utime(path, (past, past))
    return {"data": data, "model": model, "n_apstar": stars, "n_apvisit": stars * visits}


# Airflow's records -----------------------------------------------------------------------------------------


def _engine(url: str) -> Any:
    import sqlalchemy

    return sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)


def query(url: str, sql: str, **params: Any) -> list[tuple]:
    """Rows of ``sql`` (bound parameters) in the database at ``url``."""
    import sqlalchemy

    engine = _engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sqlalchemy.text(sql), params)]
    finally:
        engine.dispose()


def run_state(metadata_url: str, dag_id: str, run_id: str) -> str | None:
    rows = query(
        metadata_url, "select state from dag_run where dag_id = :d and run_id = :r", d=dag_id, r=run_id
    )
    return rows[0][0] if rows and rows[0][0] in ("success", "failed") else None


def task_instances(metadata_url: str, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """The run's task instances from Airflow's ``task_instance`` table (times as datetimes)."""
    sql = (
        "select task_id, map_index, state, try_number, hostname, start_date, end_date "
        "from task_instance where dag_id = :d and run_id = :r order by task_id, map_index"
    )
    keys = ("task_id", "map_index", "state", "try_number", "hostname", "start_date", "end_date")
    rows = [dict(zip(keys, row)) for row in query(metadata_url, sql, d=dag_id, r=run_id)]
    for row in rows:
        for key in ("start_date", "end_date"):
            if isinstance(row[key], str):  # SQLite returns text
                row[key] = datetime.fromisoformat(row[key])
    return rows


def overlap(instances: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall time from the first start to the last end, the sum of the task durations, their ratio (the mean
    number of task instances running at once), the seconds at each level of concurrency, and the most that
    ran at once; for the task instances that ran (not skipped)."""
    spans = [
        (ti["start_date"].timestamp(), ti["end_date"].timestamp())
        for ti in instances
        if ti["start_date"] and ti["end_date"] and ti["state"] in ("success", "failed")
    ]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    total = sum(e - s for s, e in spans)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    level, previous, at_level = 0, first, {}
    for moment, step in events:
        at_level[level] = at_level.get(level, 0.0) + moment - previous
        level, previous = level + step, moment
    return {
        "task_instances": len(spans),
        "wall_seconds": round(last - first, 1),
        "sum_of_durations": round(total, 1),
        "mean_running": round(total / (last - first), 2),
        "seconds_with_n_running": {n: round(s, 1) for n, s in sorted(at_level.items()) if s > 0.05},
        "max_running": max(at_level, default=0),
    }


# astra results ---------------------------------------------------------------------------------------------

RESULT_SQL = {  # {s}: the schema prefix ("astra." on PostgreSQL; SQLite has no schemas)
    "continuum": "select d.path, count(*) from {s}continuum r join {s}data_product d on "
    "d.pk = r.data_product_pk group by d.path",
    "doppler": "select d.path, r.row_index, r.vhelio, r.u_vrel from {s}doppler r join {s}data_product d on "
    "d.pk = r.data_product_pk",
    # The Cannon reads rows of the continuum step's bundle files (named by a hash that differs between
    # runs): key its results by the spectrum the continuum task normalised
    "thecannon": "select d.path, r.row_index, r.teff, r.logg, r.fe_h from {s}thecannon r "
    "join {s}task_output_data_product o on o.data_product_pk = r.data_product_pk "
    "join {s}task_input_data_product i on i.task_pk = o.task_pk "
    "join {s}data_product d on d.pk = i.data_product_pk",
}


def astra_results(astra_url: str, relative_to: dict[str, Path]) -> dict[str, dict[tuple, tuple]]:
    """The result rows of each step keyed by input path (relative to the data or output root, so that two
    runs over copies of one survey compare), values as tuples."""
    schema = "astra." if astra_url.startswith("postgresql") else ""
    results = {}
    for table, sql in RESULT_SQL.items():
        rows = query(astra_url, sql.format(s=schema))
        keyed = {}
        for path, *rest in rows:
            for root in relative_to.values():
                if path.startswith(f"{root}/"):
                    path = path[len(str(root)) + 1 :]
            by_row = table in ("doppler", "thecannon")  # keyed by (path, row in the file)
            key = (path, rest[0]) if by_row else (path,)
            keyed[key] = tuple(rest[1:] if by_row else rest)
        results[table] = keyed
    return results


def compare_results(a: dict, b: dict, rtol: float = 1e-6) -> list[str]:
    """Differences between two :func:`astra_results` (missing rows, values beyond ``rtol``)."""
    problems = []
    for table in RESULT_SQL:
        if set(a[table]) != set(b[table]):
            missing = sorted(set(a[table]) ^ set(b[table]))[:5]
            problems.append(f"{table}: rows differ ({len(a[table])} vs {len(b[table])}), e.g. {missing}")
            continue
        for key, values in a[table].items():
            for x, y in zip(values, b[table][key]):
                if x is None or y is None:
                    if x is not y:
                        problems.append(f"{table} {key}: {x} vs {y}")
                elif abs(float(x) - float(y)) > rtol * max(abs(float(x)), abs(float(y)), 1e-12):
                    problems.append(f"{table} {key}: {x} vs {y}")
    return problems


def print_json(title: str, value: Any) -> None:
    print(f"\n== {title}\n{json.dumps(value, indent=2, default=str)}", flush=True)
