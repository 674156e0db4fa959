"""The astra database connection in Airflow: ``astra airflow-setup`` writes ``astra_default`` into the
session's real metadata database from ``ASTRA_DATABASE_URL``, and the connection form's *Test* button
(``Connection.test_connection()``, as the API server's ``/connections/test`` route calls it) reaches
``AstraHook.test_connection``. The API route itself is exercised under ``airflow standalone`` in
``test_standalone.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from airflow_helpers import environment, init_airflow_db
from sqlalchemy import select
from sqlalchemy.engine import make_url

from astra_provider.cli import main
from astra_provider.hooks.astra import url_from_connection


@pytest.fixture
def metadata_db() -> Iterator[None]:
    """The session's Airflow metadata database, without a stored ``astra_default`` before and after."""
    init_airflow_db()
    _delete_connection("astra_default")
    with environment(AIRFLOW_CONN_ASTRA_DEFAULT=None):
        yield
    _delete_connection("astra_default")


def _delete_connection(conn_id: str) -> None:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        for row in session.scalars(select(Connection).where(Connection.conn_id == conn_id)):
            session.delete(row)


def _stored(conn_id: str = "astra_default") -> list:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(select(Connection).where(Connection.conn_id == conn_id)).all()
        session.expunge_all()
        return rows


def test_airflow_setup_creates_then_updates_astra_default(metadata_db, astra_db, tmp_path, capsys) -> None:
    with environment(ASTRA_DATABASE_URL=astra_db):
        assert main(["airflow-setup"]) == 0
    out = capsys.readouterr().out
    redacted = make_url(astra_db).render_as_string(hide_password=True)
    assert (
        f"Created the Airflow connection 'astra_default' (type astra) from ASTRA_DATABASE_URL: {redacted}"
        in out
    )
    assert "Connection test OK: Connected to " in out
    password = make_url(astra_db).password
    if password:
        assert password not in out
    (row,) = _stored()
    assert url_from_connection(row) == astra_db

    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["--database-url", other, "airflow-setup", "--no-test"]) == 0
    assert (
        "Updated the Airflow connection 'astra_default' (type astra) from --database-url"
        in capsys.readouterr().out
    )
    (row,) = _stored()  # updated in place, not duplicated
    assert url_from_connection(row) == other


def test_airflow_setup_says_when_it_falls_back_to_the_embedded_database(
    metadata_db, tmp_path, capsys
) -> None:
    with environment(ASTRA_DATABASE_URL=None, ASTRA_HOME=str(tmp_path)):
        assert main(["airflow-setup", "--conn-id", "astra_default"]) == 0
    out = capsys.readouterr().out
    assert "from the embedded SQLite default (set ASTRA_DATABASE_URL for a PostgreSQL server)" in out
    assert f"sqlite:///{tmp_path / 'astra.db'}" in out


def test_airflow_setup_reports_a_database_it_cannot_reach(metadata_db, postgres_server, capsys) -> None:
    wrong = make_url(postgres_server).set(password="wrong-password", username="nobody")
    with environment(ASTRA_DATABASE_URL=wrong.render_as_string(hide_password=False)):
        assert main(["airflow-setup"]) == 1
    out = capsys.readouterr().out
    assert "Connection test FAILED: OperationalError" in out
    assert "wrong-password" not in out


def _test_button(conn_id: str, **fields) -> tuple[bool, str]:
    """What the API server does for the form's Test button: a transient env connection, then the hook."""
    from airflow.models.connection import Connection

    connection = Connection(conn_id=conn_id, **fields)
    variable = f"AIRFLOW_CONN_{conn_id.upper()}"
    os.environ[variable] = connection.get_uri()
    try:
        return connection.test_connection()
    finally:
        del os.environ[variable]


def test_the_connection_forms_test_button_reaches_the_hook(metadata_db, astra_db, tmp_path) -> None:
    url = make_url(astra_db)
    if url.get_backend_name() == "sqlite":
        fields = {"conn_type": "astra", "schema": url.database}
    else:
        fields = {
            "conn_type": "astra",
            "host": url.host,
            "port": url.port,
            "login": url.username,
            "password": url.password,
            "schema": url.database,
        }
    ok, message = _test_button("button_ok", **fields)
    assert ok, message
    assert message.startswith(
        f"Connected to {url.render_as_string(hide_password=True)} ({url.get_backend_name()} "
    )

    if url.get_backend_name() == "sqlite":
        bad = {**fields, "schema": str(tmp_path / "no" / "such" / "dir" / "astra.db")}
    else:
        bad = {**fields, "schema": "no_such_database"}
    ok, message = _test_button("button_bad", **bad)
    assert not ok and "OperationalError" in message
