"""Helpers of the sensor/trigger/asset tests (``test_triggers.py``, ``test_sensors.py``, ``test_assets.py``);
their fixtures are in ``data_product_fixtures.py``; the shared Airflow test helpers in ``airflow_helpers.py``.

* :func:`in_process_comms`: the task-SDK comms channel of the in-process supervisor that ``dag.test()`` uses,
  with the ``asend`` the triggerer's channel has. ``AssetStateStoreAccessors.aget/aset`` then go through the
  real Execution API to the ``asset_state_store`` table, as they do in the triggerer.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from airflow_helpers import TEST_DAGS, get_dag

DAG_FILE = TEST_DAGS / "astra_test_data_products.py"
WATCHED_ASSET = "astra_test_reduced"


def make_product(root: Path, filetype: str, i: int, *, age: float = 600.0, size: int = 64) -> Path:
    """Write a small file at the SDSS path of product ``i`` of ``filetype``, last modified ``age`` s ago."""
    from astra_provider.sdss.paths import sdss_path

    if filetype == "apStar":
        kwargs: dict[str, Any] = {
            "apred": "1.4",
            "telescope": "apo25m",
            "healpix": 1000 + i,
            "obj": f"2M{i:08d}",
        }
    elif filetype == "apVisit":
        kwargs = {
            "apred": "1.4",
            "telescope": "apo25m",
            "field": "100+20",
            "plate": 15000 + i // 300,
            "mjd": 60000,
            "fiber": 1 + i % 300,
        }
    elif filetype == "specFull":
        kwargs = {"run2d": "v6_1_3", "fieldid": 100, "mjd": 60000, "catalogid": 10_000_000 + i}
    else:
        raise ValueError(filetype)
    path = sdss_path(filetype, root, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    if age:
        set_age(path, age)
    return path


def set_age(path: Path, age: float) -> None:
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


@contextmanager
def in_process_comms() -> Iterator[Any]:
    """Install the in-process supervisor comms (with ``asend``) as the task SDK's ``SUPERVISOR_COMMS``."""
    import psutil
    import structlog
    from airflow.sdk.execution_time.supervisor import (
        InProcessSupervisorComms,
        InProcessTestSupervisor,
        set_supervisor_comms,
    )

    class Comms(InProcessSupervisorComms):
        async def asend(self, msg: Any) -> Any:  # the triggerer's channel is async; the API call is local
            return self.send(msg)

    supervisor = InProcessTestSupervisor(
        id=uuid.uuid4(),
        pid=os.getpid(),
        process=psutil.Process(),
        process_log=structlog.get_logger(),
        client=InProcessTestSupervisor._api_client(),
    )
    supervisor.comms = Comms(supervisor=supervisor)
    with set_supervisor_comms(supervisor.comms):
        yield supervisor.comms


def sync_test_dags() -> None:
    """Parse ``tests/dags`` and write it to the metadata database, as the DAG processor would."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.utils.session import create_session

    manager = DagBundlesManager()
    with create_session() as session:
        manager.sync_bundles_to_db(session=session)
    bundle = next(b for b in manager.get_all_dag_bundles() if Path(b.path).resolve() == TEST_DAGS)
    bundle.initialize()
    bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
    errors = {path: error for path, error in bag.import_errors.items() if Path(path).name == DAG_FILE.name}
    assert not errors, errors
    sync_bag_to_db(bag, bundle.name, bundle.version)


def load_test_dag(dag_id: str) -> Any:
    """A DAG of ``tests/dags/astra_test_data_products.py`` (other test DAG files do not matter here)."""
    return get_dag(dag_id, DAG_FILE)


def xcom_return_value(dag_id: str, run_id: str, task_id: str) -> Any:
    """The ``return_value`` XCom of a task instance, from the metadata database."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(
            select(XComModel.value).where(
                XComModel.dag_id == dag_id,
                XComModel.run_id == run_id,
                XComModel.task_id == task_id,
                XComModel.key == "return_value",
            )
        )


def run_existing_dagrun(dag: Any, run_id: str) -> str:
    """Run the tasks of an existing DAG run in-process (the loop of ``dag.test()``, for a run it did not
    create, e.g. an asset-triggered one); returns the run's final state."""
    from airflow.models.dagrun import DagRun
    from airflow.sdk import timezone
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState
    from sqlalchemy import select

    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    with create_session() as session:
        dag_run = session.scalars(
            select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id)
        ).one()
        dag_run.dag = scheduler_dag
        dag_run.state = DagRunState.RUNNING
        session.commit()
        while dag_run.state == DagRunState.RUNNING:
            session.expire_all()
            schedulable, _ = dag_run.update_state(session=session)
            for ti in schedulable:
                ti.try_number += 1
                ti.state = TaskInstanceState.SCHEDULED
                ti.scheduled_dttm = timezone.utcnow()
            session.commit()
            for ti in dag_run.get_task_instances(session=session):
                if ti.state == TaskInstanceState.SCHEDULED:
                    _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
        return str(dag_run.state)
