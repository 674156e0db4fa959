"""The watched asset and the consuming DAG, end to end through Airflow's own machinery:

DAG processor sync (asset + watcher trigger row) -> the trigger re-created from that row, its watermark in
the real asset state store -> ``Trigger.submit_event`` (asset events) -> the scheduler's asset-triggered
run creation -> the consuming DAG's task registers the files of every triggering event.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from data_product_helpers import (
    WATCHED_ASSET,
    in_process_comms,
    load_test_dag,
    make_product,
    run_existing_dagrun,
    sync_test_dags,
    xcom_return_value,
)
from sqlalchemy import select

from astra_provider.assets import (
    asset_event_paths,
    asset_event_payloads,
    reduced_spectra_asset,
    register_asset_event_data_products,
)
from astra_provider.bundling import decode_pks
from astra_provider.database import session_scope
from astra_provider.database.astradb import DataProduct
from astra_provider.triggers.data_products import (
    WATERMARK_KEY,
    FoundFile,
    NewDataProductsEventTrigger,
    event_payload,
    payload_paths,
)

pytest_plugins = ["data_product_fixtures"]  # fixtures: airflow_db, astra_test_dags, astra_conn

CONSUMER = "astra_test_on_reduced"


def test_reduced_spectra_asset_has_a_data_product_watcher() -> None:
    asset = reduced_spectra_asset("apogee", "/data/sdss", ["apStar"], min_age_seconds=30, poll_interval=10)
    assert asset.name == "apogee"
    assert asset.uri == "file:///data/sdss?filetypes=apStar"
    (watcher,) = asset.watchers
    assert watcher.name == "apogee_watcher"
    trigger = watcher.trigger
    assert isinstance(trigger, NewDataProductsEventTrigger)
    assert (trigger.root, trigger.filetypes, trigger.asset_name) == ("/data/sdss", ["apStar"], "apogee")
    assert (trigger.min_age_seconds, trigger.poll_interval) == (30, 10)
    glob_asset = reduced_spectra_asset("incoming", "/data/in", pattern="**/*.fits", uri="s3://bucket/in")
    assert glob_asset.uri == "s3://bucket/in"
    assert glob_asset.watchers[0].trigger.pattern == "**/*.fits"


def _event(asset_name: str, payload: dict, alias: str | None = None, uri: str | None = None):
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult

    uri = Asset(name=asset_name, uri=uri or f"astra-test://{asset_name}").uri  # normalised, as stored
    return AssetEventDagRunReferenceResult.model_validate(
        {
            "asset": {"name": asset_name, "uri": uri, "extra": {}},
            "extra": {"from_trigger": True, "payload": payload},
            "source_task_id": None,
            "source_dag_id": None,
            "source_run_id": None,
            "source_map_index": -1,
            "source_aliases": [{"name": alias}] if alias else [],
            "timestamp": "2026-11-23T12:00:00Z",
        }
    )


def _reduced(root: Path) -> object:
    return reduced_spectra_asset("reduced", root, uri="astra-test://reduced")


def test_asset_event_helpers_read_every_triggering_event(tmp_path: Path) -> None:
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    files = [FoundFile(float(i), str(tmp_path / f"a{i}.fits"), 1, "apStar") for i in range(4)]
    first = event_payload(str(tmp_path), files[:2], files[1].key)
    second = event_payload(str(tmp_path), files[1:], files[3].key)  # overlaps: a repeated batch
    other = {"kind": "something else", "paths": ["x"]}
    events = TriggeringAssetEventsAccessor.build(
        [
            _event("reduced", first),
            _event("reduced", second, alias="all_reduced"),  # also listed under its alias
            _event("unrelated", other),
        ]
    )
    reduced = _reduced(tmp_path)

    assert [p["counts"] for p in asset_event_payloads(events)] == [{"apStar": 2}, {"apStar": 3}]
    assert asset_event_paths(events, reduced) == [f.path for f in files]
    assert asset_event_paths(events, [reduced, Asset(name="unrelated", uri="astra-test://unrelated")]) == [
        f.path for f in files
    ]
    assert asset_event_paths(events, root=tmp_path) == [f.path for f in files]
    assert asset_event_paths(events, Asset(name="nothing", uri="astra-test://nothing")) == []
    assert asset_event_paths(None) == []
    assert payload_paths(first) == [f.path for f in files[:2]]
    # Without the watched asset (or a root), the watched root is unknown: nothing is accepted.
    assert asset_event_paths(events) == []


def test_register_with_no_new_file_can_skip(astra_db: str, tmp_path: Path) -> None:
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    assert register_asset_event_data_products(None, astra_conn_id=None) == {
        "data_product_pks": [],
        "by_filetype": {},
        "counts": {},
    }
    path = make_product(tmp_path, "apStar", 1)
    found = [FoundFile(path.stat().st_mtime, str(path), 64, "apStar")]
    events = TriggeringAssetEventsAccessor.build(
        [_event("reduced", event_payload(str(tmp_path), found, None))]
    )
    reduced = _reduced(tmp_path)
    value = register_asset_event_data_products(events, reduced, astra_conn_id=None, encode_pks=False)
    assert len(value["data_product_pks"]) == 1

    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException):
        register_asset_event_data_products(events, reduced, astra_conn_id=None, skip_if_empty=True)


def test_asset_event_payloads_cannot_register_files_outside_the_watched_root(
    astra_db: str, tmp_path: Path, capfd
) -> None:
    """Issue #12: anyone who may post asset events (REST API) writes the payload; only files under the
    root that the asset's watcher watches are registered, links resolved."""
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    root = tmp_path / "root"
    good = make_product(root, "apVisit", 1)
    secret = make_product(tmp_path / "private", "apStar", 2)
    (root / "apogee" / "linked.fits").symlink_to(secret)
    hostile = {
        "kind": "astra.new_data_products",
        "root": str(root),
        "paths": ["../../../../etc/passwd", "/etc/shadow", "apogee/linked.fits", str(secret)],
    }
    forged_root = {
        **hostile,
        "root": str(tmp_path / "private"),
        "paths": [str(secret.relative_to(tmp_path / "private"))],
    }
    honest = event_payload(str(root), [FoundFile(1.0, str(good), 64, "apVisit")], None)
    events = TriggeringAssetEventsAccessor.build(
        [_event("reduced", hostile), _event("reduced", forged_root), _event("reduced", honest)]
    )

    value = register_asset_event_data_products(events, _reduced(root), astra_conn_id=None, encode_pks=False)

    with session_scope(astra_db) as session:
        registered = dict(session.execute(select(DataProduct.pk, DataProduct.path)).all())
    assert registered == {value["data_product_pks"][0]: str(good)}
    out = capfd.readouterr().out
    for path in ("../../../../etc/passwd", "/etc/shadow", "apogee/linked.fits", str(secret)):
        assert f"Refused path {path}: outside the data root {root}" in out
    assert f"Refused path {tmp_path / 'private'}: an event root other than the watched root {root}" in out


def test_the_asset_events_operator_confines_to_the_roots_its_dag_watches(
    astra_conn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``astra_pipeline_on_new_spectra`` (YAML): its register step reads the watched root from the DAG."""
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor
    from airflow_helpers import DAGS, get_dag

    from astra_provider.assets import dag_assets, watched_root

    root = tmp_path / "sdss"
    monkeypatch.setenv("ASTRA_DATA_ROOT", str(root))
    dag = get_dag("astra_pipeline_on_new_spectra", DAGS)
    (asset,) = dag_assets(dag)
    assert (asset.name, watched_root(asset)) == ("apogee_reduced_spectra", str(root))
    trigger = asset.watchers[0].trigger
    assert (trigger.min_age_seconds, trigger.poll_interval) == (5, 5)  # a drop starts a run within ~15 s

    good = make_product(root, "apStar", 1)
    payload = event_payload(str(root), [FoundFile(1.0, str(good), 64, "apStar")], None)
    payload["paths"] += ["../../etc/passwd", "/etc/shadow"]
    events = TriggeringAssetEventsAccessor.build([_event(asset.name, payload, uri=asset.uri)])
    value = dag.task_dict["register"].execute({"triggering_asset_events": events})
    with session_scope(astra_conn) as session:
        registered = dict(session.execute(select(DataProduct.pk, DataProduct.path)).all())
    assert [registered[pk] for pk in decode_pks(value["data_product_pks"])] == [str(good)]
    assert list(registered.values()) == [str(good)]


def _watcher_trigger_from_db() -> tuple[int, NewDataProductsEventTrigger, object]:
    """The watcher's trigger re-created from its ``trigger`` row, with its asset state store, as the
    triggerer does (``TriggerRunner.create_triggers``)."""
    from airflow.models.asset import AssetModel
    from airflow.sdk import Asset
    from airflow.sdk._shared.module_loading import import_string
    from airflow.sdk.execution_time.context import AssetStateStoreAccessors
    from airflow.utils.session import create_session

    with create_session() as session:
        asset = session.scalars(select(AssetModel).where(AssetModel.name == WATCHED_ASSET)).one()
        (row,) = asset.triggers
        trigger_id, classpath, kwargs = row.id, row.classpath, row.kwargs
        name, uri = asset.name, asset.uri
    trigger = import_string(classpath)(**kwargs)
    trigger.asset_state_store = AssetStateStoreAccessors(inlets=[Asset(name=name, uri=uri)])
    return trigger_id, trigger, trigger.asset_state_store


def _submit(trigger_id: int, event) -> None:
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    with create_session() as session:
        Trigger.submit_event(trigger_id, event, session=session)


def _create_asset_triggered_run() -> tuple[str, int]:
    """What the scheduler does for a DAG with queued asset events; returns (run_id, events consumed)."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    runner = SchedulerJobRunner(job=Job(), num_runs=1)
    with create_session() as session:
        before = set(session.scalars(select(DagRun.run_id).where(DagRun.dag_id == CONSUMER)))
        runner._create_dag_runs_asset_triggered(dag_models=[session.get(DagModel, CONSUMER)], session=session)
    with create_session() as session:
        (run,) = [
            r
            for r in session.scalars(select(DagRun).where(DagRun.dag_id == CONSUMER))
            if r.run_id not in before
        ]
        return run.run_id, len(run.consumed_asset_events)


def test_watcher_events_run_the_consuming_dag(
    astra_conn: str, astra_test_dags: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "watch"
    monkeypatch.setenv("ASTRA_TEST_WATCH_ROOT", str(root))
    sync_test_dags()
    sync_test_dags()  # the second pass links the (now active) asset to its watcher trigger
    files = [make_product(root, "apStar", i, age=900 - i) for i in range(4)]
    files += [make_product(root, "apVisit", i, age=800 - i) for i in range(6)]

    trigger_id, trigger, store = _watcher_trigger_from_db()
    assert (trigger.root, trigger.max_files_per_event) == (str(root), 4)

    async def events(n: int) -> list:
        generator = trigger.run()
        found = [await asyncio.wait_for(generator.__anext__(), 30) for _ in range(n)]
        await generator.aclose()
        return found

    with in_process_comms():
        store.clear()
        first, second, third = asyncio.run(events(3))
        assert store.get(WATERMARK_KEY)["path"] == str(files[7])  # saved after the second event
    assert [len(e.payload["paths"]) for e in (first, second, third)] == [4, 4, 2]

    dag = load_test_dag(CONSUMER)
    # Events 1 and 2 arrive before the scheduler looks: the run it creates gets event 1; Airflow 3.3
    # leaves event 2 for the next run, which coalesces it with event 3.
    _submit(trigger_id, first)
    _submit(trigger_id, second)
    run_1, consumed_1 = _create_asset_triggered_run()
    _submit(trigger_id, third)
    run_2, consumed_2 = _create_asset_triggered_run()
    # A second triggerer running the same watcher repeats the first batch (at-least-once delivery).
    _submit(trigger_id, first)
    run_3, consumed_3 = _create_asset_triggered_run()
    assert (consumed_1, consumed_2, consumed_3) == (1, 2, 1)

    claimed = []
    for run_id in (run_1, run_2, run_3):
        assert run_existing_dagrun(dag, run_id) == "success"
        claimed.append(decode_pks(xcom_return_value(CONSUMER, run_id, "register")["data_product_pks"]))

    with session_scope(astra_conn) as session:
        registered = dict(session.execute(select(DataProduct.pk, DataProduct.path)).all())
    assert [registered[pk] for pk in claimed[0]] == [str(p) for p in files[:4]]
    assert [registered[pk] for pk in claimed[1]] == [str(p) for p in files[4:]]
    assert claimed[2] == []  # the repeated batch claims nothing
    assert sorted(registered.values()) == sorted(str(p) for p in files)
