"""``DataProductSensor``: real DAG runs (deferrable through its trigger, and poke mode) on synthetic SDSS
files, with the astra database on SQLite and PostgreSQL as the Airflow connection ``astra_default``; and
the exclusive claims that keep one file from being handed to two runs.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import pytest
from data_product_helpers import load_test_dag, make_product, xcom_return_value
from sqlalchemy import select

from astra_provider.bundling import decode_pks
from astra_provider.database import session_scope
from astra_provider.database.astradb import DataProduct
from astra_provider.hooks.data_products import DataRootError
from astra_provider.sensors.data_products import (
    DEFERRAL_GRACE_SECONDS,
    DataProductSensor,
    claim_data_products,
)
from astra_provider.triggers.data_products import NewDataProductsTrigger, watermark_from_json

pytest_plugins = ["data_product_fixtures"]  # fixtures: airflow_db, astra_test_dags, astra_conn


@pytest.fixture(scope="module")
def survey_batches(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two deliveries of a small synthetic survey (real apStar/apVisit FITS in the SDSS layout)."""
    from astra_provider.synthetic.survey import generate_survey

    survey = tmp_path_factory.mktemp("survey")
    generate_survey(survey, n_stars=2, visits_per_star=2, filetypes=("apStar", "apVisit"), seed=3)
    files = sorted(survey.rglob("*.fits"))
    batches = [tmp_path_factory.mktemp("batch-a"), tmp_path_factory.mktemp("batch-b")]
    for i, path in enumerate(files):
        target = batches[i % 2] / path.relative_to(survey)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return batches


def _registered(url: str) -> dict[int, str]:
    with session_scope(url) as session:
        return dict(session.execute(select(DataProduct.pk, DataProduct.path)).all())


def _delivered(batch: Path, root: Path) -> set[str]:
    return {str(root / p.relative_to(batch)) for p in batch.rglob("*.fits")}


def _trigger_classpath(dag_id: str, run_id: str) -> str | None:
    """The classpath of the trigger the sensor deferred to (``None`` if it never deferred)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    with create_session() as session:
        trigger_id = session.scalar(
            select(TaskInstance.trigger_id).where(
                TaskInstance.dag_id == dag_id,
                TaskInstance.run_id == run_id,
                TaskInstance.task_id == "wait_for_data_products",
            )
        )
        trigger = session.get(Trigger, trigger_id) if trigger_id is not None else None
        return trigger.classpath if trigger is not None else None


@pytest.mark.parametrize("dag_id", ["astra_test_sensor_deferrable", "astra_test_sensor_poke"])
def test_sensor_registers_new_files_in_a_dag_run(
    dag_id: str, astra_conn: str, astra_test_dags: Path, survey_batches: list[Path], tmp_path: Path
) -> None:
    from airflow.utils.state import DagRunState

    dag = load_test_dag(dag_id)
    root = tmp_path / "sas"
    seen: set[int] = set()
    for batch in survey_batches:  # two runs: the second one only gets the second delivery
        run = dag.test(run_conf={"source": str(batch), "root": str(root)})
        assert run.state == DagRunState.SUCCESS

        value = xcom_return_value(dag_id, run.run_id, "wait_for_data_products")
        pks = decode_pks(value["data_product_pks"])
        registered = _registered(astra_conn)
        assert {registered[pk] for pk in pks} == _delivered(batch, root)
        assert seen.isdisjoint(pks) and set(registered) == seen | set(pks)
        seen |= set(pks)
        assert sum(value["counts"].values()) == len(pks)
        assert sorted(pk for pks in value["by_filetype"].values() for pk in decode_pks(pks)) == sorted(pks)
        if dag_id == "astra_test_sensor_deferrable":
            # The files were not ready when the sensor started: it waited in its trigger.
            assert _trigger_classpath(dag_id, run.run_id) == (
                "astra_provider.triggers.data_products.NewDataProductsTrigger"
            )


def _sensor(root: Path, **kwargs) -> DataProductSensor:
    settings = {"task_id": "wait", "root": str(root), "min_age_seconds": 1.0, "poke_interval": 0.1} | kwargs
    return DataProductSensor(**settings)


def test_concurrent_claims_hand_each_file_to_one_sensor(astra_conn: str, tmp_path: Path) -> None:
    """Two sensors (say, two overlapping runs) poke the same 1,100 files at the same time."""
    paths = {str(make_product(tmp_path, "apVisit", i)) for i in range(900)}
    paths |= {str(make_product(tmp_path, "apStar", i)) for i in range(200)}
    barrier = threading.Barrier(2)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def poke(i: int) -> None:
        sensor = _sensor(tmp_path, task_id=f"wait_{i}", deferrable=False)
        try:
            barrier.wait()
            outcome = sensor.poke({})
            results[i] = decode_pks(outcome.xcom_value["data_product_pks"]) if outcome.is_done else []
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=poke, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors, errors
    assert set(results[0]).isdisjoint(results[1])
    registered = _registered(astra_conn)
    assert sorted(results[0] + results[1]) == sorted(registered)
    assert set(registered.values()) == paths


def test_claims_are_exclusive_across_threads(astra_db: str, tmp_path: Path) -> None:
    """``claim_data_products`` from four threads over the same paths, in different orders."""
    paths = [str(make_product(tmp_path, "apVisit", i)) for i in range(400)]
    orders = [paths, paths[::-1], paths[100:] + paths[:100], paths[::2] + paths[1::2]]
    barrier = threading.Barrier(len(orders))
    claimed: list[list[str]] = [[] for _ in orders]

    errors: list[BaseException] = []

    def claim(i: int) -> None:
        barrier.wait()
        try:
            created, used = claim_data_products(orders[i], database_url=astra_db)
        except BaseException as error:  # e.g. a deadlock between the claims: a test failure, not a warning
            errors.append(error)
            return
        assert used == len(paths)
        claimed[i] = [p.path for p in created]

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(orders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    everything = [path for paths_of_one in claimed for path in paths_of_one]
    assert sorted(everything) == sorted(paths)  # each file exactly once


def test_poke_claims_at_most_max_files_and_continues_after_them(astra_conn: str, tmp_path: Path) -> None:
    paths = [str(make_product(tmp_path, "apStar", i, age=600 - i)) for i in range(5)]
    sensor = _sensor(tmp_path, deferrable=False, max_files=3, encode_pks=False)

    first = sensor.poke({})
    second = sensor.poke({})
    third = sensor.poke({})

    registered = _registered(astra_conn)
    assert [registered[pk] for pk in first.xcom_value["data_product_pks"]] == paths[:3]
    assert [registered[pk] for pk in second.xcom_value["data_product_pks"]] == paths[3:]
    assert (third.is_done, third.xcom_value) == (False, None)


def test_deferrable_sensor_defers_after_the_files_it_has_seen(astra_conn: str, tmp_path: Path) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    old = make_product(tmp_path, "apStar", 1, age=600)
    claim_data_products([str(old)], database_url=astra_conn)  # registered by an earlier run
    make_product(tmp_path, "apStar", 2, age=0)  # still being written
    sensor = _sensor(tmp_path, min_age_seconds=30, timeout=300)

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})

    trigger = deferred.value.trigger
    assert isinstance(trigger, NewDataProductsTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert trigger.watermark == (old.stat().st_mtime, str(old))
    assert (trigger.min_age_seconds, trigger.poll_interval) == (30, 0.1)
    # The trigger gives up at the deadline itself (with what it saw); the deferral timeout is a backstop.
    assert trigger.deadline == deferred.value.kwargs["deadline"]
    assert 0 < trigger.deadline - time.time() <= 300
    assert 300 < deferred.value.timeout.total_seconds() <= 300 + DEFERRAL_GRACE_SECONDS


def test_execute_complete_waits_again_when_other_runs_claimed_the_files(
    astra_conn: str, tmp_path: Path
) -> None:
    from airflow.sdk.exceptions import AirflowException, TaskDeferred

    path = make_product(tmp_path, "apVisit", 1)
    claim_data_products([str(path)], database_url=astra_conn)  # another run was faster
    sensor = _sensor(tmp_path)
    event = {
        "status": "success",
        "kind": "astra.new_data_products",
        "root": str(tmp_path),
        "paths": [str(path.relative_to(tmp_path))],
        "watermark": {"mtime": path.stat().st_mtime, "path": str(path)},
    }

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute_complete({}, event=event)
    assert deferred.value.trigger.watermark == watermark_from_json(event["watermark"])

    mine = make_product(tmp_path, "apVisit", 2)
    event = {**event, "paths": [str(mine.relative_to(tmp_path))]}
    value = sensor.execute_complete({}, event=event)
    assert [_registered(astra_conn)[pk] for pk in decode_pks(value["data_product_pks"])] == [str(mine)]

    with pytest.raises(AirflowException, match="boom"):
        sensor.execute_complete({}, event={"status": "error", "message": "boom"})


def test_reschedule_with_a_short_interval_warns() -> None:
    with pytest.warns(UserWarning, match="71172"):
        DataProductSensor(task_id="w", root="/data", deferrable=False, mode="reschedule", poke_interval=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        DataProductSensor(task_id="w", root="/data", deferrable=False, mode="reschedule", poke_interval=300)
        DataProductSensor(task_id="w", root="/data", mode="reschedule", poke_interval=5)  # deferrable wins


def test_include_registered_also_returns_files_registered_before(astra_conn: str, tmp_path: Path) -> None:
    """A second pass over a data root: registered files come back too; new ones are still claimed once."""
    old = [str(make_product(tmp_path, "apStar", i)) for i in range(3)]
    claim_data_products(old, database_url=astra_conn)  # registered by an earlier run
    new = str(make_product(tmp_path, "apVisit", 1))
    make_product(tmp_path, "apVisit", 2, age=0)  # still being written: not ready

    again = _sensor(tmp_path, deferrable=False, include_registered=True, encode_pks=False)
    outcome = again.poke({})
    registered = _registered(astra_conn)
    assert outcome.is_done
    assert sorted(registered[pk] for pk in outcome.xcom_value["data_product_pks"]) == sorted([*old, new])
    assert outcome.xcom_value["counts"] == {"apStar": 3, "apVisit": 1}

    # the new file was claimed by that call: a sensor that wants new files only finds nothing
    assert _sensor(tmp_path, deferrable=False, task_id="new_only").poke({}).is_done is False
    # and another pass returns the same four files
    repeat = _sensor(tmp_path, deferrable=False, include_registered=True, encode_pks=False).poke({})
    assert sorted(repeat.xcom_value["data_product_pks"]) == sorted(outcome.xcom_value["data_product_pks"])


def test_include_registered_in_execute_complete(astra_conn: str, tmp_path: Path) -> None:
    path = make_product(tmp_path, "apVisit", 1)
    claim_data_products([str(path)], database_url=astra_conn)
    event = {
        "status": "success",
        "root": str(tmp_path),
        "paths": [str(path.relative_to(tmp_path))],
        "watermark": {"mtime": path.stat().st_mtime, "path": str(path)},
    }
    value = _sensor(tmp_path, include_registered=True).execute_complete({}, event=event)
    assert [_registered(astra_conn)[pk] for pk in decode_pks(value["data_product_pks"])] == [str(path)]


def test_min_age_and_include_registered_take_rendered_templates(astra_conn: str, tmp_path: Path) -> None:
    """Templated (trigger-form params): strings such as "False" and "0" from DAGs without native rendering."""
    path = str(make_product(tmp_path, "apStar", 1, age=0))  # just written
    claim_data_products([path], database_url=astra_conn)
    sensor = _sensor(
        tmp_path,
        deferrable=False,
        min_age_seconds="{{ params.min_file_age_seconds }}",
        include_registered="{{ params.rediscover }}",
    )
    assert {"min_age_seconds", "include_registered"} <= set(sensor.template_fields)

    sensor.min_age_seconds, sensor.include_registered = "0", "False"  # rendered as strings
    assert sensor.poke({}).is_done is False  # registered already, and not included
    sensor.min_age_seconds, sensor.include_registered = 0, True  # rendered as native objects
    sensor._watermark = None  # a new run: its first check looks at every file
    assert sensor.poke({}).is_done is True
    sensor.min_age_seconds, sensor.include_registered = 600, "true"  # not old enough any more
    sensor._watermark = None
    assert sensor.poke({}).is_done is False

    sensor.include_registered = "maybe"
    with pytest.raises(ValueError, match="include_registered must be true or false"):
        sensor.poke({})


# Failing fast, logging what it sees, templated intervals, re-runs --------------------------------------


@pytest.mark.parametrize(
    ("make_root", "message"),
    [
        (
            lambda tmp: tmp / "no" / "such" / "dir",
            "data root {root} does not exist (its nearest existing parent is {tmp})",
        ),
        (
            lambda tmp: (tmp / "a-file").write_text("x") and tmp / "a-file",
            "data root {root} is not a directory",
        ),
        (lambda tmp: "", "the data root is empty: give the directory to watch (the data_root param)"),
    ],
    ids=["missing", "file", "empty"],
)
@pytest.mark.parametrize("deferrable", [True, False], ids=["deferrable", "poke"])
def test_a_bad_data_root_fails_at_once_naming_it(
    tmp_path: Path, make_root, message: str, deferrable: bool
) -> None:
    root = make_root(tmp_path)
    sensor = _sensor(root, deferrable=deferrable, soft_fail=True, timeout=600)  # soft_fail: still a failure
    expected = message.format(root=root, tmp=tmp_path)
    with pytest.raises(DataRootError) as failure:  # at once: nothing deferred, no poke loop
        sensor.execute({})
    assert str(failure.value) == expected
    from airflow.sdk.exceptions import AirflowFailException

    assert isinstance(failure.value, AirflowFailException)  # no retries


def test_a_root_that_disappears_while_deferred_fails_even_with_soft_fail(tmp_path: Path) -> None:
    sensor = _sensor(tmp_path, soft_fail=True)
    event = {"status": "error", "kind": "data_root", "message": f"data root {tmp_path}/gone does not exist"}
    with pytest.raises(DataRootError, match="gone does not exist"):
        sensor.resume_execution("execute_complete", {"event": event, "deadline": time.time() + 60}, {})
    from airflow.sdk.exceptions import AirflowSensorTimeout, AirflowSkipException

    timeout = {"status": "timeout", "message": f"no new data products under {tmp_path} before the deadline"}
    with pytest.raises(AirflowSensorTimeout, match="before the deadline"):
        _sensor(tmp_path).execute_complete({}, event=timeout)
    with pytest.raises(AirflowSkipException):  # soft_fail applies to the timeout, as documented
        sensor.resume_execution("execute_complete", {"event": timeout}, {})


def test_resuming_without_an_event_starts_over(astra_conn: str, tmp_path: Path) -> None:
    """``airflow tasks test`` on a task that had deferred resumes it without a trigger event."""
    from airflow.sdk.exceptions import TaskDeferred

    sensor = _sensor(tmp_path, timeout=300)
    with pytest.raises(TaskDeferred):  # nothing there yet: it checks the root and defers again
        sensor.resume_execution("execute_complete", {"deadline": time.time() + 60}, {})
    path = make_product(tmp_path, "apStar", 1)
    value = _sensor(tmp_path).resume_execution("execute_complete", {"deadline": time.time() + 60}, {})
    assert [_registered(astra_conn)[pk] for pk in decode_pks(value["data_product_pks"])] == [str(path)]


def test_a_wrong_data_root_fails_the_dag_run_without_deferring(
    airflow_db, astra_conn, tmp_path, capfd
) -> None:
    """``astra_test_discovery`` (a YAML DAG with a deferrable sensor step) with a mistyped root."""
    from airflow.utils.state import DagRunState, TaskInstanceState
    from airflow_helpers import get_dag, task_instances, use_test_bundles

    wrong = tmp_path / "sdss-typo"
    with use_test_bundles():
        dag_run = get_dag("astra_test_discovery").test(
            run_conf={"root": str(wrong), "output_dir": str(tmp_path)}
        )
    assert dag_run.state == DagRunState.FAILED
    tis = task_instances(dag_run)
    assert tis[("discover", -1)].state == TaskInstanceState.FAILED
    assert tis[("discover", -1)].next_method is None  # it never deferred
    assert tis[("scale_bundles", -1)].state == TaskInstanceState.UPSTREAM_FAILED
    output = capfd.readouterr()
    assert f"data root {wrong} does not exist" in output.out + output.err


def test_templated_poke_interval_and_timeout_reach_the_trigger(astra_conn: str, tmp_path: Path) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    sensor = _sensor(
        tmp_path,
        poke_interval="{{ params.poll }}",
        timeout="{{ params.wait }}",
        pattern="{{ params.pattern }}",
    )
    assert {"poke_interval", "timeout", "pattern"} <= set(sensor.template_fields)
    sensor.poke_interval, sensor.timeout, sensor.pattern = "2.5", "30", ""  # as rendered without native types
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    trigger = deferred.value.trigger
    assert (trigger.poll_interval, trigger.pattern) == (2.5, None)
    assert 0 < trigger.deadline - time.time() <= 30

    sensor.poke_interval = "soon"
    with pytest.raises(ValueError, match="wait: poke_interval must be a number >= 0, got 'soon'"):
        sensor.execute({})


def test_the_sensor_logs_each_file_it_does_not_take_once(astra_conn: str, tmp_path: Path, capfd) -> None:
    root = tmp_path / "sas"
    placed = make_product(root, "apStar", 1)
    deeper = make_product(root / "reduced", "apVisit", 2)  # one directory too deep for the SDSS layout
    sensor = _sensor(root, deferrable=False)

    value = sensor.execute({})  # poke mode: checks the root and the layout, then pokes until done
    registered = _registered(astra_conn)
    assert [registered[pk] for pk in decode_pks(value["data_product_pks"])] == [str(placed)]
    sensor._start()  # checked again (a second task): nothing is listed twice
    assert sensor.poke({}).is_done is False
    out = capfd.readouterr().out
    assert out.count(f"Not taking {deeper}: named like apVisit but not where the SDSS layout puts it") == 1
    assert f"Watching {root} for apStar, apVisit (SDSS layout): 1 files match, 1 new and ready" in out

    # The documented way to watch that tree: a pattern; files whose path ends in the layout keep their type.
    value = _sensor(root, deferrable=False, pattern="**/apVisit-*.fits", task_id="deep").poke({}).xcom_value
    assert value["counts"] == {"apVisit": 1}
    assert str(deeper) in _registered(astra_conn).values()


def test_event_paths_outside_the_root_are_refused(astra_conn: str, tmp_path: Path, capfd) -> None:
    """Issue #12: an event naming files elsewhere must not register them as data products."""
    root = tmp_path / "root"
    good = make_product(root, "apVisit", 1)
    outside = make_product(tmp_path / "elsewhere", "apStar", 3)
    link = root / "apogee" / "apStar-link.fits"
    link.symlink_to(outside)
    event = {
        "status": "success",
        "root": str(root),
        "paths": [
            "../../../../etc/passwd",
            "/etc/shadow",
            str(link.relative_to(root)),
            str(outside),
            str(good.relative_to(root)),
        ],
        "watermark": {"mtime": good.stat().st_mtime, "path": str(good)},
    }
    value = _sensor(root, encode_pks=False).execute_complete({}, event=event)
    assert [_registered(astra_conn)[pk] for pk in value["data_product_pks"]] == [str(good)]
    assert set(_registered(astra_conn).values()) == {str(good)}
    out = capfd.readouterr().out
    for refused in ("../../../../etc/passwd", "/etc/shadow", "apogee/apStar-link.fits", str(outside)):
        assert f"Refused path {refused}: outside the data root {root}" in out
    assert f"a link to {outside}" in out


def test_sigterm_stops_airflow_tasks_test_while_its_trigger_runs_in_process(airflow_db, tmp_path) -> None:
    """``airflow tasks test`` runs the trigger in its own process; SIGTERM must end it (issue #14)."""
    import signal
    import subprocess

    from airflow_helpers import AIRFLOW, use_test_bundles

    with use_test_bundles():
        process = subprocess.Popen(
            [
                str(AIRFLOW),
                "tasks",
                "test",
                "astra_test_sensor_deferrable",
                "wait_for_data_products",
                "-t",
                f'{{"root": "{tmp_path}"}}',
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ),
        )
    lines: list[str] = []
    try:
        for line in process.stdout:  # until the trigger runs in-process
            lines.append(line)
            if "giving up in" in line:
                break
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = "".join(lines) + output
    assert any("giving up in" in line for line in lines), log[-3000:]
    assert f"wait_for_data_products: terminated while waiting for files in {tmp_path}" in log, log[-3000:]
