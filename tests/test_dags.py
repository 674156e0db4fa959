"""The DAGs under ``dags/``: they import cleanly and cheaply, match the task classes, and run for real on a
synthetic survey (Airflow ``dag.test()``), with results checked in the astra database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from airflow_helpers import DAGS, environment, get_dag, init_airflow_db, task_instances
from sqlalchemy import func, select

from astra_provider import database
from astra_provider.dag_factory import check_task_classes, load_spec
from astra_provider.database import session_scope
from astra_provider.database.astradb import (
    Bundle,
    Continuum,
    DataProduct,
    Doppler,
    Status,
    Task,
    TaskInputDataProduct,
    TaskOutputDataProduct,
    TheCannon,
)
from astra_provider.hooks.astra import connection_from_url

DAG_IDS = {
    "astra_continuum",
    "astra_doppler",
    "astra_thecannon_train",
    "astra_thecannon_test",
    "astra_thepayne_train",
    "astra_thepayne_test",
    "astra_pipeline",
    "astra_pipeline_on_new_spectra",
}


def test_the_dags_folder_imports_cleanly():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    assert set(bag.dags) == DAG_IDS
    for dag in bag.dags.values():
        for name, param in dag.params.items():
            param = dag.params.get_param(name)
            assert param.description, f"{dag.dag_id}: param {name} has no description"
            assert "type" in param.schema, f"{dag.dag_id}: param {name} has no type"
    for dag_file in DAGS.glob("*.py"):
        assert dag_file.with_suffix(".yaml").exists(), dag_file


def test_dag_files_are_cheap_to_parse():
    """Parsing every DAG file imports neither the science code nor NumPy, SciPy or astropy."""
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "t_import = time.perf_counter()\n"
        f"bag = DagBag(dag_folder={str(DAGS)!r})\n"
        "t_parse = time.perf_counter() - t_import\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "heavy = sorted(m for m in ('numpy', 'scipy', 'astropy', 'astra_provider.science', "
        "'astra_provider.contrib.continuum') if m in sys.modules)\n"
        "print(len(bag.dags), heavy, round(t_parse, 2))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{len(DAG_IDS)} [] "), line  # no heavy module imported
    assert float(line.split()[-1]) < 10  # all DAG files, after Airflow itself is imported


@pytest.mark.parametrize("spec", sorted(DAGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_specs_match_the_task_classes(spec):
    assert check_task_classes(load_spec(spec)) == []


def test_the_pipeline_dags_follow_the_data():
    """Doppler needs only the apVisit files found, The Cannon only the continuum outputs: a failed continuum
    bundle cancels neither Doppler nor The Cannon on the other bundles, and the run still fails."""
    with environment(ASTRA_DATA_ROOT="/survey/root"):
        pipeline = get_dag("astra_pipeline", DAGS)
        on_new = get_dag("astra_pipeline_on_new_spectra", DAGS)
    for dag, first in ((pipeline, "discover"), (on_new, "register")):
        tasks = dag.task_dict
        assert tasks[first].downstream_task_ids == {"continuum_bundles", "doppler_bundles", "any_step_failed"}
        assert tasks["continuum_bundles"].input_filetypes == ["apStar"]
        assert tasks["doppler_bundles"].input_filetypes == ["apVisit", "specFull"]  # APOGEE and BOSS
        assert tasks["doppler_bundles"].upstream_task_ids == {first}
        assert tasks["thecannon_bundles"].upstream_task_ids == {"continuum"}
        assert tasks["thecannon_bundles"].trigger_rule == "all_done_min_one_success"
        # The Payne: optional, on the continuum outputs like The Cannon
        assert tasks["thepayne_bundles"].upstream_task_ids == {"continuum"}
        assert tasks["thepayne_bundles"].trigger_rule == "all_done_min_one_success"
        assert tasks["thepayne_bundles"].enabled == "{{ params.payne_model_path not in (none, '') }}"
        assert dag.params["payne_model_path"] in (None, "")  # skipped by default
        assert "latest_output(" in tasks["thepayne_bundles"].parameters["model_path"]
        assert tasks["doppler_bundles"].parameters["model_path"] == (
            "{{ params.doppler_model_path or default_templates() }}"
        )
        assert tasks["doppler_bundles"].trigger_rule == "none_failed_min_one_success"
        watcher = tasks["any_step_failed"]
        assert watcher.trigger_rule == "one_failed" and watcher.upstream_task_ids == set(tasks) - {
            watcher.task_id
        }
        assert dag.render_template_as_native_obj
        # bundles of continuum and Doppler may run at once: nothing limits them to one task at a time
        assert dag.max_active_tasks >= 16 and dag.max_active_runs == 1
        for step in ("continuum", "doppler", "thecannon", "thepayne"):
            assert tasks[step].partial_kwargs.get("max_active_tis_per_dagrun") is None
            assert tasks[step].partial_kwargs.get("max_active_tis_per_dag") is None
        assert (
            "\n- `doppler`: `DopplerRadialVelocity` on the apVisit, specFull of `" + first + "`, in bundles\n"
            in dag.doc_md
        )
        steps = [line for line in dag.doc_md.splitlines() if line.startswith("- `")]
        assert (
            len(steps) == 5 + (dag is pipeline) and "|" not in dag.doc_md
        )  # a list (a wide table is cut off in the UI)
        assert max(len(line) for line in steps) < 90
    # the export step closes the pipeline: after the last steps (not the sensor), whatever their outcome
    export = pipeline.task_dict["export"]
    assert export.upstream_task_ids == {"doppler", "thecannon", "thepayne"}
    assert export.trigger_rule == "all_done"
    assert export.pipelines is None and export.kinds == ("star", "visit")  # every pipeline with results
    assert export.output_dir == "{{ params.catalogue_dir or None }}"
    sensor = pipeline.task_dict["discover"]
    assert sensor.deferrable and sensor.filetypes == ["apStar", "apVisit", "specFull"]
    assert sensor.root == "{{ params.data_root or default_data_root() }}"
    # the models default to the one trained last, found in the astra database when the task runs; Doppler's
    # templates to the installed grids, else that Cannon model (dag_defaults.default_templates)
    for name in ("model_path", "doppler_model_path", "payne_model_path"):
        assert pipeline.params.get_param(name).schema == {"type": ["string", "null"]}
        assert pipeline.params[name] is None
    assert "latest_output(" in pipeline.task_dict["thecannon_bundles"].parameters["model_path"]
    # a run over the whole data root again (rediscover), and the files' readiness age, from the trigger form
    assert (pipeline.params["rediscover"], pipeline.params["min_file_age_seconds"]) == (False, 5)
    assert (sensor.include_registered, sensor.min_age_seconds) == (
        "{{ params.rediscover }}",
        "{{ params.min_file_age_seconds }}",
    )
    [asset] = on_new.schedule
    assert asset.name == "apogee_reduced_spectra"
    [watcher] = asset.watchers
    assert watcher.trigger.root == "/survey/root"


# Runs on a synthetic survey --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def airflow_db():
    init_airflow_db()


def _age(root: Path, seconds: float = 300) -> None:
    """Make every file under ``root`` look completely written (older than the sensor's min_age_seconds)."""
    past = time.time() - seconds
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """A training set (40 stars, S/N 150, its table and a trained Cannon model) and a test survey (6 stars,
    2 visits each: 6 apStar and 12 apVisit files)."""
    from astra_provider.contrib.thecannon import TrainTheCannon
    from astra_provider.synthetic.survey import generate_survey

    root = tmp_path_factory.mktemp("dag-survey")
    training = generate_survey(
        root / "train", n_stars=40, visits_per_star=1, snr=(150.0, 150.0), seed=11, filetypes=("apStar",)
    )
    table = root / "training.csv"
    rows = [f"train/{r['path']},{r['teff']},{r['logg']},{r['fe_h']}" for r in training.of_filetype("apStar")]
    table.write_text("\n".join(["path,teff,logg,fe_h", *rows]) + "\n")
    generate_survey(
        root / "data",
        n_stars=6,
        visits_per_star=2,
        snr=(60.0, 100.0),
        seed=12,
        filetypes=("apStar", "apVisit"),
    )
    model = root / "model.npz"
    database.configure(f"sqlite:///{root / 'training.db'}")
    try:
        TrainTheCannon(input_data_products=str(table), output_path=str(model)).execute()
    finally:
        database.configure(None)
        database.dispose_engines()
    return {"root": root, "table": table, "data": root / "data", "model": model}


@pytest.fixture
def astra_conn(astra_db):
    with environment(AIRFLOW_CONN_ASTRA_DEFAULT=connection_from_url(astra_db)):
        yield astra_db


def _count(model, *where) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def _statuses(task_name: str) -> dict[str, int]:
    with session_scope() as session:
        rows = session.execute(
            select(Task.status_code, func.count())
            .where(Task.task_name == task_name)
            .group_by(Task.status_code)
        )
        return {Status(code).name: n for code, n in rows}


#: The optional Payne step of the pipelines, skipped when no payne_model_path is given.
PAYNE_SKIPPED = ("thepayne_bundles", "thepayne")


def _succeeded(dag_run, skipped: tuple[str, ...] = ()) -> None:
    """Every task succeeded but those of ``skipped``, which were skipped (and the failure watcher of the
    pipelines, ``any_step_failed``, is skipped)."""
    from airflow.utils.state import DagRunState

    states = {key: str(ti.state) for key, ti in task_instances(dag_run).items()}
    assert dag_run.state == DagRunState.SUCCESS, states
    assert states.pop(("any_step_failed", -1), "skipped") == "skipped", states
    for task_id in skipped:
        assert states.pop((task_id, -1), None) == "skipped", (task_id, states)
    assert set(states.values()) == {"success"}, states


@pytest.mark.parametrize("astra_db", ["sqlite"], indirect=True)
def test_component_dags_run_on_synthetic_spectra(airflow_db, astra_conn, survey, tmp_path):
    data = survey["data"]
    apstar, apvisit = sorted(data.rglob("apStar-*.fits")), sorted(data.rglob("apVisit-*.fits"))
    assert (len(apstar), len(apvisit)) == (6, 12)

    # The Cannon, training: one task, the model file is its output data product
    model = tmp_path / "model.npz"
    run = get_dag("astra_thecannon_train", DAGS).test(
        run_conf={"training_table": str(survey["table"]), "output_path": str(model)}
    )
    _succeeded(run)
    assert model.exists() and _statuses("TrainTheCannon") == {"COMPLETED": 1}

    # Continuum normalisation of the apStar files, in bundles of 4 (-> 2 bundles of 3)
    run = get_dag("astra_continuum", DAGS).test(
        run_conf={
            "data_products": [str(data / "apogee" / "**" / "apStar-*.fits")],
            "output_dir": str(tmp_path / "normalised"),
            "model_path": str(model),  # normalise with the model's continuum pixels (TestTheCannon needs it)
            "bundle_size": 4,
        }
    )
    _succeeded(run)
    labels = sorted(ti.rendered_map_index for ti in run.get_task_instances() if ti.task_id == "continuum")
    # short labels: the class, the non-default parameters (here the model, whose pixels are used), the bundle
    assert all(label.startswith("SinusoidalContinuum ") and "model" in label for label in labels), labels
    assert [label[-len("(3 tasks, 1/2)") :] for label in labels] == ["(3 tasks, 1/2)", "(3 tasks, 2/2)"]
    assert _statuses("SinusoidalContinuum") == {"COMPLETED": 6}
    assert _count(Bundle, Bundle.task_name == "SinusoidalContinuum") == 2
    assert _count(Continuum) >= 6  # one row per spectrum row (stacks and visits)
    with session_scope() as session:
        normalised = list(
            session.scalars(
                select(TaskOutputDataProduct.data_product_pk)
                .join(Task, Task.pk == TaskOutputDataProduct.task_pk)
                .where(Task.task_name == "SinusoidalContinuum")
            )
        )
    assert len(normalised) == 6

    # The Cannon, test step: on the continuum outputs, given as data product pks
    run = get_dag("astra_thecannon_test", DAGS).test(
        run_conf={"data_products": normalised, "model_path": str(model)}
    )
    _succeeded(run)
    assert _statuses("TestTheCannon") == {"COMPLETED": 6}
    with session_scope() as session:
        teffs = list(session.scalars(select(TheCannon.teff)))
    assert len(teffs) == 6 and all(3000 < teff < 8000 for teff in teffs)

    # Doppler on the apVisit files (glob), with the trained model as templates
    run = get_dag("astra_doppler", DAGS).test(
        run_conf={"data_products": [str(data / "apogee" / "**" / "apVisit-*.fits")], "model_path": str(model)}
    )
    _succeeded(run)
    assert _statuses("DopplerRadialVelocity") == {"COMPLETED": 12}
    with session_scope() as session:
        velocities = list(session.scalars(select(Doppler.vhelio)))
    assert len(velocities) == 12 and all(v is not None and abs(v) < 1000 for v in velocities)


def test_the_pipeline_discovers_new_spectra_and_runs_every_component(
    airflow_db, astra_conn, survey, tmp_path, capfd
):
    root = tmp_path / "sdss"
    shutil.copytree(survey["data"] / "apogee", root / "apogee")
    _age(root)
    conf = {
        "data_root": str(root),
        "model_path": str(survey["model"]),
        "doppler_model_path": str(survey["model"]),
        "output_dir": str(tmp_path / "normalised"),
        "catalogue_dir": str(tmp_path / "catalogues"),
        "bundle_size": 5,
    }
    run = get_dag("astra_pipeline", DAGS).test(run_conf=conf)
    _succeeded(run, skipped=PAYNE_SKIPPED)  # no payne_model_path: the optional step is skipped, saying why
    assert (
        "step thepayne_bundles is not enabled in this run ({{ params.payne_model_path not in (none, '') }} "
        "is False): skipped, with what needs it" in capfd.readouterr().out
    )
    tis = task_instances(run)
    assert sorted(k for k in tis if k[0] == "doppler") == [("doppler", 0), ("doppler", 1), ("doppler", 2)]

    assert _count(DataProduct, DataProduct.path.like("%/apStar-%")) == 6  # registered by the sensor
    assert _count(DataProduct, DataProduct.path.like("%/apVisit-%")) == 12
    assert _statuses("SinusoidalContinuum") == {"COMPLETED": 6}
    assert _statuses("DopplerRadialVelocity") == {"COMPLETED": 12}
    assert _statuses("TestTheCannon") == {"COMPLETED": 6}
    assert _count(Doppler) == 12 and _count(TheCannon) == 6
    # continuum: 2 bundles (3+3); doppler: 3 bundles (4+4+4); the cannon: 2 bundles (3+3)
    assert _count(Bundle) == 7
    with session_scope() as session:
        cannon_inputs = session.scalars(
            select(DataProduct.path).join(TheCannon, TheCannon.data_product_pk == DataProduct.pk)
        ).all()
    assert all(Path(path).parent == tmp_path / "normalised" for path in cannon_inputs)
    _check_catalogues(tmp_path / "catalogues", _step_summaries("astra_pipeline", run.run_id, "export")[0])


def _check_catalogues(directory: Path, written: list[dict]) -> None:
    """The export step's catalogues: one file per pipeline and kind, one row per result, with units."""
    from astropy.table import Table

    from astra_provider.catalogue import catalogue_filename

    expected = {("continuum", "star"), ("doppler", "visit"), ("thecannon", "star")}
    assert {(w["pipeline"], w["kind"]) for w in written} == expected
    assert sorted(p.name for p in directory.iterdir()) == sorted(catalogue_filename(*key) for key in expected)
    tables = {w["pipeline"]: Table.read(w["path"]) for w in written}
    assert {name: len(table) for name, table in tables.items()} == {
        "continuum": _count(Continuum),
        "doppler": 12,
        "thecannon": 6,
    }
    visits, stars = tables["doppler"], tables["thecannon"]
    assert set(visits["filetype"]) == {"apVisit"} and set(stars["filetype"]) == {"astraContinuum"}
    assert len(set(visits["data_product_pk"])) == 12 and len(set(stars["data_product_pk"])) == 6
    assert str(visits["vhelio"].unit) == "km / s" and str(stars["teff"].unit) == "K"
    assert len(set(visits["sdss_id"])) == len(set(stars["sdss_id"])) == 6  # each row names its star
    assert set(visits["sdss_id"]) == set(stars["sdss_id"])
    with session_scope() as session:
        truth = dict(session.execute(select(Doppler.data_product_pk, Doppler.vhelio)).all())
    assert all(
        abs(v - truth[pk]) <= 1e-6 * max(1.0, abs(v))
        for pk, v in zip(visits["data_product_pk"], visits["vhelio"])
    )


@pytest.mark.parametrize("astra_db", ["sqlite"], indirect=True)
def test_the_payne_dags_and_the_optional_payne_step_of_the_pipeline(airflow_db, astra_conn, survey, tmp_path):
    """astra_thepayne_train on the training table; astra_pipeline with payne_model_path "latest" runs The
    Payne on the continuum outputs (the model trained last); astra_thepayne_test with its default model
    finds those tasks done."""
    from astra_provider.database.astradb import ThePayne

    run = get_dag("astra_thepayne_train", DAGS).test(run_conf={"training_table": str(survey["table"])})
    _succeeded(run)
    assert _statuses("TrainThePayne") == {"COMPLETED": 1}

    root = tmp_path / "sdss"
    shutil.copytree(survey["data"] / "apogee", root / "apogee")
    _age(root)
    conf = {
        "data_root": str(root),
        "model_path": str(survey["model"]),
        "doppler_model_path": str(survey["model"]),
        "output_dir": str(tmp_path / "normalised"),
        "payne_model_path": "latest",
    }
    run = get_dag("astra_pipeline", DAGS).test(run_conf=conf)
    _succeeded(run)
    [payne_bundle] = [ti for ti in run.get_task_instances() if ti.task_id == "thepayne"]
    assert payne_bundle.rendered_map_index.startswith("TestThePayne model_path=model-TrainThePayne")
    assert _statuses("TestThePayne") == {"COMPLETED": 6} and _statuses("TestTheCannon") == {"COMPLETED": 6}
    with session_scope() as session:
        teffs = list(session.scalars(select(ThePayne.teff)))
        normalised = sorted(
            session.scalars(
                select(TaskOutputDataProduct.data_product_pk)
                .join(Task, Task.pk == TaskOutputDataProduct.task_pk)
                .where(Task.task_name == "SinusoidalContinuum")
            )
        )
    # a model of 40 training stars: labels inside the survey's range, not an accuracy test (test_payne.py)
    assert len(teffs) == 6 and all(3000 < teff < 8000 for teff in teffs)

    run = get_dag("astra_thepayne_test", DAGS).test(run_conf={"data_products": normalised})
    _succeeded(run)
    [summary] = _step_summaries("astra_thepayne_test", run.run_id, "thepayne")
    assert (summary["skipped"], summary["completed"], summary["failed"]) == (6, 0, 0)  # done above


@pytest.mark.parametrize("astra_db", ["sqlite"], indirect=True)
def test_a_corrupt_apstar_fails_its_continuum_bundle_only(airflow_db, astra_conn, survey, tmp_path, capfd):
    """One corrupt apStar file: its continuum bundle fails; Doppler, the other continuum bundle and The Cannon
    on that bundle's outputs still run; the failure is recorded with its file, and the run fails."""
    root = tmp_path / "sdss"
    shutil.copytree(survey["data"] / "apogee", root / "apogee")
    corrupt = sorted(root.rglob("apStar-*.fits"))[0]
    corrupt.write_bytes(b"SIMPLE  =  corrupt" * 200)
    _age(root)
    conf = {
        "data_root": str(root),
        "model_path": str(survey["model"]),
        "doppler_model_path": str(survey["model"]),
        "output_dir": str(tmp_path / "normalised"),
        "bundle_size": 3,  # 6 apStar: 2 continuum bundles; one failure in 3 is past max_failure_fraction 0.1
    }
    run = get_dag("astra_pipeline", DAGS).test(run_conf=conf)
    states = {key: str(ti.state) for key, ti in task_instances(run).items()}
    assert str(run.state) == "failed", states
    failed = sorted(key for key, state in states.items() if state not in ("success", "skipped"))
    assert {key[0] for key, state in states.items() if state == "skipped"} == set(PAYNE_SKIPPED)
    assert len(failed) == 2 and ("any_step_failed", -1) in failed, states  # the watcher fails the run...
    [(_, index)] = [key for key in failed if key[0] == "continuum"]  # ...after one continuum bundle failed
    message = f"a step of this run failed: continuum_{index}; the steps after it ran on what succeeded"
    assert message in capfd.readouterr().out
    assert all(
        state == "success" for (task, _), state in states.items() if task.startswith(("doppler", "thec"))
    )

    assert _statuses("DopplerRadialVelocity") == {"COMPLETED": 12}
    assert _count(Doppler) == 12
    assert _statuses("SinusoidalContinuum") == {"COMPLETED": 5, "FAILED": 1}
    assert _statuses("TestTheCannon") == {"COMPLETED": 3}  # on the bundle that succeeded
    assert _count(TheCannon) == 3
    with session_scope() as session:
        [(message, path)] = session.execute(
            select(Task.error_message, DataProduct.path)
            .join(TaskInputDataProduct, TaskInputDataProduct.task_pk == Task.pk)
            .join(DataProduct, DataProduct.pk == TaskInputDataProduct.data_product_pk)
            .where(Task.status_code == Status.FAILED)
        ).all()
    assert path == str(corrupt) and str(corrupt) in message  # the error names the file


def _step_summaries(dag_id: str, run_id: str, task_id: str) -> list[dict]:
    """The XComs of a (mapped) astra step of a run, one per map index."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return list(
            session.scalars(
                select(XComModel.value)
                .where(
                    XComModel.dag_id == dag_id,
                    XComModel.run_id == run_id,
                    XComModel.task_id == task_id,
                    XComModel.key == "return_value",
                )
                .order_by(XComModel.map_index)
            )
        )


@pytest.mark.parametrize("astra_db", ["sqlite"], indirect=True)
def test_rediscover_runs_the_pipeline_again_over_the_data_root(airflow_db, astra_conn, survey, tmp_path):
    """With rediscover, a second run takes the registered files again and skips every task as done; with
    min_file_age_seconds 0, files written just now are ready."""
    root = tmp_path / "sdss"
    shutil.copytree(survey["data"] / "apogee", root / "apogee")  # fresh mtimes: not 60 s old
    conf = {
        "data_root": str(root),
        "model_path": str(survey["model"]),
        "doppler_model_path": str(survey["model"]),
        "output_dir": str(tmp_path / "normalised"),
        "rediscover": True,
        "min_file_age_seconds": 0,
    }
    dag = get_dag("astra_pipeline", DAGS)
    first = dag.test(run_conf=conf)
    _succeeded(first, skipped=PAYNE_SKIPPED)
    n_tasks, n_results = _count(Task), _count(Doppler) + _count(TheCannon) + _count(Continuum)
    assert _statuses("DopplerRadialVelocity") == {"COMPLETED": 12}

    second = dag.test(run_conf=conf)
    _succeeded(second, skipped=PAYNE_SKIPPED)
    discovered = _step_summaries("astra_pipeline", second.run_id, "discover")[0]
    assert discovered["counts"] == {"apStar": 6, "apVisit": 12}
    for step, n in (("continuum", 6), ("doppler", 12), ("thecannon", 6)):
        summaries = _step_summaries("astra_pipeline", second.run_id, step)
        assert sum(s["skipped"] for s in summaries) == n, (step, summaries)
        assert sum(s["completed"] + s["failed"] for s in summaries) == 0, (step, summaries)
    assert (_count(Task), _count(Doppler) + _count(TheCannon) + _count(Continuum)) == (n_tasks, n_results)


@pytest.mark.parametrize("astra_db", ["sqlite"], indirect=True)
def test_a_manual_run_of_the_asset_scheduled_pipeline_skips_cleanly(airflow_db, astra_conn, tmp_path):
    """Without triggering asset events there is nothing to register: every step is skipped, nothing fails."""
    with environment(ASTRA_DATA_ROOT=str(tmp_path)):
        dag_run = get_dag("astra_pipeline_on_new_spectra", DAGS).test(logical_date=None)
    states = {task_id: str(ti.state) for (task_id, _), ti in task_instances(dag_run).items()}
    assert str(dag_run.state) == "success"
    assert set(states.values()) == {"skipped"}, states
    assert _count(Task) == 0
