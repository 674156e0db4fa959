"""``DataProductSensor``: real DAG runs (deferrable through its trigger, and poke mode) on synthetic SDSS
files, with the astra database on SQLite and PostgreSQL as the Airflow connection ``astra_default``; and
the exclusive claims that keep one file from being handed to two runs.
"""

from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path

import pytest
from data_product_helpers import load_test_dag, make_product, xcom_return_value
from sqlalchemy import select

from astra_provider.bundling import decode_pks
from astra_provider.database import session_scope
from astra_provider.database.astradb import DataProduct
from astra_provider.sensors.data_products import DataProductSensor, claim_data_products
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
    assert 0 < deferred.value.timeout.total_seconds() <= 300
    assert deferred.value.kwargs["deadline"] > 0


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
