"""The faults of issue #12 at the issue's sizes, on PostgreSQL (a throwaway server) and SQLite.

Each scenario runs real worker processes (``tests/fault_scenarios.py``: a task that writes its output file
atomically, records a result row and logs each execution), applies the fault, runs the bundles again when
the fault needs it, and prints the outcome: tasks, executions, COMPLETED rows per task, result rows,
outputs, what is left RUNNING, and whether every target holds (``check_exactly_once``: each task COMPLETED
exactly once, one result row, one complete output file, nothing RUNNING). Times are printed with the load
average; nothing here is a timing assertion.

- ``overlap``: 8 processes start the same 5 bundles of 2,000 tasks at once (each in another order);
- ``kill``: kill -9 mid-bundle (after 2 recorded chunks, at most half the bundle) of a bundle of 2,000 tasks
  (PostgreSQL) or 20,000 (SQLite), then the bundle again;
- ``commit``: PostgreSQL stops at the commit of the last chunk of a bundle of 1,000 tasks, and starts again
  5 s later; then the same, but the commit reaches the server and its answer is lost;
- ``doppler``: 6 overlapping runs of 140 tasks that each write one result row.

    .venv/bin/python bench/bench_faults.py [--scenario overlap kill commit doppler] [--small]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fault_scenarios as fs  # noqa: E402

from astra_provider import database  # noqa: E402
from astra_provider.devtools import create_database, temporary_postgres  # noqa: E402

CHUNK = 1000


def load() -> str:
    return "load " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def report(label: str, url: str, n: int, log: Path, start: float) -> None:
    found = fs.outcome(url)
    runs = fs.executions(log)
    completed = [s[2] for s in found["statuses"].values()]
    running = sum(s[1] for s in found["statuses"].values())
    try:
        fs.check_exactly_once(url, n)
        verdict = "all targets hold"
    except AssertionError as error:
        verdict = f"TARGET MISSED: {error}"
    print(
        f"  {label:<34} {n} tasks: {sum(runs.values())} executions ({len(runs)} distinct), "
        f"COMPLETED per task {min(completed, default=0)}-{max(completed, default=0)}, "
        f"{sum(found['results'].values())} result rows, {running} RUNNING; "
        f"{time.monotonic() - start:.0f} s ({load()}): {verdict}",
        flush=True,
    )


def spec(root: Path, bundles: list[str], size: int, **extra) -> dict:  # noqa: ANN003
    (root / "out").mkdir(exist_ok=True)
    return {"bundles": bundles, "size": size, "output_dir": str(root / "out"),
            "log_path": str(root / "executions.log"), "chunk_size": CHUNK, **extra}  # fmt: skip


def overlap(url: str, root: Path, size: int, processes: int = 8, names: str = "ABCDE") -> None:
    start, go = time.monotonic(), root / "go"
    order = list(names)
    workers = [
        fs.start_worker(url, spec(root, order[i % len(order) :] + order[: i % len(order)], size, go=str(go)))
        for i in range(processes)
    ]
    go.touch()
    for worker in workers:
        fs.finish(worker, timeout=7200)
    report(
        f"{processes} processes x {len(names)} bundles",
        url,
        size * len(names),
        root / "executions.log",
        start,
    )


def kill(url: str, root: Path, size: int) -> None:
    start = time.monotonic()
    worker = fs.start_worker(url, spec(root, ["K"], size), FAULT_TASK_DELAY=0.002)
    while not _completed_at_least(url, min(2 * CHUNK, size // 2), worker):  # mid-bundle
        time.sleep(0.2)
    fs.kill(worker)
    left = sum(s[1] for s in fs.outcome(url)["statuses"].values())
    print(f"  kill -9 after {fs.count_completed(url)} recorded tasks: {left} RUNNING (stale)", flush=True)
    database.configure(url)
    fs.bundle_instance("K", size, root / "out", root / "executions.log").execute(chunk_size=CHUNK)
    database.configure(None)
    database.dispose_engines()
    report("kill -9, then the bundle again", url, size, root / "executions.log", start)


def _completed_at_least(url: str, n: int, worker) -> bool:  # noqa: ANN001
    if worker.poll() is not None:
        raise RuntimeError(f"the worker ended early: {worker.communicate()}")
    try:
        return fs.count_completed(url) >= n
    except Exception:
        return False


def commit(url: str, root: Path, size: int, control: fs.PostgresControl) -> None:
    for mode in ("stop", "after"):
        start, directory = time.monotonic(), root / mode
        directory.mkdir()
        cutter = fs.CommitCutter(url)
        on_cut = (
            (lambda: (control.stop(), threading.Timer(5, control.start).start())) if mode == "stop" else None
        )
        cutter.arm(mode, after=size // CHUNK, on_cut=on_cut)  # the commit of the last chunk
        worker = fs.start_worker(cutter.url, spec(directory, [f"C{mode}"], size), FAULT_TASK_DELAY=0.001)
        fs.finish(worker)
        cutter.close()
        label = "server stopped at the last commit" if mode == "stop" else "last commit's answer lost"
        report(label, url, size, directory / "executions.log", start)
        database.dispose_engines()
        url = _next_database(url)


_databases: dict[str, Callable[[], str]] = {}


def _next_database(url: str) -> str:
    return _databases[url]()


def doppler(url: str, root: Path) -> None:
    overlap(url, root, 140, processes=6, names="D")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", nargs="+", default=["overlap", "kill", "commit", "doppler"])
    parser.add_argument("--small", action="store_true", help="a tenth of the sizes (a quick look)")
    args = parser.parse_args()
    scale = 10 if args.small else 1
    global CHUNK
    CHUNK = 1000 // scale
    print(f"Issue #12 faults at {'1/10 of ' if args.small else ''}the issue's sizes ({load()})", flush=True)
    with tempfile.TemporaryDirectory() as tmp, temporary_postgres() as admin_url:
        control = fs.PostgresControl(admin_url)
        counter = iter(range(10**6))

        def new_postgres() -> str:
            url = create_database(admin_url, f"faults_{next(counter)}")
            database.init_database(url)
            _databases[url] = new_postgres
            return url

        for scenario in args.scenario:
            for backend in ("PostgreSQL", "SQLite"):
                if scenario == "commit" and backend == "SQLite":
                    continue
                root = Path(tmp) / f"{scenario}-{backend}"
                root.mkdir()
                url = new_postgres() if backend == "PostgreSQL" else f"sqlite:///{root / 'astra.db'}"
                print(f"{scenario} on {backend}:", flush=True)
                if scenario == "overlap":
                    overlap(url, root, 2000 // scale)
                elif scenario == "kill":
                    kill(url, root, (2000 if backend == "PostgreSQL" else 20_000) // scale)
                elif scenario == "commit":
                    commit(url, root, 1000 // scale, control)
                else:
                    doppler(url, root)
                database.dispose_engines()
    print(load())


if __name__ == "__main__":
    main()
