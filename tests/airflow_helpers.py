"""Helpers for the tests that run Airflow for real (metadata DB, DAG bundles, connections, the CLI).

The session's ``AIRFLOW_HOME`` and metadata database come from ``conftest.py``. The test DAGs under
``tests/dags`` are a second DAG bundle (``astra-test-dags``) next to the ``dags-folder`` bundle, so that
``dag.test()`` finds them; :func:`use_test_bundles` sets that up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
TEST_DAGS = TESTS / "dags"
DAGS = REPO / "dags"
AIRFLOW = Path(sys.executable).parent / "airflow"

_initialised = False


def init_airflow_db() -> None:
    """Create the session's Airflow metadata database (once per process; like ``airflow db migrate``)."""
    global _initialised
    if not _initialised:
        from airflow.utils import db

        db.initdb()
        _initialised = True


def bundle_config() -> str:
    """``[dag_processor] dag_bundle_config_list`` with the repository's dags/ and the test DAGs."""
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    return json.dumps(
        [
            {"name": "dags-folder", "classpath": local, "kwargs": {}},
            {"name": "astra-test-dags", "classpath": local, "kwargs": {"path": str(TEST_DAGS)}},
        ]
    )


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, with ``None``, unset) environment variables for the duration of the block."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def use_test_bundles() -> Any:
    """A context manager: the test DAG bundle is configured, and ``tests/`` is importable by tasks."""
    python_path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return environment(AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST=bundle_config(), PYTHONPATH=python_path)


def get_dag(dag_id: str, folder: Path = TEST_DAGS) -> Any:
    """The DAG ``dag_id`` parsed from ``folder`` (fails listing the import errors if it does not load)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(folder))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]


def run_airflow(*arguments: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the ``airflow`` CLI of this virtualenv with the current environment."""
    return subprocess.run(
        [str(AIRFLOW), *arguments], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def task_instances(dag_run: Any) -> dict[tuple[str, int], Any]:
    """The task instances of a finished ``dag.test()`` run by ``(task_id, map_index)``."""
    return {(ti.task_id, ti.map_index): ti for ti in dag_run.get_task_instances()}
