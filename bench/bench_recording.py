"""Benchmark: recording a bundle of 10,000 tasks (3 parameters and 1 data product each), against main.

Measures the framework's own cost of creating and recording a bundle (data products, parameters, the claim
of each task, its version parameters, bundle, statuses and timings) through ``TaskInstance.execute()`` with
a trivial ``execute``, on PostgreSQL (a throwaway server started here) and on SQLite. The baseline is the
code of another git revision (``--baseline``, default ``main``), exported with ``git archive`` into a
temporary directory and run the same way in the same session: each repeat runs this branch and the
baseline one after the other, each in its own process and a fresh database, so both see the same load.

For each: best and median wall rate, the median CPU time of the recording process (Python and the driver)
and, on PostgreSQL, of the server (all its backends, from ``/proc``). On a loaded machine the wall rate
measures the load; the CPU times estimate the rate on an idle machine: ``N / max(client, server)`` when
Python and the server overlap perfectly, ``N / (client + server)`` when they do not. ``--processes 4``
adds 4 processes recording 4 different bundles at once into one PostgreSQL database (the issue's
non-overlapping concurrent case). The load average is printed before and after.

    .venv/bin/python bench/bench_recording.py [--tasks 10000] [--repeat 3] [--processes 4] [--baseline main]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from astra_provider.devtools import create_database, temporary_postgres

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "recording_worker.py"


def export_revision(revision: str, directory: Path) -> Path:
    """The package of ``revision`` (read-only: ``git archive``, nothing in the repository changes)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "astra_provider"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def server_cpu(data_directory: str | None) -> float:
    """CPU seconds of a PostgreSQL server so far: the postmaster, its live and its finished children."""
    if data_directory is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    postmaster = int(Path(data_directory, "postmaster.pid").read_text().split()[0])
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == postmaster:
            total += sum(int(x) for x in fields[11:15]) / tick  # utime, stime, cutime, cstime
        elif ppid == postmaster:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_workers(code: Path, urls: list[str], files: list[Path], n: int, data_directory: str | None) -> dict:
    """Record one bundle per URL, all at once; wall time from the first start to the last end."""
    environment = {**os.environ, "PYTHONPATH": str(code)}
    for url in dict.fromkeys(urls):  # the schema first, by one process, outside the measurements
        subprocess.run([sys.executable, str(WORKER), url, "-", "0", "0"], env=environment, check=True)
    before = server_cpu(data_directory)
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url, str(directory), str(n), str(float(i))],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, (url, directory) in enumerate(zip(urls, files, strict=True))
    ]
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"worker failed:\n{stderr[-3000:]}")
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert all(o["completed"] == n for o in outputs), outputs
    wall = max(o["end"] for o in outputs) - min(o["start"] for o in outputs)
    return {
        "wall": wall,
        "client_cpu": sum(o["cpu"] for o in outputs),
        "server_cpu": server_cpu(data_directory) - before,
        "tasks": n * len(urls),
    }


def summarize(label: str, runs: list[dict]) -> dict:
    rates = [r["tasks"] / r["wall"] for r in runs]
    client = statistics.median(r["client_cpu"] for r in runs)
    server = statistics.median(r["server_cpu"] for r in runs)
    tasks = runs[0]["tasks"]
    summary = {"best": max(rates), "median": statistics.median(rates), "client": client, "server": server}
    text = f"  {label:<9} wall: best {summary['best']:6.0f}/s, median {summary['median']:6.0f}/s"
    text += f" | CPU per {tasks} tasks: client {client:.2f} s"
    if server:
        overlap, serial = tasks / max(client, server), tasks / (client + server)
        text += f", server {server:.2f} s -> idle-machine estimate {serial:.0f}-{overlap:.0f}/s"
    print(text, flush=True)
    return summary


def compare(
    title: str, codes: dict[str, Path], new_urls: Callable[[int], list[str]], files: list[Path], n: int,
    repeat: int, data_directory: str | None,
) -> None:  # fmt: skip
    print(f"{title} ({load()})", flush=True)
    runs: dict[str, list[dict]] = {label: [] for label in codes}
    for attempt in range(repeat):
        for index, (label, code) in enumerate(codes.items()):
            urls = new_urls(2 * attempt + index)
            runs[label].append(run_workers(code, urls, files[: len(urls)], n, data_directory))
    summaries = {label: summarize(label, label_runs) for label, label_runs in runs.items()}
    this, baseline = summaries["this"], summaries["baseline"]
    print(
        f"  ratio this/baseline: wall median {this['median'] / baseline['median']:.2f}, best "
        f"{this['best'] / baseline['best']:.2f}; CPU client {this['client'] / baseline['client']:.2f}"
        + (f", server {this['server'] / baseline['server']:.2f}" if baseline["server"] else ""),
        flush=True,
    )


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def make_files(directory: Path, n: int) -> Path:
    directory.mkdir(parents=True)
    for i in range(n):
        (directory / f"spec-{i:06d}.fits").touch()
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=4, help="concurrent processes (0: skip)")
    parser.add_argument("--baseline", default="main", help="git revision to compare with (default main)")
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        codes = {"this": REPO, "baseline": export_revision(args.baseline, make_dir(root / "baseline"))}
        files = [make_files(root / f"files-{i}", args.tasks) for i in range(max(args.processes, 1))]
        print(f"Recording bundles of {args.tasks} tasks (3 parameters, 1 data product each): this branch "
              f"against {args.baseline}, {args.repeat} repeat(s). {load()}")  # fmt: skip
        with temporary_postgres() as admin_url:
            data_directory = _data_directory(admin_url)
            counter = iter(range(10**6))

            def databases(k: int) -> Callable[[int], list[str]]:
                return lambda _: [create_database(admin_url, f"bench_{next(counter)}") for _ in range(k)]

            compare(
                "PostgreSQL, 1 process", codes, databases(1), files, args.tasks, args.repeat, data_directory
            )
            if args.processes:
                shared = lambda _: [create_database(admin_url, f"bench_{next(counter)}")] * args.processes  # noqa: E731
                compare(f"PostgreSQL, {args.processes} processes, one database, different bundles", codes,
                        shared, files, args.tasks, args.repeat, data_directory)  # fmt: skip
        if not args.no_sqlite:
            sqlite = lambda i: [f"sqlite:///{root / f'astra-{i}.db'}"]  # noqa: E731
            compare("SQLite, 1 process", codes, sqlite, files, args.tasks, args.repeat, None)
        print(load())


def make_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _data_directory(admin_url: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url)
    with engine.connect() as connection:
        directory = connection.execute(text("SHOW data_directory")).scalar_one()
    engine.dispose()
    return directory


if __name__ == "__main__":
    main()
