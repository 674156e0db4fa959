"""The task lifecycle under faults (issue #12), on SQLite and on real PostgreSQL servers.

Each test reproduces a fault of the issue and asserts the outcome in the database and on disk: after the
fault and a re-run, every task is COMPLETED exactly once, with exactly one result row and one recorded output
file that exists and is complete, and nothing stays RUNNING; executions (logged by the task itself) exceed
the number of tasks by at most the chunk in flight of a killed process. Workers and faults are in
``fault_scenarios``; ``bench/bench_faults.py`` runs the heavy variants (8 processes x 5 bundles x 2,000
tasks, kill -9 of 20,000 tasks).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fault_scenarios import (
    CommitCutter,
    PostgresControl,
    bundle_instance,
    check_exactly_once,
    count_completed,
    executions,
    finish,
    kill,
    outcome,
    start_worker,
    worker_environment,
)
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from astra_provider import __version__, database
from astra_provider.database import session_scope
from astra_provider.database.astradb import Status, Task
from astra_provider.database.leases import LEASE_STAGE, recover_stale_tasks, task_status
from astra_provider.database.retry import DatabaseUnavailableError, run_transaction
from astra_provider.devtools import create_database, temporary_postgres

CHUNK = 10


def wait_for(condition, timeout: float = 300, what: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def completed_at_least(url: str, n: int, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"the worker ended early: {process.communicate()}")
    try:
        return count_completed(url) >= n
    except Exception:  # the SQLite file or the tables are not there yet
        return False


def spec(tmp_path: Path, bundles: list[str], size: int, **extra) -> dict:  # noqa: ANN003
    (tmp_path / "out").mkdir(exist_ok=True)
    return {
        "bundles": bundles,
        "size": size,
        "output_dir": str(tmp_path / "out"),
        "log_path": str(tmp_path / "executions.log"),
        "chunk_size": CHUNK,
        **extra,
    }


# Killed mid-bundle ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("then", ["rerun", "recover"])
def test_kill_9_mid_bundle_loses_at_most_the_chunk_in_flight(astra_db, tmp_path, then):
    n = 60
    worker = start_worker(astra_db, spec(tmp_path, ["A"], n), FAULT_TASK_DELAY=0.05)
    wait_for(lambda: completed_at_least(astra_db, 2 * CHUNK, worker), what="two recorded chunks")
    kill(worker)

    # Each chunk was recorded whole; the others are RUNNING, under a lease whose process is gone: stale.
    found = outcome(astra_db)
    completed = sum(s[Status.COMPLETED] for s in found["statuses"].values())
    running = sum(s[Status.RUNNING] for s in found["statuses"].values())
    assert completed % CHUNK == 0 and completed >= 2 * CHUNK and completed + running == n
    report = run_transaction(task_status)
    assert report["stale"] == running and report["live"] == 0
    assert report["oldest_stale_lease"]["reason"] == "process gone"
    assert all(Path(paths[0]).exists() for paths in found["outputs"].values())  # recorded outputs exist

    if then == "recover":  # astra status shows them, astra recover marks them failed (idempotent)
        shown = run_cli(astra_db, "status")
        assert shown.returncode == 0, shown.stderr
        assert f"running: 0 live, {running} stale" in shown.stdout and "process gone" in shown.stdout
        recovered = run_cli(astra_db, "recover")
        assert f"marked {running} stale task(s) failed" in recovered.stdout, recovered.stderr
        assert "no stale tasks" in run_cli(astra_db, "recover").stdout
        assert run_transaction(recover_stale_tasks)["recovered"] == 0
        assert run_transaction(task_status)["stale"] == 0

    rerun = bundle_instance("A", n, tmp_path / "out", tmp_path / "executions.log")
    rerun.execute(chunk_size=CHUNK)
    assert rerun.summary()["skipped"] == completed and rerun.summary()["completed"] == n - completed
    check_exactly_once(astra_db, n, tmp_path / "out", killed=[worker.pid])
    runs = executions(tmp_path / "executions.log")
    assert len(runs) == n and sum(runs.values()) <= n + CHUNK  # at most the chunk in flight, again
    with session_scope() as session:  # the stale rows say what happened to them
        stale = session.execute(
            select(Task.error_stage, Task.error_message).where(Task.status_code == 3)
        ).all()
    assert len(stale) == running
    assert {stage for stage, _ in stale} == {LEASE_STAGE}
    assert all("stopped without recording it" in message for _, message in stale)
    assert run_transaction(task_status)["stale"] == 0


def test_a_frozen_run_loses_its_claims_and_records_nothing_of_them(astra_db, tmp_path):
    """A run stopped (SIGSTOP) for longer than its lease: another run takes its tasks over; when it
    resumes, it records none of them (no second result row, no output record), and stops running them."""
    n = 60
    worker = start_worker(astra_db, spec(tmp_path, ["A"], n), FAULT_TASK_DELAY=0.05, ASTRA_LEASE_SECONDS=2)
    wait_for(lambda: completed_at_least(astra_db, CHUNK, worker), what="a recorded chunk")
    worker.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3)  # the lease (2 s) expires
        os.environ["ASTRA_LEASE_SECONDS"] = "2"
        takeover = bundle_instance("A", n, tmp_path / "out", tmp_path / "executions.log")
        takeover.execute(chunk_size=CHUNK)
    finally:
        os.environ.pop("ASTRA_LEASE_SECONDS", None)
        worker.send_signal(signal.SIGCONT)
    [frozen] = finish(worker)
    assert takeover.summary()["completed"] + takeover.summary()["skipped"] == n
    assert frozen["elsewhere"] > 0  # its claims were lost: not recorded by it
    assert frozen["completed"] + frozen["elsewhere"] == n
    check_exactly_once(astra_db, n, tmp_path / "out")
    runs = executions(tmp_path / "executions.log")
    assert sum(runs.values()) <= n + CHUNK  # the frozen run stopped running the tasks it lost


# PostgreSQL stopped ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_server():
    """A PostgreSQL server for the tests that stop it, with its control."""
    with temporary_postgres(max_connections=50) as admin_url:
        yield admin_url, PostgresControl(admin_url)
    database.dispose_engines()


@pytest.fixture
def own_database(own_server, tmp_path):
    admin_url, control = own_server
    url = create_database(admin_url, f"faults_{random.randrange(10**9)}")
    database.init_database(url)
    database.configure(url)
    try:
        yield url, control
    finally:
        database.configure(None)
        database.dispose_engines()


def test_postgresql_stopped_mid_bundle_is_waited_for(own_database, tmp_path):
    url, control = own_database
    n = 60
    worker = start_worker(url, spec(tmp_path, ["A"], n), FAULT_TASK_DELAY=0.05)
    wait_for(lambda: completed_at_least(url, CHUNK, worker), what="a recorded chunk")
    control.stop()
    time.sleep(3)  # chunks finish meanwhile: their recording is retried with backoff
    control.start()
    [summary] = finish(worker)
    assert summary["completed"] == n
    check_exactly_once(url, n, tmp_path / "out")
    assert sum(executions(tmp_path / "executions.log").values()) == n  # nothing ran twice


@pytest.mark.parametrize("mode", ["after", "stop"])
def test_postgresql_lost_at_the_commit_of_a_chunk(own_database, tmp_path, mode):
    """``after``: the server commits a chunk but the connection is cut before the client hears of it;
    ``stop``: the server stops at the instant the client commits (and starts again 3 s later)."""
    url, control = own_database
    n = 50
    cutter = CommitCutter(url)
    try:
        if mode == "after":
            cutter.arm("after", after=2)
        else:
            cutter.arm(
                "stop", after=2, on_cut=lambda: (control.stop(), threading.Timer(3, control.start).start())
            )
        worker = start_worker(cutter.url, spec(tmp_path, ["A"], n), FAULT_TASK_DELAY=0.01)
        [summary] = finish(worker)
    finally:
        cutter.close()
    assert cutter.cuts == 1
    assert summary["completed"] == n and summary["failed"] == 0
    check_exactly_once(url, n, tmp_path / "out")
    assert sum(executions(tmp_path / "executions.log").values()) == n


def test_postgresql_down_for_good_is_a_clear_error_and_a_rerun_recovers(own_database, tmp_path, monkeypatch):
    """The server stops mid-bundle and stays down longer than the retry budget: a DatabaseUnavailableError
    names the database and the budget; the tasks not recorded stay RUNNING, and a later run in the same
    process takes them over."""
    url, control = own_database
    n = 30
    monkeypatch.setenv("ASTRA_DB_RETRY_SECONDS", "2")
    monkeypatch.setenv("FAULT_TASK_DELAY", "0.05")
    (tmp_path / "out").mkdir()
    instance = bundle_instance("A", n, tmp_path / "out", tmp_path / "executions.log")
    stopper = threading.Timer(0.7, control.stop)
    stopper.start()
    try:
        with pytest.raises(DatabaseUnavailableError) as raised:
            instance.execute(chunk_size=CHUNK)
    finally:
        stopper.join()
        control.start()
    message = str(raised.value)
    assert make_url(url).database in message and "ASTRA_DB_RETRY_SECONDS=2" in message
    assert "***" not in message or make_url(url).password is None
    monkeypatch.setenv("FAULT_TASK_DELAY", "0")
    rerun = bundle_instance("A", n, tmp_path / "out", tmp_path / "executions.log")
    rerun.execute(chunk_size=CHUNK)
    assert rerun.summary()["completed"] + rerun.summary()["skipped"] == n
    check_exactly_once(url, n, tmp_path / "out")


# Overlapping runs ----------------------------------------------------------------------------------------


def test_eight_overlapping_processes_execute_each_task_once(astra_db, tmp_path):
    size, names = 30, ["A", "B", "C", "D", "E"]
    go = tmp_path / "go"
    workers = []
    for i in range(8):
        order = names[i % 5 :] + names[: i % 5]  # every process runs every bundle, starting elsewhere
        workers.append(
            start_worker(astra_db, spec(tmp_path, order, size, go=str(go)), FAULT_TASK_DELAY=0.005)
        )
    go.touch()
    summaries = [summary for worker in workers for summary in finish(worker)]
    assert len(summaries) == 8 * 5
    assert sum(s["completed"] for s in summaries) == size * len(names)  # each task completed by one of them
    assert all(s["failed"] == 0 for s in summaries)
    check_exactly_once(astra_db, size * len(names), tmp_path / "out")
    runs = executions(tmp_path / "executions.log")
    assert len(runs) == size * len(names) and sum(runs.values()) == size * len(names)


def test_overlapping_runs_that_wait_all_get_every_result(astra_db, tmp_path):
    go = tmp_path / "go"
    workers = [
        start_worker(astra_db, spec(tmp_path, ["A"], 40, go=str(go), wait=True), FAULT_TASK_DELAY=0.01)
        for _ in range(4)
    ]
    go.touch()
    summaries = [summary for worker in workers for summary in finish(worker)]
    assert all(s["completed"] + s["skipped"] == 40 and s["elsewhere"] == 0 for s in summaries)
    assert sum(s["completed"] for s in summaries) == 40
    check_exactly_once(astra_db, 40, tmp_path / "out")


def test_concurrent_engine_starts_and_initdb_do_not_collide(postgres_server, tmp_path):
    """18 processes start at once on a database with the schema (no DDL at start), and 4 `astra initdb`
    run at once on an empty one (they wait for each other)."""
    url = create_database(postgres_server, "faults_concurrent_start")
    code = (
        "from astra_provider.contrib.examples import GreedyPrimes\n"
        "import sys\nGreedyPrimes(max_value=int(sys.argv[1])).execute()\n"
    )
    initdbs = [
        subprocess.Popen(
            [sys.executable, "-m", "astra_provider.cli", "initdb"],
            env=worker_environment(url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(4)
    ]
    results = [process.communicate(timeout=300) + (process.returncode,) for process in initdbs]
    assert all(rc == 0 for _, _, rc in results), [err for _, err, _ in results]
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(10 + i)],
            env=worker_environment(url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(18)
    ]
    errors = [process.communicate(timeout=600)[1] for process in starts]
    assert all(process.returncode == 0 for process in starts), [e for e in errors if e][:2]
    with database.session_scope(url) as session:
        assert session.scalar(text("select count(*) from astra.task where status_code = 2")) == 18
    database.dispose_engines()


# What PostgreSQL refuses to store -------------------------------------------------------------------------


def test_nul_characters_and_lone_surrogates_are_stored_escaped(astra_db, tmp_path):
    from astra_provider.base import Parameter, TaskInstance
    from astra_provider.database.astradb import RandomNumberGenerator

    class Texts(TaskInstance):
        note = Parameter(bundled=True)
        value = Parameter()

        def execute(self):
            results = []
            for task, _ in self.iterable():
                value = task.parameters["value"]
                if value == "raise":
                    raise ValueError("card=\x00 in a header")
                if value == "surrogate":
                    raise OSError("file name \udcff is not UTF-8")
                self.add_result(task, RandomNumberGenerator, samples=[value, "nul\x00", "lone \ud800"])
                results.append({"text": f"{value}\x00", "key\x00": "\udcff"})
            return results

    values = ("plain", "raise", "a\x00b", "surrogate", "huge" + "x" * 1_000_000, float("inf"), float("nan"))
    bundle = Texts(note="bundled \x00 \udc80", value=values)
    returned = bundle.execute()
    assert len(returned) == len(values)
    with session_scope() as session:
        rows = session.execute(select(Task).order_by(Task.pk)).scalars().all()
    statuses = [row.status for row in rows]
    assert Status.RUNNING not in statuses  # the bundle is recorded, good tasks included
    assert statuses.count(Status.FAILED) == 2 and statuses.count(Status.COMPLETED) == len(values) - 2
    failed = [row for row in rows if row.status == Status.FAILED]
    assert failed[0].error_message == "ValueError: card=\\x00 in a header"  # escaped, visible
    assert failed[1].error_message == "OSError: file name \\udcff is not UTF-8"
    assert "card=\\x00" in failed[0].error_traceback
    plain = rows[0]
    assert plain.result == {"text": "plain\\x00", "key\\x00": "\\udcff"}
    # Parameters keep their exact values (their JSON text is ASCII), the huge one and inf/nan included.
    recorded = [Task.get_by_id(row.pk).parameters["value"] for row in rows]
    assert recorded[:4] == list(values[:4]) and recorded[4] == values[4] and recorded[5] == float("inf")
    assert recorded[6] != recorded[6]  # nan
    with session_scope() as session:
        samples = session.execute(text("select samples from astra.random_number_generator")).scalars().all()
    decoded = [json.loads(s) if isinstance(s, str) else s for s in samples]
    assert all(sample[1:] == ["nul\\x00", "lone \\ud800"] for sample in decoded)
    # the same tasks are found again (skip-if-done), the NUL and surrogate parameters included
    again = Texts(note="bundled \x00 \udc80", value=values)
    again.execute()
    assert again.summary()["skipped"] == len(values) - 2 and again.summary()["failed"] == 2
    with session_scope() as session:  # still one COMPLETED row and one result row per completed task
        completed = (
            session.execute(select(Task.task_id).where(Task.status_code == Status.COMPLETED)).scalars().all()
        )
        n_samples = session.scalar(text("select count(*) from astra.random_number_generator"))
    assert len(completed) == len(set(completed)) == len(values) - 2 and n_samples == len(values) - 2


# Read-only access, missing schema, URLs --------------------------------------------------------------------


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "astra_provider.cli", *args],
        env=worker_environment(url),
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_read_only_role_reads_everything(postgres_db, tmp_path):
    from astra_provider.hooks.astra import AstraHook

    bundle = bundle_instance("A", 3, tmp_path / "out", tmp_path / "executions.log")
    (tmp_path / "out").mkdir()
    bundle.execute()
    pk = bundle.tasks[1].pk
    with session_scope() as session:
        for statement in (
            "CREATE ROLE astra_reader LOGIN PASSWORD 'reader-secret'",
            f"GRANT CONNECT ON DATABASE {make_url(postgres_db).database} TO astra_reader",
            "GRANT USAGE ON SCHEMA astra TO astra_reader",
            "GRANT SELECT ON ALL TABLES IN SCHEMA astra TO astra_reader",
        ):
            session.execute(text(statement))
    reader = make_url(postgres_db).set(username="astra_reader", password="reader-secret")
    reader_url = reader.render_as_string(hide_password=False)
    shown = run_cli(reader_url, "show", str(pk))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["parameters"]["index"] == 1
    status = run_cli(reader_url, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["classes"][0]["COMPLETED"] == 3
    database.configure(reader_url)
    task = Task.get_by_id(pk)
    assert task.parameters["index"] == 1 and task.version_parameters
    assert [dp.path for dp in task.output_data_products][0].endswith(f"{task.task_id}.txt")
    hook = AstraHook(astra_conn_id=None)
    assert set(hook.output_data_product_pks([t.pk for t in bundle.tasks])) == {t.pk for t in bundle.tasks}
    assert len(hook.input_data_product_paths([pk])) == 0  # no inputs
    # writing is refused by the server, with its own message
    with pytest.raises(Exception, match="permission denied"):
        bundle_instance("B", 2, tmp_path / "out", tmp_path / "executions.log").execute()


def test_a_database_without_the_schema_says_to_run_initdb(postgres_server):
    url = create_database(postgres_server, "faults_no_schema")
    shown = run_cli(url, "show", "1")
    assert shown.returncode != 0
    assert "astra initdb" in shown.stderr and "faults_no_schema" in shown.stderr
    initialised = run_cli(url, "initdb")
    assert initialised.returncode == 0, initialised.stderr
    assert "created table astra.task" in initialised.stdout
    assert "already current" in run_cli(url, "initdb").stdout  # idempotent


def test_initdb_hides_the_password_and_a_driverless_url_uses_psycopg2(postgres_server):
    url = make_url(create_database(postgres_server, "faults_url")).set(password="hunter2-secret")
    driverless = url.set(drivername="postgresql").render_as_string(hide_password=False)
    assert driverless.startswith("postgresql://")
    done = run_cli(driverless, "initdb")
    assert done.returncode == 0, done.stderr
    assert "hunter2-secret" not in done.stdout + done.stderr and "***" in done.stdout
    engine = database.get_engine(driverless)
    assert engine.dialect.driver == "psycopg2"
    database.dispose_engines()


def test_initdb_upgrades_a_database_of_the_version_before_leases(postgres_server):
    """A database with the previous version's schema (no leases, claims or version parameters; the
    junction named task_parameter) is refused until `astra initdb` upgrades it, keeping its rows; its
    task left RUNNING has no lease, so it is stale."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from astra_provider.database.astradb import Base
    from astra_provider.database.schema import SchemaError

    url = create_database(postgres_server, "faults_upgrade")
    database.init_database(url)
    database.dispose_engines()
    old = create_engine(url)
    with old.begin() as connection:  # back to the previous version's schema, with a few rows
        for statement in (
            "DROP VIEW astra.task_parameter",
            "ALTER TABLE astra.task_parameter_link RENAME TO task_parameter",
            "ALTER INDEX astra.ix_astra_task_parameter_link_task_pk "
            "RENAME TO ix_astra_task_parameter_task_pk",
            "ALTER INDEX astra.ix_astra_task_parameter_link_parameter_pk "
            "RENAME TO ix_astra_task_parameter_parameter_pk",
            "DROP INDEX astra.ux_task_claim",
            "CREATE INDEX ix_task_task_id ON astra.task (task_id)",
            "ALTER TABLE astra.task DROP COLUMN claim, DROP COLUMN lease_pk",
            "DROP TABLE astra.lease, astra.version_parameter",
            "INSERT INTO astra.parameter (parameter_name, parameter_value, parameter_value_hash) "
            "VALUES ('max_value', '30', 'h')",
            "INSERT INTO astra.task (task_module, task_name, task_id, version, status_code) VALUES "
            "('astra_provider.contrib.examples', 'GreedyPrimes', 'GreedyPrimes_1', '0.0.9', 2), "
            "('astra_provider.contrib.examples', 'GreedyPrimes', 'GreedyPrimes_2', '0.0.9', 1)",
            "INSERT INTO astra.task_parameter (task_pk, parameter_pk) VALUES (1, 1), (2, 1)",
        ):
            connection.execute(text(statement))
    try:
        with pytest.raises(SchemaError, match=r"faults_upgrade lacks .*astra initdb"):
            database.get_engine(url)
        upgraded = run_cli(url, "initdb")
        assert upgraded.returncode == 0, upgraded.stderr
        for line in (
            "renamed table astra.task_parameter to astra.task_parameter_link",
            "created table astra.lease",
            "created view astra.task_parameter",
            "added column astra.task.claim",
            "dropped index astra.ix_task_task_id",
            "recorded the version parameters of 0.0.9",
        ):
            assert line in upgraded.stdout
        with old.connect() as connection:
            differences = compare_metadata(
                MigrationContext.configure(
                    connection, opts={"include_schemas": True, "include_name": _astra}
                ),
                Base.metadata,
            )
            links = connection.execute(text("select task_pk from astra.task_parameter order by 1")).all()
        # the rows kept, through the view, with the version parameters of their version
        assert differences == [] and [pk for (pk,) in links] == [1, 1, 1, 2, 2, 2]
        database.configure(url)
        report = run_transaction(task_status)
        assert report["stale"] == 1 and report["oldest_stale_lease"]["reason"] == "no lease"
        assert run_transaction(recover_stale_tasks)["recovered"] == 1
        from astra_provider.contrib.examples import GreedyPrimes

        assert GreedyPrimes(max_value=30).execute()[-1] == 29
    finally:
        old.dispose()
        database.configure(None)
        database.dispose_engines()


def _astra(name, type_, parent_names):  # noqa: ANN001, ANN202
    return name == "astra" if type_ == "schema" else True


def test_a_claim_inserted_meanwhile_by_another_run_wins(astra_db):
    """Another run inserts the claim of a task after this run looked (PostgreSQL: the insert waits on the
    unique index, fails, and the claim is looked up again; SQLite: the transaction waits to begin): the task
    is held elsewhere, not run twice, and no second row claims it."""
    from astra_provider.contrib.examples import GreedyPrimes
    from astra_provider.database.claims import task_id

    instance = GreedyPrimes(max_value=7)
    identity = task_id(GreedyPrimes, {"max_value": "7", "min_value": "2"}, [])  # encoded values, no inputs
    engine = database.get_engine()
    other = engine.connect()
    transaction = other.begin()
    lease_pk = other.execute(
        text(
            "insert into astra.lease (owner, host, pid, created, renewed, expires) values "
            "('elsewhere/1/x', 'elsewhere', 1, :now, :now, :later) returning pk"
        ),
        {"now": "2000-01-01 00:00:00", "later": "2999-01-01 00:00:00"},
    ).scalar_one()
    other.execute(
        text(
            "insert into astra.task (task_module, task_name, task_id, version, status_code, claim, "
            "lease_pk, created, modified) values ('astra_provider.contrib.examples', 'GreedyPrimes', :id, "
            ":version, 1, 1, :lease, :now, :now)"
        ),
        {"id": identity, "version": __version__, "lease": lease_pk, "now": "2000-01-01 00:00:00"},
    )
    outcome_of_run: dict = {}
    runner = threading.Thread(target=lambda: outcome_of_run.update(result=instance.execute()))
    runner.start()
    time.sleep(1.5)  # the run is waiting for the other transaction
    transaction.commit()
    other.close()
    runner.join(timeout=120)
    assert not runner.is_alive()
    assert outcome_of_run["result"] is None and instance.summary()["elsewhere"] == 1
    with session_scope() as session:
        rows = session.execute(select(Task.status_code, Task.claim).where(Task.task_id == identity)).all()
    assert rows == [(Status.RUNNING, 1)]  # only the other run's claim


def test_an_output_file_gone_before_recording_fails_its_task(astra_db, tmp_path):
    from astra_provider.base import Parameter, TaskInstance

    class Writes(TaskInstance):
        name = Parameter()

        def execute(self):
            for task, _ in self.iterable():
                path = tmp_path / f"{task.parameters['name']}.txt"
                path.write_text("complete")
                self.add_output_data_product(task, path)
                if task.parameters["name"] == "vanishes":
                    path.unlink()  # as if another run had removed it, or it was never complete
            return [task.parameters["name"] for task, _ in self.iterable()]

    bundle = Writes(name=("kept", "vanishes"))
    assert bundle.execute() == ["kept", None]
    kept, vanished = [Task.get_by_id(t.pk) for t in bundle.tasks]
    assert kept.status == Status.COMPLETED and [dp.path for dp in kept.output_data_products] == [
        str(tmp_path / "kept.txt")
    ]
    assert vanished.status == Status.FAILED and vanished.output_data_products == []
    assert "vanishes.txt' does not exist when recorded" in vanished.error_message


# A full disk -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def apstar_files(tmp_path_factory) -> list[str]:
    """Three apStar files (1-3 visits each: a few rows per file)."""
    from astra_provider.synthetic.survey import generate_survey

    root = tmp_path_factory.mktemp("apstar")
    truth = generate_survey(
        root, n_stars=3, visits_per_star=(1, 3), snr=(50.0, 90.0), seed=12, filetypes=("apStar",)
    )
    return [str(p) for p in truth.paths("apStar")]


@pytest.mark.parametrize("disk", ["injected", "tmpfs"])
def test_a_full_disk_then_a_rerun_completes_each_task_once_with_one_file(
    astra_db, apstar_files, tmp_path, monkeypatch, disk
):
    """ENOSPC while the continuum bundle writes its file (injected half way through the data, or a real
    256 kB tmpfs when this runs as root), then the same bundle again with room: no partial or temporary
    file is left, each task is COMPLETED once (its failed row kept), with one result row per spectrum row
    and one output file that reads back."""
    import errno

    import numpy as np
    from test_fits import small_filesystem, unmount

    from astra_provider.base import TaskFailedError
    from astra_provider.contrib.continuum import SinusoidalContinuum, read_normalized
    from astra_provider.database.astradb import Continuum
    from astra_provider.fits import writer as fits_writer
    from astra_provider.sdss.spectrum import read_spectrum

    out = tmp_path / "out"
    if disk == "tmpfs":
        if small_filesystem(out, "256k") is None:
            pytest.skip("mounting a size-limited tmpfs needs root and mount rights (the injected case ran)")
    else:
        real_write_array = fits_writer._write_array

        def full_disk_after_half(handle, array):  # noqa: ANN001, ANN202
            handle.write(memoryview(np.ascontiguousarray(array)).cast("B")[: array.nbytes // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(fits_writer, "_write_array", full_disk_after_half)
    try:
        with pytest.raises(TaskFailedError, match="No space left on device"):
            SinusoidalContinuum(input_data_products=apstar_files, output_dir=str(out)).execute()
        assert list(out.iterdir()) == []  # no partial file, no temporary file
        if disk == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=16m", str(out)], check=True)
        else:
            monkeypatch.setattr(fits_writer, "_write_array", real_write_array)
        rerun = SinusoidalContinuum(input_data_products=apstar_files, output_dir=str(out))
        rerun.execute()
        assert rerun.summary()["completed"] == len(apstar_files)
        (written,) = list(out.iterdir())  # one bundle file, nothing else
        with session_scope() as session:
            rows = session.execute(select(Task.task_id, Task.status_code, Task.pk)).all()
            result_rows = session.execute(select(Continuum.task_pk, Continuum.row_index)).all()
        statuses = {}
        for task_id, status, _ in rows:
            statuses.setdefault(task_id, []).append(status)
        assert len(statuses) == len(apstar_files)
        assert all(sorted(s) == [Status.COMPLETED, Status.FAILED] for s in statuses.values()), statuses
        completed = {pk for _, status, pk in rows if status == Status.COMPLETED}
        expected_rows = sum(read_spectrum(path).n_spectra for path in apstar_files)
        assert len(result_rows) == expected_rows and len(set(result_rows)) == expected_rows
        assert {task_pk for task_pk, _ in result_rows} == completed  # none for the failed rows
        for task, path in zip(rerun.tasks, apstar_files, strict=True):
            (product,) = Task.get_by_id(task.pk).output_data_products
            assert product.path == str(written)
            assert read_normalized(product).n_spectra == read_spectrum(path).n_spectra  # complete
    finally:
        if disk == "tmpfs":
            unmount(out)
