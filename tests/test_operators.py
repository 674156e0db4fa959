"""Operators and bundling: planning bundles, running them with provenance, failures, and real Airflow runs.

The Airflow runs use the test DAG ``tests/dags/astra_test_chain`` (built by the DAG factory from
``astra_test_chain.yaml``): ``first`` reads numbers from files in bundles (a negative number fails that
task), ``second`` takes ``first``'s output files as its inputs.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
from airflow_helpers import (
    REPO,
    TEST_DAGS,
    environment,
    get_dag,
    init_airflow_db,
    run_airflow,
    task_instances,
    use_test_bundles,
)
from astra_test_tasks import ReadScale
from sqlalchemy import func, select

from astra_provider import database
from astra_provider.base import Parameter, TaskInstance, TupleParameter
from astra_provider.bundling import (
    choose_bundle_size,
    decode_pks,
    encode_pks,
    instance_from_bundle,
    plan_bundles,
)
from astra_provider.contrib.examples import GreedyPrimes, ScaledSum
from astra_provider.database import session_scope
from astra_provider.database.astradb import Bundle, DataProduct, Status, Task, TaskOutputDataProduct
from astra_provider.hooks.astra import AstraHook, connection_from_url
from astra_provider.operators._inputs import resolve_data_products
from astra_provider.operators.bundle import BundleTasksOperator
from astra_provider.operators.task import AstraTaskFailedError, AstraTaskOperator, ExecuteBundleOperator


class TupleLabels(TaskInstance):
    """A task with a per-task TupleParameter (bundles of it cannot be built from columns)."""

    model = Parameter(bundled=True, default="m")
    labels = TupleParameter(default=("a",))

    def execute(self):
        return [len(task.parameters["labels"]) for task, _ in self.iterable()]


@pytest.fixture
def astra_conn(astra_db):
    """The astra database of the test, reachable as the ``astra_default`` Airflow connection."""
    with environment(AIRFLOW_CONN_ASTRA_DEFAULT=connection_from_url(astra_db)):
        yield astra_db


def _statuses(task_name: str | None = None) -> dict[str, int]:
    query = select(Task.status_code, func.count()).group_by(Task.status_code)
    if task_name:
        query = query.where(Task.task_name == task_name)
    with session_scope() as session:
        return {Status(code).name: n for code, n in session.execute(query)}


# Primary keys as ranges --------------------------------------------------------------------------------


def test_pk_ranges_round_trip_and_stay_small():
    assert encode_pks([1, 2, 3, 4, 7, 9, 10, 11, 3, 20, 30, 40]) == [[1, 4], 7, [9, 11], 3, [20, 40, 10]]
    assert decode_pks([[1, 4], 7, "9-11", "20", [30, 50, 10]]) == [1, 2, 3, 4, 7, 9, 10, 11, 20, 30, 40, 50]
    rng = random.Random(1)
    pks = sorted(rng.sample(range(1, 300_000), 100_000))
    assert decode_pks(encode_pks(pks)) == pks
    contiguous = list(range(5, 100_005))
    assert encode_pks(contiguous) == [[5, 100_004]]
    with pytest.raises(TypeError, match="not a primary key"):
        decode_pks([1.5])
    with pytest.raises(ValueError, match="not a \\[first, last"):
        decode_pks([[10, 1]])


# Planning bundles --------------------------------------------------------------------------------------


def test_tasks_are_grouped_by_bundled_parameters_and_chunked():
    items = [
        {"input_data_products": pk, "value": pk % 3, "offset": 1.0 if pk <= 5 else 2.0} for pk in range(1, 11)
    ]
    bundles = plan_bundles(ScaledSum, items, parameters={"scale": 2}, bundle_size=2, max_bundles=None)
    assert [b["key"] for b in bundles] == [{"offset": 1.0}] * 3 + [{"offset": 2.0}] * 3
    assert [b["size"] for b in bundles] == [2, 2, 1, 2, 2, 1]
    assert bundles[0]["label"] == "ScaledSum offset=1.0 (2 tasks, 1/3)"
    assert bundles[0]["data_product_pks"] == [1, 2]
    assert bundles[0]["shared"] == {"offset": 1.0, "scale": 2}
    assert bundles[0]["columns"] == {"value": [1, 2]}
    all_pks = [pk for b in bundles for pk in decode_pks(b["data_product_pks"])]
    assert sorted(all_pks) == list(range(1, 11))


def test_bundles_are_capped_at_max_bundles_for_100000_tasks():
    items = [{"input_data_products": pk, "offset": float(pk % 3)} for pk in range(1, 100_001)]
    started = time.perf_counter()
    bundles = plan_bundles(ScaledSum, items, parameters={"value": 1}, bundle_size=10, max_bundles=50)
    elapsed = time.perf_counter() - started
    assert len(bundles) <= 50
    assert sum(b["size"] for b in bundles) == 100_000
    for offset in (0.0, 1.0, 2.0):
        sizes = [b["size"] for b in bundles if b["key"] == {"offset": offset}]
        assert max(sizes) - min(sizes) <= 1  # chunks of a group are balanced
    assert len(json.dumps(bundles)) < 20_000  # every third pk: arithmetic ranges
    assert elapsed < 10
    contiguous = plan_bundles(
        ScaledSum,
        [{"input_data_products": pk} for pk in range(1, 100_001)],
        parameters={"offset": 1, "value": 1},
    )
    assert len(contiguous) <= 100
    assert len(json.dumps(contiguous)) < 20_000


def test_choose_bundle_size():
    assert choose_bundle_size([10, 10], 5, None) == 5
    assert choose_bundle_size([100_000], 10, 64) == 1563
    assert choose_bundle_size([1, 1, 1], 100, 3) == 100
    with pytest.raises(
        ValueError, match="3 groups of distinct bundled parameter values, more than max_bundles=2"
    ):
        choose_bundle_size([1, 1, 1], 100, 2)
    with pytest.raises(ValueError, match="bundle_size must be at least 1"):
        choose_bundle_size([1], 0, 2)


@pytest.mark.parametrize(
    ("items", "parameters", "message"),
    [
        ([{"value": 1, "offst": 2}], {"offset": 1}, "unknown parameter\\(s\\) 'offst'"),
        ([{"value": 1}], {}, "misses required parameter\\(s\\) 'offset'"),
        (["not a mapping"], {}, "task 0: expected a mapping"),
    ],
)
def test_bad_task_arguments_are_reported_when_planning(items, parameters, message):
    with pytest.raises(TypeError, match=message):
        plan_bundles(ScaledSum, items, parameters=parameters)


def test_bundles_rebuild_the_same_tasks_as_the_core_bundler(astra_db):
    [bundle] = plan_bundles(ScaledSum, [{"value": v} for v in range(6)], parameters={"offset": 3})
    assert "data_product_pks" not in bundle and bundle["columns"] == {"value": list(range(6))}
    first = instance_from_bundle(ScaledSum, bundle)
    assert first.execute() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    # the same tasks, built one by one and bundled by the core: identical identities, so all skipped
    from astra_provider.base import bundler

    [again] = bundler(ScaledSum(offset=3, value=v) for v in range(6))
    again.execute()
    assert again.summary()["skipped"] == 6

    labels = [{"labels": ["a", "b"]}, {"labels": ["c"]}, {"labels": ["d", "e", "f"]}]
    [tuple_bundle] = plan_bundles(TupleLabels, labels)
    assert tuple_bundle["columns"] == {"labels": [["a", "b"], ["c"], ["d", "e", "f"]]}
    assert instance_from_bundle(TupleLabels, tuple_bundle).execute() == [2, 1, 3]


# Operators, executed directly ----------------------------------------------------------------------------


def test_task_operator_runs_a_class_with_provenance_and_skips_when_done(astra_conn, capfd):
    operator = AstraTaskOperator(
        task_id="primes",
        task_class="astra_provider.contrib.examples.GreedyPrimes",
        parameters={"max_value": 30},
    )
    summary = operator.execute(context={})
    assert summary["completed"] == 1 and summary["failed"] == 0
    [pk] = decode_pks(summary["task_pks"])
    assert Task.get_by_id(pk).result == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    json.dumps(summary)  # JSON-safe

    again = AstraTaskOperator(task_id="primes", task_class=GreedyPrimes, parameters={"max_value": 30})
    assert again.execute(context={})["skipped"] == 1
    assert "already done" in capfd.readouterr().out
    assert _statuses() == {"COMPLETED": 1}


def test_a_failed_task_fails_the_operator_with_the_recorded_error(astra_conn):
    operator = AstraTaskOperator(task_id="sum", task_class=ScaledSum, parameters={"offset": 1, "value": None})
    with pytest.raises(AstraTaskFailedError, match="ValueError: value is None"):
        operator.execute(context={})
    with session_scope() as session:
        task = session.scalars(select(Task)).one()
    assert task.status == Status.FAILED
    assert task.error_message == "ValueError: value is None"


def test_a_bundle_with_failures_fails_only_past_the_failure_fraction(astra_conn, capfd):
    items = [{"value": v} for v in (1, 2, None, 4, 5, 6, 7, 8, 9, 10)]
    [bundle] = plan_bundles(ScaledSum, items, parameters={"offset": 100})

    tolerant = ExecuteBundleOperator(
        task_id="run", task_class=ScaledSum, bundle=bundle, max_failure_fraction=0.1
    )
    context: dict = {}
    summary = tolerant.execute(context=context)
    assert (summary["completed"], summary["failed"]) == (9, 1)
    assert summary["label"] == "ScaledSum offset=100 (10 tasks)"
    assert context["map_index_template"] == "{{ task.bundle['label'] }}"
    [failed_pk] = decode_pks(summary["failed_task_pks"])
    assert summary["failed_tasks"] == [
        {"pk": failed_pk, "stage": "execute", "error": "ValueError: value is None"}
    ]
    out = capfd.readouterr().out
    listed = f"1 failed task(s) (details: `astra show <pk>`):\n  task {failed_pk} [execute]: ValueError"
    assert listed in out
    assert out.count("value is None") == 1  # each failure is logged once
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Bundle)) == 1
    assert _statuses() == {"COMPLETED": 9, "FAILED": 1}

    # Run again, strictly: the 9 completed tasks are skipped, the failed one runs again and fails again.
    strict = ExecuteBundleOperator(task_id="run", task_class=ScaledSum, bundle=bundle, max_failure_fraction=0)
    message = r"1 of 10 ScaledSum task\(s\) failed \(10.0%, max_failure_fraction=0\); each is listed above"
    with pytest.raises(AstraTaskFailedError, match=message):
        strict.execute(context={})
    assert "9 of 10 task(s) already done" in capfd.readouterr().out
    assert _statuses() == {"COMPLETED": 9, "FAILED": 2}


def test_bundle_labels_are_short():
    """Map-index labels: the class, the bundled parameters that differ (from their default, or between the
    bundles), paths by base name, no nulls, the count and i/n."""
    from astra_provider.contrib.continuum import SinusoidalContinuum
    from astra_provider.contrib.doppler import DopplerRadialVelocity

    items = [{"input_data_products": pk} for pk in range(1, 5)]
    defaults = {"deg": 3, "length_scale": 1400.0, "output_dir": None}
    labels = [
        b["label"] for b in plan_bundles(SinusoidalContinuum, items, parameters=defaults, bundle_size=2)
    ]
    assert labels == ["SinusoidalContinuum (2 tasks, 1/2)", "SinusoidalContinuum (2 tasks, 2/2)"]
    model = "/data/astra/models/thecannon-training-300stars-seed1.npz"
    [doppler] = plan_bundles(DopplerRadialVelocity, items, parameters={"model_path": model})
    assert (
        doppler["label"] == "DopplerRadialVelocity model_path=thecannon-training-300stars-seed1.npz (4 tasks)"
    )
    mixed = [{**item, "deg": 3 + i % 2} for i, item in enumerate(items)]  # deg varies: shown, default or not
    assert [b["label"] for b in plan_bundles(SinusoidalContinuum, mixed)] == [
        "SinusoidalContinuum deg=3 (2 tasks)",
        "SinusoidalContinuum deg=4 (2 tasks)",
    ]


def test_an_operator_without_the_connection_warns_that_it_uses_the_embedded_database(tmp_path, capfd):
    with environment(
        AIRFLOW_CONN_ASTRA_DEFAULT=None, ASTRA_DATABASE_URL=None, ASTRA_HOME=str(tmp_path / "home")
    ):
        database.configure(None)
        try:
            summary = AstraTaskOperator(
                task_id="primes", task_class=GreedyPrimes, parameters={"max_value": 10}
            ).execute(context={})
        finally:
            database.dispose_engines()
    assert summary["completed"] == 1
    out = capfd.readouterr().out
    assert (
        "No Airflow connection 'astra_default' and no ASTRA_DATABASE_URL: falling back to the embedded "
        f"SQLite database sqlite:///{tmp_path / 'home' / 'astra.db'}. Create the connection with "
        "`astra airflow-setup`"
    ) in out
    assert (tmp_path / "home" / "astra.db").exists()


def test_bundle_operator_takes_sensor_and_operator_xcoms(astra_conn, tmp_path):
    for i in range(4):
        (tmp_path / f"n{i}.txt").write_text(str(i))
    hook = AstraHook()
    paths = resolve_data_products([str(tmp_path / "*.txt")], hook)
    assert paths == [str(tmp_path / f"n{i}.txt") for i in range(4)]

    first = ReadScale(input_data_products=paths, output_dir=str(tmp_path / "out"))
    first.execute()
    with session_scope() as session:
        inputs = {dp.path: dp.pk for dp in session.scalars(select(DataProduct))}
    # the sensor's XCom form, with a filetype filter through by_filetype
    sensor_xcom = {"data_product_pks": encode_pks(sorted(inputs.values())), "by_filetype": {"full": [[1, 2]]}}
    assert resolve_data_products(sensor_xcom, hook, ["full"]) == [1, 2]
    assert resolve_data_products(sensor_xcom, hook, ["apStar"]) == []
    assert resolve_data_products(sensor_xcom, hook) == sorted(inputs.values())
    assert resolve_data_products(["3", "1-2"], hook, ["full"]) == [3, 1, 2]

    # an operator's XCom means the output data products of its completed tasks
    from astra_provider.operators.task import compact_summary

    upstream = [compact_summary(first.summary())]
    operator = BundleTasksOperator(
        task_id="b",
        task_class=ReadScale,
        data_products=upstream,
        parameters={"output_dir": str(tmp_path / "o2")},
    )
    [bundle] = [entry["bundle"] for entry in operator.execute(context={})]
    with session_scope() as session:
        outputs = session.scalars(
            select(TaskOutputDataProduct.data_product_pk).order_by(TaskOutputDataProduct.pk)
        )
        assert decode_pks(bundle["data_product_pks"]) == list(outputs)
    summary = ExecuteBundleOperator(task_id="r", task_class=ReadScale, bundle=bundle).execute(context={})
    assert summary["completed"] == 4
    assert [float(p.read_text()) for p in sorted((tmp_path / "o2").iterdir())] == [0.0, 4.0, 8.0, 12.0]


def test_bundle_operator_caps_bundles_at_max_map_length(astra_conn, capfd):
    operator = BundleTasksOperator(
        task_id="b",
        task_class=ScaledSum,
        items=[{"value": v} for v in range(100)],
        parameters={"offset": 0},
        bundle_size=1,
        max_bundles="2000",
    )
    with environment(AIRFLOW__CORE__MAX_MAP_LENGTH="7"):
        bundles = operator.execute(context={})
    assert len(bundles) == 7
    out = capfd.readouterr().out
    assert "exceeds [core] max_map_length=7" in out
    assert "bundle_size grown from 1 to 15" in out


# Real Airflow runs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def airflow_db():
    init_airflow_db()


@pytest.fixture
def numbers(tmp_path) -> Path:
    """Six input files holding 1..5 and -1 (the last one fails ReadScale)."""
    folder = tmp_path / "numbers"
    folder.mkdir()
    for i, value in enumerate([1, 2, 3, 4, 5, -1]):
        (folder / f"n{i}.txt").write_text(str(value))
    return folder


def test_the_chain_dag_runs_bundles_and_tolerates_failures(airflow_db, astra_conn, numbers, tmp_path):
    from airflow.utils.state import DagRunState, TaskInstanceState

    conf = {
        "data_products": [str(numbers / "*.txt")],
        "output_dir": str(tmp_path / "out"),
        "bundle_size": 2,
        "max_failure_fraction": 0.5,
    }
    with use_test_bundles():  # like a run triggered from the UI: no logical date, so no {{ ds }}
        dag_run = get_dag("astra_test_chain").test(run_conf=conf, logical_date=None)
    assert dag_run.state == DagRunState.SUCCESS and dag_run.logical_date is None
    tis = task_instances(dag_run)
    assert {key for key in tis if key[0] == "first"} == {("first", 0), ("first", 1), ("first", 2)}
    assert all(ti.state == TaskInstanceState.SUCCESS for ti in tis.values())
    assert tis[("first", 0)].rendered_map_index == "ReadScale output_dir=first (2 tasks, 1/3)"
    assert tis[("second", 0)].rendered_map_index == "ReadScale output_dir=second (5 tasks)"

    with session_scope() as session:
        n_bundles = session.scalar(select(func.count()).select_from(Bundle))
        failed = session.scalars(select(Task).where(Task.status_code == Status.FAILED)).all()
    assert n_bundles == 4  # three for the first step, one for the second
    assert _statuses() == {"COMPLETED": 10, "FAILED": 1}
    assert [task.error_message for task in failed] == ["ValueError: negative value -1.0 in n5.txt"]
    second = sorted(float(p.read_text()) for p in (tmp_path / "out" / "second").iterdir())
    assert second == [20.0, 40.0, 60.0, 80.0, 100.0]


def test_the_documented_operator_example_runs(airflow_db, astra_conn):
    """``tests/dags/astra_example_operators.py`` is the Python example of docs/airflow.md, verbatim."""
    from airflow.utils.state import DagRunState

    source = (TEST_DAGS / "astra_example_operators.py").read_text()
    assert source in (REPO / "docs" / "airflow.md").read_text()
    with use_test_bundles():
        dag_run = get_dag("astra_example_operators").test(run_conf={"n": 10})
    assert dag_run.state == DagRunState.SUCCESS
    tis = task_instances(dag_run)
    labels = sorted(ti.rendered_map_index for (task_id, _), ti in tis.items() if task_id == "scaled_sum")
    assert labels == [  # two offsets of 5 tasks each, bundle_size=4: chunks of 3 and 2
        "ScaledSum offset=0.0 (2 tasks, 2/2)",
        "ScaledSum offset=0.0 (3 tasks, 1/2)",
        "ScaledSum offset=1.0 (2 tasks, 2/2)",
        "ScaledSum offset=1.0 (3 tasks, 1/2)",
    ]
    assert _statuses("ScaledSum") == {"COMPLETED": 10}
    assert _statuses("GreedyPrimes") == {"COMPLETED": 1}
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Bundle)) == 4


def test_a_deferrable_sensor_step_feeds_a_bundled_step(airflow_db, astra_conn, tmp_path):
    """``astra_test_discovery``: the sensor finds nothing and defers; files arrive while its trigger waits."""
    import logging

    from airflow.utils.state import DagRunState

    root = tmp_path / "incoming"
    root.mkdir()

    class DeliverWhileDeferred(logging.Handler):
        delivered = False

        def emit(self, record: logging.LogRecord) -> None:
            if "running trigger in line" in record.getMessage() and not self.delivered:
                for i in range(3):  # written "a minute ago": complete
                    (root / f"n{i}.txt").write_text(str(i + 1))
                    os.utime(root / f"n{i}.txt", (time.time() - 60, time.time() - 60))
                self.delivered = True

    handler = DeliverWhileDeferred(level=logging.INFO)
    dag_logger = logging.getLogger("airflow.sdk.definitions.dag")
    dag_logger.addHandler(handler)
    level = dag_logger.level
    dag_logger.setLevel(logging.INFO)
    try:
        with use_test_bundles():
            dag_run = get_dag("astra_test_discovery").test(
                run_conf={"root": str(root), "output_dir": str(tmp_path / "o")}
            )
    finally:
        dag_logger.removeHandler(handler)
        dag_logger.setLevel(level)
    assert handler.delivered  # the sensor deferred (its trigger ran) before the files existed
    assert dag_run.state == DagRunState.SUCCESS
    tis = task_instances(dag_run)
    assert {k for k in tis if k[0] == "scale"} == {("scale", 0), ("scale", 1)}
    with session_scope() as session:
        paths = set(session.scalars(select(DataProduct.path).where(DataProduct.path.like(f"{root}%"))))
    assert paths == {str(root / f"n{i}.txt") for i in range(3)}
    assert _statuses() == {"COMPLETED": 3}
    assert sorted(p.read_text() for p in (tmp_path / "o").iterdir()) == ["2.0", "4.0", "6.0"]


@pytest.mark.parametrize("astra_db", ["postgresql"], indirect=True)
def test_debug_a_failed_bundle_with_airflow_tasks_test(airflow_db, astra_conn, numbers, tmp_path):
    """A bundle fails; the user fixes the input and re-runs that mapped task with ``airflow tasks test``."""
    from airflow.utils.state import DagRunState, TaskInstanceState

    conf = {"data_products": [str(numbers / "*.txt")], "output_dir": str(tmp_path / "out"), "bundle_size": 2}
    with use_test_bundles():
        dag_run = get_dag("astra_test_chain").test(run_conf=conf)
        assert dag_run.state == DagRunState.FAILED
        tis = task_instances(dag_run)
        [map_index] = [
            k[1] for k, ti in tis.items() if k[0] == "first" and ti.state == TaskInstanceState.FAILED
        ]
        assert tis[("second_bundles", -1)].state == TaskInstanceState.UPSTREAM_FAILED
        assert _statuses() == {"COMPLETED": 5, "FAILED": 1}

        (numbers / "n5.txt").write_text("6")  # fix the data, then debug the one failed bundle
        result = run_airflow(
            "tasks", "test", "astra_test_chain", "first", dag_run.run_id, "--map-index", str(map_index)
        )
    assert result.returncode == 0  # always 0, even on failure: assert on the effects instead
    output = result.stdout + result.stderr
    assert "1 of 2 task(s) already done; ran the other 1" in output, output[-3000:]
    assert _statuses() == {"COMPLETED": 6, "FAILED": 1}  # the old failure stays recorded
    with session_scope() as session:
        latest = session.scalars(select(Task).order_by(Task.pk.desc()).limit(1)).one()
    assert latest.status == Status.COMPLETED and latest.result == 12.0


def test_threads_per_task_limits_the_blas_pool_while_a_task_runs():
    """``ASTRA_THREADS_PER_TASK`` (docs/deployment.md) caps the BLAS threads of a task process; unset, the
    library's own setting stays; a bad value is an error naming the variable."""
    import numpy  # noqa: F401  (loads its BLAS library)
    from threadpoolctl import threadpool_info

    from astra_provider.operators.task import threads_per_task

    def blas_threads() -> set[int]:
        return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}

    before = blas_threads()
    assert before  # NumPy's BLAS is loaded
    with environment(ASTRA_THREADS_PER_TASK=None), threads_per_task() as limit:
        assert limit is None and blas_threads() == before
    with environment(ASTRA_THREADS_PER_TASK="1"), threads_per_task() as limit:
        assert limit == 1 and blas_threads() == {1}
    assert blas_threads() == before
    with (
        environment(ASTRA_THREADS_PER_TASK="two"),
        pytest.raises(ValueError, match="ASTRA_THREADS_PER_TASK must be a positive integer, got 'two'"),
        threads_per_task(),
    ):
        pass
