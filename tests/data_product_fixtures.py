"""Fixtures of the sensor/trigger/asset tests, loaded with ``pytest_plugins = ["data_product_fixtures"]``.

* ``airflow_db``: the test session's Airflow metadata database, initialised once.
* ``astra_test_dags``: adds ``tests/dags`` as a second DAG bundle (``astra-test-dags``), so that
  ``dag.test()`` and the DAG processor code find the test DAGs next to the ``dags-folder`` bundle.
* ``astra_conn``: the ``astra_db`` database exposed as the Airflow connection ``astra_default`` (what the
  sensor resolves through ``AstraHook``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow_helpers import TEST_DAGS, bundle_config, init_airflow_db

from astra_provider.hooks.astra import connection_from_url


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Create the Airflow metadata tables of the test session (once)."""
    init_airflow_db()


@pytest.fixture
def astra_test_dags(airflow_db: None, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Configure ``tests/dags`` as the DAG bundle ``astra-test-dags`` next to ``dags-folder``."""
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", bundle_config())
    return TEST_DAGS


@pytest.fixture
def astra_conn(astra_db: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``astra_db`` (SQLite and PostgreSQL) as the Airflow connection ``astra_default``; yields its URL."""
    monkeypatch.setenv("AIRFLOW_CONN_ASTRA_DEFAULT", connection_from_url(astra_db))
    return astra_db
