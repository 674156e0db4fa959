"""The TaskInstance framework against the user's guide (seeds 002-004), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import re

import pytest
from sqlalchemy import func, select, text, update

from astra_provider import __version__
from astra_provider.base import (
    DictParameter,
    Parameter,
    TaskFailedError,
    TaskInstance,
    TupleParameter,
    bundler,
)
from astra_provider.contrib.examples import GreedyPrimes, RandomNumberGeneratorTask, ScaledSum
from astra_provider.database import session_scope
from astra_provider.database.astradb import (
    Bundle,
    DataProduct,
    Status,
    Task,
    TaskInputDataProduct,
    TaskParameter,
)

CALLS: list[str] = []


class AnalysisTask(TaskInstance):
    """The guide's bundled example (model loaded once per bundle)."""

    model_path = Parameter(bundled=True)
    initial_teff = Parameter()
    initial_logg = Parameter()
    initial_fe_h = Parameter()
    sigma_clip_limit = Parameter(default=3)

    def pre_execute(self):
        for task, data_products in self.iterable():
            assert isinstance(task, Task)
            for data_product in data_products:
                assert isinstance(data_product, DataProduct)
                assert os.path.exists(data_product.path)
            assert "sigma_clip_limit" in task.parameters

    def execute(self):
        CALLS.append(f"load {self.model_path}")
        results = []
        for task, data_products in self.iterable():
            if task.parameters["initial_teff"] < 0:
                raise ValueError(f"negative initial_teff in {data_products[0].path}")
            results.append(
                [task.parameters["initial_teff"], task.parameters["initial_logg"], len(data_products)]
            )
        return results


class SubAnalysisTask(AnalysisTask):
    """Inherits the bundled parameter."""


class WithTuple(TaskInstance):
    limits = TupleParameter(default=(0, 1))
    options = DictParameter(default={"a": 1})
    value = Parameter()

    def execute(self):
        return [[list(task.parameters["limits"]), task.parameters["value"]] for task, _ in self.iterable()]


class FailsIn(TaskInstance):
    stage = Parameter(bundled=True)
    value = Parameter(default=0)

    def pre_execute(self):
        if self.stage == "pre_execute":
            raise RuntimeError("cannot load the model")

    def execute(self):
        if self.stage == "interrupt":
            raise KeyboardInterrupt
        return [task.parameters["value"] for task, _ in self.iterable()]

    def post_execute(self):
        if self.stage == "post_execute":
            raise OSError("disk full")


def count(model) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_greedy_primes_is_recorded(astra_db):
    assert GreedyPrimes(max_value=30).execute() == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    with session_scope() as session:
        task = session.scalars(select(Task)).one()
    assert task.status == Status.COMPLETED
    assert task.task_module == "astra_provider.contrib.examples" and task.task_name == "GreedyPrimes"
    assert task.version == __version__
    assert task.parameters == {"min_value": 2, "max_value": 30}
    assert task.result == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    for stage in ("time_pre_execute", "time_execute", "time_post_execute", "duration"):
        assert getattr(task, stage) is not None and getattr(task, stage) >= 0
    assert task.duration >= task.time_execute
    assert task.task_id.startswith("examples.GreedyPrimes_")


def test_missing_and_unknown_parameters_are_named():
    with pytest.raises(TypeError, match="missing required parameter.*'max_value'"):
        GreedyPrimes()
    with pytest.raises(TypeError, match="unexpected parameter.*'max_valu'"):
        GreedyPrimes(max_valu=3)
    with pytest.raises(TypeError, match=r"execute\(\) got unexpected keyword.*'verbosity'"):
        GreedyPrimes(max_value=3).execute(verbosity=2)


def test_bundle_forms(astra_db, data_files):
    paths = [str(p) for p in data_files[:2]]
    a = AnalysisTask(
        input_data_products=paths,
        model_path="m.npz",
        initial_teff=(5000, 5125),
        initial_logg=(3.5, 3.75),
        initial_fe_h=0,
    )
    b = AnalysisTask(
        input_data_products=paths, model_path="m.npz", initial_teff=5777, initial_logg=4.4, initial_fe_h=0
    )
    c = AnalysisTask(
        input_data_products=paths,
        model_path="m.npz",
        initial_teff=(5125, 5000),
        initial_logg=(4.4, 2.5),
        initial_fe_h=(0, 0.1),
    )
    assert [len(x) for x in (a, b, c)] == [2, 2, 2]
    CALLS.clear()
    assert a.execute() == [[5000, 3.5, 1], [5125, 3.75, 1]]
    assert b.execute() == [[5777, 4.4, 1], [5777, 4.4, 1]]
    assert c.execute() == [[5125, 4.4, 1], [5000, 2.5, 1]]
    assert CALLS == ["load m.npz"] * 3  # the model is loaded once per bundle
    assert [t.parameters["initial_fe_h"] for t in a.tasks] == [0, 0]
    assert [t.parameters["initial_fe_h"] for t in c.tasks] == [0, 0.1]
    assert a.tasks[0].parameters["sigma_clip_limit"] == 3
    assert a.model_path == "m.npz" and a.initial_teff == (5000, 5125)
    # form B: one task per data product, each linked to its own file
    with session_scope() as session:
        links = session.execute(
            select(TaskInputDataProduct.task_pk, DataProduct.path)
            .join(DataProduct, DataProduct.pk == TaskInputDataProduct.data_product_pk)
            .where(TaskInputDataProduct.task_pk.in_([t.pk for t in b.tasks]))
            .order_by(TaskInputDataProduct.task_pk)
        ).all()
        bundles = session.scalars(select(Bundle).order_by(Bundle.pk)).all()
    assert [path for _, path in links] == paths
    assert count(DataProduct) == 2  # the same files are recorded once
    assert len(bundles) == 3 and all(bundle.n_tasks == 2 for bundle in bundles)
    assert bundles[0].bundled_parameters == {"model_path": "m.npz"}
    # per-task time + bundle overhead: overhead = stage time - sum of per-task times
    bundle = bundles[0]
    per_task = sum(t.time_execute for t in a.tasks)
    assert bundle.time_execute_overhead == pytest.approx(bundle.time_execute - per_task, abs=1e-6)
    assert all(t.time_bundle_overhead >= 0 for t in a.tasks)


def test_nested_inputs_and_records_and_pks(astra_db, data_files):
    first = GreedyPrimes(input_data_products=[[str(p) for p in data_files]], max_value=10)
    first.execute()
    assert len(first) == 1
    products = first.tasks[0].input_data_products
    assert [dp.path for dp in products] == [str(p) for p in data_files]
    # DataProduct records and primary keys are accepted as inputs; nothing is duplicated
    again = GreedyPrimes(input_data_products=[[products[0], products[1].pk]], max_value=10)
    again.execute()
    assert count(DataProduct) == 3
    assert [dp.pk for t in again.tasks for dp in t.input_data_products] == [products[0].pk, products[1].pk]


def test_tuple_and_dict_parameters_are_not_split(astra_db):
    instance = WithTuple(value=(1, 2, 3), limits=(4, 5))
    assert len(instance) == 3
    assert instance.execute() == [[[4, 5], 1], [[4, 5], 2], [[4, 5], 3]]
    assert instance.tasks[0].parameters["options"] == {"a": 1}


def test_bad_construction_errors(data_files):
    with pytest.raises(ValueError, match="initial_teff has 3"):
        AnalysisTask(
            input_data_products=[str(p) for p in data_files[:2]],
            model_path="m",
            initial_teff=(1, 2, 3),
            initial_logg=1,
            initial_fe_h=0,
        )
    with pytest.raises(TypeError, match="bundled parameter 'model_path'"):
        AnalysisTask(model_path=("a", "b"), initial_teff=1, initial_logg=1, initial_fe_h=0)
    with pytest.raises(FileNotFoundError, match="no-such-file.fits"):
        GreedyPrimes(input_data_products="/nonexistent/no-such-file.fits", max_value=3)
    with pytest.raises(TypeError, match="parameter 'max_value' is not JSON serializable"):
        GreedyPrimes(max_value=object())


def test_skip_if_done_and_force(astra_db):
    instance = GreedyPrimes(max_value=20)
    first = instance.execute()
    again = GreedyPrimes(max_value=20)
    assert again.execute() == first
    assert again.summary()["skipped"] == 1 and again.summary()["completed"] == 0
    assert count(Task) == 1
    assert GreedyPrimes(max_value=20, min_value=2).execute() == first  # defaults are part of identity
    assert count(Task) == 1
    forced = GreedyPrimes(max_value=20)
    assert forced.execute(force=True) == first
    assert count(Task) == 2
    assert forced.tasks[0].task_id == instance.tasks[0].task_id
    # a new version is not a twin: bump the stored version and the task runs again
    with session_scope() as session:
        session.execute(update(Task).values(version="0.0.0"))
    GreedyPrimes(max_value=20).execute()
    assert count(Task) == 3


def test_partial_bundle_runs_only_missing_tasks(astra_db):
    ScaledSum(offset=10, value=(1, 2)).execute()
    mixed = ScaledSum(offset=10, value=(1, 2, 3))
    assert mixed.execute() == [11.0, 12.0, 13.0]
    assert mixed.summary()["skipped"] == 2 and mixed.summary()["completed"] == 1
    assert count(Task) == 3


def test_from_task_rebuilds_and_reexecutes(astra_db, data_files):
    original = AnalysisTask(
        input_data_products=str(data_files[0]),
        model_path="m.npz",
        initial_teff=5000,
        initial_logg=2.5,
        initial_fe_h=-0.5,
    )
    result = original.execute()
    task = Task.get_by_id(original.tasks[0].pk)
    rebuilt = TaskInstance.from_task(task)
    assert type(rebuilt) is AnalysisTask
    assert rebuilt.model_path == "m.npz" and rebuilt.initial_fe_h == -0.5
    assert rebuilt.execute() == result  # already done: the stored result, nothing re-run
    assert count(Task) == 1
    assert rebuilt.execute(force=True) == result
    assert count(Task) == 2
    assert [dp.path for dp in rebuilt.tasks[0].input_data_products] == [str(data_files[0])]
    with session_scope() as session:
        session.execute(update(Task).where(Task.pk == task.pk).values(version="0.0.1"))
    with pytest.warns(UserWarning, match="recorded by astra-provider 0.0.1"):
        TaskInstance.from_task(Task.get_by_id(task.pk))
    with pytest.raises(LookupError, match="no task with pk=999999"):
        Task.get_by_id(999999)


def test_unknown_task_class_is_a_clear_error(astra_db):
    GreedyPrimes(max_value=5).execute()
    with session_scope() as session:
        session.execute(update(Task).values(task_module="astra_provider.nowhere", task_name="Gone"))
        task = session.scalars(select(Task)).one()
    with pytest.raises(LookupError, match="unknown task class 'astra_provider.nowhere.Gone'"):
        TaskInstance.from_task(task)


def test_one_bad_task_in_a_bundle_fails_alone(astra_db, data_files):
    bundle = AnalysisTask(
        input_data_products=[str(p) for p in data_files],
        model_path="m",
        initial_teff=(5000, -1, 4800),
        initial_logg=2.0,
        initial_fe_h=0,
    )
    assert bundle.execute() == [[5000, 2.0, 1], None, [4800, 2.0, 1]]
    statuses = [Task.get_by_id(t.pk) for t in bundle.tasks]
    assert [t.status for t in statuses] == [Status.COMPLETED, Status.FAILED, Status.COMPLETED]
    bad = statuses[1]
    assert bad.error_stage == "execute"
    assert "negative initial_teff" in bad.error_message and str(data_files[1]) in bad.error_message
    assert "Traceback" in bad.error_traceback and "ValueError" in bad.error_traceback
    assert [(t.pk, stage) for t, stage, _ in bundle.failures] == [(bad.pk, "execute")]
    assert statuses[0].result == [5000, 2.0, 1] and statuses[2].result == [4800, 2.0, 1]


@pytest.mark.parametrize("stage", ["pre_execute", "post_execute"])
def test_stage_failure_is_recorded_for_every_task(astra_db, stage):
    instance = FailsIn(stage=stage, value=(1, 2))
    with pytest.raises(TaskFailedError, match=f"all 2 task\\(s\\) of FailsIn failed.*{stage}"):
        instance.execute()
    tasks = [Task.get_by_id(t.pk) for t in instance.tasks]
    assert {t.status for t in tasks} == {Status.FAILED}
    assert {t.error_stage for t in tasks} == {stage}


def test_nothing_stays_running_after_an_interrupt(astra_db):
    instance = FailsIn(stage="interrupt", value=(1, 2))
    with pytest.raises(KeyboardInterrupt):
        instance.execute()
    with session_scope() as session:
        assert session.scalars(select(Task.status_code)).all() == [Status.FAILED, Status.FAILED]


def test_single_task_failure_raises_after_recording(astra_db, data_files):
    with pytest.raises(TaskFailedError, match="failed in execute: ValueError: negative initial_teff"):
        AnalysisTask(
            input_data_products=str(data_files[0]),
            model_path="m",
            initial_teff=-5,
            initial_logg=1,
            initial_fe_h=0,
        ).execute()
    with session_scope() as session:
        task = session.scalars(select(Task)).one()
    assert task.status == Status.FAILED and task.error_stage == "execute"


def test_bundler_groups_by_bundled_parameters(astra_db, data_files):
    tasks = []
    for i, path in enumerate(data_files):
        for model in ("a.npz", "b.npz"):
            tasks.append(
                AnalysisTask(
                    input_data_products=str(path),
                    model_path=model,
                    initial_teff=4000 + i,
                    initial_logg=1.0,
                    initial_fe_h=0.0,
                )
            )
    tasks.append(
        SubAnalysisTask(
            input_data_products=str(data_files[0]),
            model_path="a.npz",
            initial_teff=1,
            initial_logg=1,
            initial_fe_h=0,
        )
    )
    bundles = bundler(tasks)
    assert sorted((type(b).__name__, b.model_path, len(b)) for b in bundles) == [
        ("AnalysisTask", "a.npz", 3),
        ("AnalysisTask", "b.npz", 3),
        ("SubAnalysisTask", "a.npz", 1),
    ]
    assert SubAnalysisTask.bundled_parameter_names() == ["model_path"]
    CALLS.clear()
    for instance in bundles:
        instance.execute()
    assert len(CALLS) == 3
    assert count(Task) == 7 and count(Bundle) == 2
    assert [len(b) for b in bundler(tasks[:6], max_size=2)] == [2, 1, 2, 1]


def test_seed_sql_queries_run_as_written(astra_db):
    """The guide's RandomNumberGenerator example (seed 004): its two queries, as written, print the
    columns and rows the guide shows, the version parameters included, on SQLite and PostgreSQL."""
    tasks = [
        RandomNumberGeneratorTask(seed=0),
        RandomNumberGeneratorTask(seed=0, draws=10),
        RandomNumberGeneratorTask(seed=3, draws=2, delay_time=0.3),  # the guide waits 5 s
        RandomNumberGeneratorTask(seed=5, draws=1, delay_time=0.1),
    ]
    results = [t.execute() for t in tasks]
    assert [len(r[0]) for r in results] == [1, 10, 2, 1]  # one list of samples per task
    with session_scope() as session:
        result = session.execute(
            text(
                "select t.pk, t.task_module, t.task_id, t.duration, rng.samples from astra.task as t, "
                "astra.random_number_generator as rng where t.output_pk = rng.output_pk;"
            )
        )
        assert list(result.keys()) == ["pk", "task_module", "task_id", "duration", "samples"]
        rows = result.all()
        assert len(rows) == 4
        by_pk = {row.pk: row for row in rows}
        samples = by_pk[tasks[1].tasks[0].pk].samples  # JSON text on SQLite, decoded JSONB on PostgreSQL
        assert (json.loads(samples) if isinstance(samples, str) else samples) == pytest.approx(results[1][0])
        assert {row.task_module for row in rows} == {"astra_provider.contrib.examples"}
        assert all(re.fullmatch(r"RNG\.RandomNumberGeneratorTask_[0-9a-f]{20}", row.task_id) for row in rows)
        third = tasks[2].tasks[0].pk
        assert by_pk[third].duration >= 0.3  # it slept 0.3 s
        result = session.execute(
            text(
                "select t.task_id, t.duration, p.parameter_name, p.parameter_value "
                "from astra.parameter as p, "
                f"astra.task_parameter as tp, astra.task as t where t.pk = {third} and t.pk = tp.task_pk "
                "and tp.parameter_pk = p.pk;"
            )
        )
        assert list(result.keys()) == ["task_id", "duration", "parameter_name", "parameter_value"]
        parameters = result.all()
    assert {r.task_id for r in parameters} == {by_pk[third].task_id}
    assert {(r.parameter_name, r.parameter_value) for r in parameters} == {
        ("astra_version_major", str(int(__version__.split(".")[0]))),
        ("astra_version_minor", str(int(__version__.split(".")[1]))),
        ("seed", "3"),
        ("draws", "2"),
        ("delay_time", "0.3"),
    }
    # the version parameters are provenance: not the class's parameters, not part of the identity
    task = Task.get_by_id(third)
    assert task.parameters == {"seed": 3, "draws": 2, "delay_time": 0.3}
    assert task.version_parameters == {
        "astra_version_major": RandomNumberGeneratorTask.astra_version_major,
        "astra_version_minor": RandomNumberGeneratorTask.astra_version_minor,
    }


def test_parameters_are_shared_rows(astra_db):
    ScaledSum(offset=0, value=(10, 11, 12)).execute()
    with session_scope() as session:
        names = session.execute(text("select parameter_name, parameter_value from astra.parameter")).all()
        links = session.scalar(select(func.count()).select_from(TaskParameter))
        bundle_links = session.scalar(select(func.count()).where(Task.bundle_pk.is_not(None)))
    assert sorted(names) == [
        ("astra_version_major", "0"),
        ("astra_version_minor", "1"),
        ("offset", "0"),
        ("scale", "1"),
        ("value", "10"),
        ("value", "11"),
        ("value", "12"),
    ]
    assert links == 9 and bundle_links == 3  # the version parameters are recorded once, not per task


class Chunked(TaskInstance):
    """Counts its stage calls; `self.value` is the tuple of the running chunk."""

    model = Parameter(bundled=True)
    value = Parameter()

    def pre_execute(self):
        CALLS.append(("pre", len(self.value)))

    def execute(self):
        CALLS.append(("execute", self.value))
        return [task.parameters["value"] * 10 for task, _ in self.iterable()]

    def post_execute(self):
        CALLS.append(("post", len(list(self.iterable()))))


def test_a_bundle_runs_in_chunks_recorded_one_by_one(astra_db):
    CALLS.clear()
    instance = Chunked(model="m", value=tuple(range(7)))
    assert instance.execute(chunk_size=3) == [0, 10, 20, 30, 40, 50, 60]
    assert CALLS == [
        ("pre", 7),
        ("execute", (0, 1, 2)),
        ("post", 3),
        ("execute", (3, 4, 5)),
        ("post", 3),
        ("execute", (6,)),
        ("post", 1),
    ]
    tasks = [Task.get_by_id(t.pk) for t in instance.tasks]
    assert [t.result for t in tasks] == [0, 10, 20, 30, 40, 50, 60]
    assert {t.status for t in tasks} == {Status.COMPLETED} and {t.claim for t in tasks} == {1}
    assert {t.bundle_pk for t in tasks} == {instance.bundle.pk}
    with session_scope() as session:
        recorded = session.get(Bundle, instance.bundle.pk)
    # the bundle's stage times are the sums over chunks; each task's overhead share adds up to them
    overhead = sum(
        getattr(recorded, f"time_{s}_overhead") for s in ("pre_execute", "execute", "post_execute")
    )
    assert sum(t.time_bundle_overhead for t in tasks) == pytest.approx(overhead, rel=1e-6, abs=1e-9)
    assert recorded.time_execute == pytest.approx(
        recorded.time_execute_overhead + sum(t.time_execute for t in tasks), rel=1e-6, abs=1e-9
    )


def test_verbose_logs_each_stage_and_task(astra_db, capfd):
    import logging

    logger = logging.getLogger("astra_provider")
    handlers, logger.handlers = logger.handlers, []
    propagate, logger.propagate = logger.propagate, False  # nothing configured: verbose shows on stderr
    try:
        bundle = ScaledSum(offset=1, value=(2, 3))
        bundle.execute()
        rebuilt = TaskInstance.from_task(Task.get_by_id(bundle.tasks[0].pk))
        assert rebuilt.execute(debug=True, verbose=True) == [3.0]  # the guide's seed 002
    finally:
        logger.handlers, logger.propagate = handlers, propagate
    err = capfd.readouterr().err
    assert "ScaledSum: execute (1 task(s))" in err and "ScaledSum: pre_execute took" in err
    assert "ScaledSum: execute task" in err and "(1/1)" in err  # per-task progress


def test_task_namespaces(astra_db):
    assert RandomNumberGeneratorTask.task_family() == "RNG.RandomNumberGeneratorTask"
    assert GreedyPrimes.task_family() == "examples.GreedyPrimes"
    assert AnalysisTask.task_family() == "test_core.AnalysisTask"

    class Named(GreedyPrimes):
        task_namespace = "LAB"

    class Inherits(Named):
        pass

    assert Named.task_family() == "LAB.Named" and Inherits.task_family() == "LAB.Inherits"
    with pytest.raises(TypeError, match="'astra_version_major' is recorded for every task"):

        class Clashing(TaskInstance):
            astra_version_major = Parameter(default=1)
