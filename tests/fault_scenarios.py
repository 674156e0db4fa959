"""Fault scenarios for the task lifecycle, shared by ``tests/test_faults.py`` and ``bench/bench_faults.py``.

Everything is real: worker processes run bundles of :class:`FaultTask` (a task that writes an output file
atomically, under a name made of its ``task_id``, records a result row, and logs each execution to an
append-only file); faults are a ``SIGKILL``, a ``SIGSTOP`` longer than the lease, a PostgreSQL server
stopped and started again (:class:`PostgresControl`, on a server of
:func:`astra_provider.devtools.temporary_postgres`), and a TCP proxy that cuts a connection at the ``COMMIT``
of a recorded chunk (:class:`CommitCutter`). :func:`outcome` reads what the database holds, and
:func:`check_exactly_once` states the targets: every task completed exactly once, with one result row and
one output file that exists and is complete, nothing left running.

Run a worker with ``python tests/fault_scenarios.py URL SPEC_JSON``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from astra_provider.base import Parameter, TaskInstance
from astra_provider.database.astradb import RandomNumberGenerator

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


class FaultTask(TaskInstance):
    """Sleep ``FAULT_TASK_DELAY`` seconds per task (not a parameter: the same tasks run slow or fast), write
    ``{task_id}.txt`` (temporary name, then rename), record a result row; log each execution."""

    bundle = Parameter(bundled=True, type=str)
    output_dir = Parameter(bundled=True, type=str)
    log_path = Parameter(bundled=True, type=str)
    index = Parameter(type=int)

    def execute(self):
        delay = float(os.environ.get("FAULT_TASK_DELAY", "0"))
        results = []
        for task, _ in self.iterable():
            index = task.parameters["index"]
            with open(self.log_path, "a") as log:  # one short append per execution: atomic
                log.write(f"{task.task_id} {os.getpid()}\n")
            time.sleep(delay)
            path = Path(self.output_dir) / f"{task.task_id}.txt"
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary.write_text(f"{index}\n")
            os.replace(temporary, path)
            self.add_output_data_product(task, path)
            self.add_result(task, RandomNumberGenerator, samples=[float(index)])
            results.append(index)
        return results


def bundle_instance(name: str, size: int, output_dir: Path, log_path: Path) -> FaultTask:
    return FaultTask(
        bundle=name, output_dir=str(output_dir), log_path=str(log_path), index=tuple(range(size))
    )


# Worker processes -------------------------------------------------------------------------------------


def worker_environment(url: str, **variables: Any) -> dict[str, str]:
    environment = {**os.environ, "ASTRA_DATABASE_URL": url, **{k: str(v) for k, v in variables.items()}}
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), environment.get("PYTHONPATH", "")])
    return environment


def start_worker(url: str, spec: dict[str, Any], **variables: Any) -> subprocess.Popen:
    """A process that runs the bundles of ``spec`` (see :func:`main`) against ``url``."""
    return subprocess.Popen(
        [sys.executable, str(Path(__file__)), url, json.dumps(spec)],
        env=worker_environment(url, **variables),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def main(url: str, spec: dict[str, Any]) -> None:
    """Run ``spec["bundles"]`` (names) of ``spec["size"]`` tasks, in that order; print each summary.

    ``spec`` also has ``output_dir``, ``log_path``, ``chunk_size``, ``wait`` and ``go`` (a file
    to wait for before starting, so that many workers start together).
    """
    from astra_provider import database

    database.configure(url)
    go = spec.get("go")
    while go and not os.path.exists(go):
        time.sleep(0.01)
    for name in spec["bundles"]:
        instance = bundle_instance(name, spec["size"], Path(spec["output_dir"]), Path(spec["log_path"]))
        instance.execute(chunk_size=spec.get("chunk_size"), wait=spec.get("wait", False))
        print(
            json.dumps({k: v for k, v in instance.summary().items() if not k.endswith("task_pks")}),
            flush=True,
        )


def finish(process: subprocess.Popen, timeout: float = 600) -> list[dict[str, Any]]:
    """Wait for a worker; its summaries (it must have succeeded)."""
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"worker failed ({process.returncode}):\n{stderr[-4000:]}"
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)  # reaped (not a zombie), its pipes closed


# What the database holds ------------------------------------------------------------------------------


def _engine(url: str):  # noqa: ANN202
    return create_engine(url.replace("postgresql://", "postgresql+psycopg2://"), poolclass=NullPool)


def _query(url: str, sql: str) -> list[tuple]:
    engine = _engine(url)
    try:
        if engine.dialect.name == "sqlite":
            sql = sql.replace("astra.", "")
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def count_completed(url: str) -> int:
    return _query(url, "select count(*) from astra.task where status_code = 2")[0][0]


def outcome(url: str) -> dict[str, Any]:
    """Per ``task_id``: statuses; result rows of completed rows; recorded outputs and whether they hold."""
    statuses: dict[str, Counter] = {}
    for task_id, status, n in _query(
        url, "select task_id, status_code, count(*) from astra.task group by 1, 2"
    ):
        statuses.setdefault(task_id, Counter())[status] += n
    results = Counter(
        dict(
            _query(
                url,
                "select t.task_id, count(*) from astra.task t join astra.random_number_generator r "
                "on r.task_pk = t.pk group by t.task_id",
            )
        )
    )
    outputs: dict[str, list[str]] = {}
    for task_id, path in _query(
        url,
        "select t.task_id, d.path from astra.task t "
        "join astra.task_output_data_product o on o.task_pk = t.pk "
        "join astra.data_product d on d.pk = o.data_product_pk",
    ):
        outputs.setdefault(task_id, []).append(path)
    return {"statuses": statuses, "results": results, "outputs": outputs}


def executions(log_path: Path) -> Counter:
    """How many times each task was executed (from the workers' append-only log)."""
    if not log_path.exists():
        return Counter()
    return Counter(line.split()[0] for line in log_path.read_text().splitlines() if line.strip())


def check_exactly_once(
    url: str, n_tasks: int, output_dir: Path | None = None, killed: Iterable[int] = ()
) -> dict[str, Any]:
    """Assert the targets: ``n_tasks`` task_ids, each COMPLETED exactly once with one result row and one
    recorded output file that exists and holds the task's index; nothing RUNNING. Return the outcome.

    :param output_dir: also assert that it holds the recorded files and nothing else (no orphaned file),
        but for the temporary file a process in ``killed`` (pids) may have been writing when killed.
    """
    found = outcome(url)
    statuses = found["statuses"]
    assert len(statuses) == n_tasks, f"{len(statuses)} task_ids, expected {n_tasks}"
    not_once = {tid: dict(s) for tid, s in statuses.items() if s[2] != 1}
    assert not not_once, f"tasks not COMPLETED exactly once: {list(not_once.items())[:5]}"
    running = {tid: dict(s) for tid, s in statuses.items() if s[1]}
    assert not running, f"tasks left RUNNING: {list(running.items())[:5]}"
    wrong = {tid: n for tid, n in found["results"].items() if n != 1}
    assert not wrong and len(found["results"]) == n_tasks, f"result rows per task: {list(wrong.items())[:5]}"
    for tid in statuses:
        paths = found["outputs"].get(tid, [])
        assert len(paths) == 1, f"{tid}: {len(paths)} recorded outputs"
        assert Path(paths[0]).exists(), f"{tid}: recorded output {paths[0]} does not exist"
        assert Path(paths[0]).read_text().strip().isdigit(), f"{tid}: output {paths[0]} is not complete"
    if output_dir is not None:
        recorded = {paths[0] for paths in found["outputs"].values()}
        files = {str(path) for path in Path(output_dir).iterdir() if not path.name.startswith(".")}
        assert files == recorded, f"files not recorded: {sorted(files - recorded)[:5]}"
        temporaries = [path.name for path in Path(output_dir).iterdir() if path.name.startswith(".")]
        allowed = {f".{pid}.tmp" for pid in killed}
        left = [name for name in temporaries if not any(name.endswith(end) for end in allowed)]
        assert not left and len(temporaries) <= len(allowed), f"temporary files left: {temporaries[:5]}"
    return found


# Faults of the PostgreSQL server ----------------------------------------------------------------------


def _as_postgres(*command: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


class PostgresControl:
    """Stop and start a server of ``temporary_postgres`` (its data directory, port and sockets kept)."""

    def __init__(self, url: str) -> None:
        from astra_provider.devtools import postgres_bindir

        self.port = make_url(url).port
        self.pg_ctl = str(postgres_bindir() / "pg_ctl")
        rows = dict(
            _query(
                url,
                "select name, setting from pg_settings "
                "where name in ('data_directory', 'unix_socket_directories', 'max_connections')",
            )
        )
        self.data = rows["data_directory"]
        self.options = (
            f"-p {self.port} -k {rows['unix_socket_directories']} -c listen_addresses=127.0.0.1 "
            f"-c fsync=off -c max_connections={rows['max_connections']}"
        )

    def stop(self) -> None:
        """Stop at once (``immediate``: connections are cut, uncommitted transactions are lost)."""
        subprocess.run(_as_postgres(self.pg_ctl, "-D", self.data, "-m", "immediate", "stop"), check=True,
                       capture_output=True)  # fmt: skip

    def start(self) -> None:
        log = str(Path(self.data).parent / "log")
        subprocess.run(
            _as_postgres(self.pg_ctl, "-D", self.data, "-o", self.options, "-l", log, "-w", "start"),
            check=True,
            capture_output=True,
        )


COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"  # psycopg2's commit: a simple-query message
CHUNK_UPDATE = b"UPDATE astra.task AS t SET"  # the statement that records a chunk's tasks


class CommitCutter:
    """A TCP proxy in front of PostgreSQL that cuts one connection at the ``COMMIT`` of a recorded chunk.

    Armed with :meth:`arm`, the ``after``-th connection ``COMMIT`` that follows a chunk's ``UPDATE`` is:

    - ``mode="after"``: sent to the server, which commits; its reply is dropped and the connection closed
      (the client cannot know the chunk was committed);
    - ``mode="stop"``: held back while ``on_cut`` runs (e.g. stops the server), then the connection is
      closed (the chunk was not committed, and the server is down).
    """

    def __init__(self, target_url: str) -> None:
        target = make_url(target_url)
        self.target = (target.host, target.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = target.set(port=self.port, query={"sslmode": "disable"}).render_as_string(
            hide_password=False
        )
        self.mode: str | None = None
        self.after = 1
        self.on_cut = None
        self.cuts = 0
        self._seen = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str, after: int = 1, on_cut=None) -> None:  # noqa: ANN001
        with self._lock:
            self.mode, self.after, self.on_cut, self._seen = mode, after, on_cut, 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:  # the server is down: the client sees its connection closed
                _close(client)
                continue
            state = {"update": False, "drop_reply": False, "tail": b""}
            threading.Thread(target=self._client_to_server, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._server_to_client, args=(server, client, state), daemon=True).start()

    def _client_to_server(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        try:
            while data := client.recv(65536):
                window = state["tail"] + data
                state["tail"] = window[-64:]
                if CHUNK_UPDATE in window:
                    state["update"] = True
                if COMMIT in window and state["update"]:
                    state["update"] = False
                    mode = self._cut_now()
                    if mode == "after":
                        state["drop_reply"] = True
                        server.sendall(data)
                        return  # the other pump reads the reply, drops it and closes
                    if mode == "stop":
                        if self.on_cut is not None:
                            self.on_cut()
                        return
                server.sendall(data)
        except OSError:
            pass
        finally:
            if not state["drop_reply"]:
                _close(client, server)

    def _cut_now(self) -> str | None:
        """The mode of the cut if this chunk ``COMMIT`` is the one to cut (then disarmed), else None."""
        with self._lock:
            if self.mode is None:
                return None
            self._seen += 1
            if self._seen < self.after:
                return None
            mode, self.mode = self.mode, None
            self.cuts += 1
            return mode

    def _server_to_client(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while data := server.recv(65536):
                if state["drop_reply"]:  # the server committed: close without telling the client
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, server)

    def close(self) -> None:
        self.listener.close()


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


if __name__ == "__main__":  # run the module's own FaultTask (fault_scenarios.FaultTask, not __main__'s)
    import fault_scenarios

    fault_scenarios.main(sys.argv[1], json.loads(sys.argv[2]))
