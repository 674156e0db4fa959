"""The provider package (entry point, metadata, ``airflow providers``) and the astra database hook."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
from airflow_helpers import environment, run_airflow
from sqlalchemy import text

from astra_provider import database
from astra_provider.get_provider_info import get_provider_info
from astra_provider.hooks.astra import AstraHook, connection_from_url, url_from_connection


def test_provider_info_is_valid_and_matches_the_distribution():
    import jsonschema
    from airflow import __file__ as airflow_init

    info = get_provider_info()
    schema = json.loads((Path(airflow_init).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(info, schema)
    assert info["package-name"] == metadata.distribution("astra-provider").metadata["Name"]
    entry_points = metadata.entry_points(group="apache_airflow_provider")
    assert any(ep.value == "astra_provider.get_provider_info:get_provider_info" for ep in entry_points)
    # every listed module imports (cheaply: listing must not pull in science code)
    import importlib

    for key in ("operators", "sensors", "triggers", "hooks"):
        for group in info[key]:
            for module in group["python-modules"]:
                importlib.import_module(module)


def test_providers_manager_registers_the_hook_and_connection_type():
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    assert ProvidersManager().providers["astra-provider"].version == metadata.version("astra-provider")
    hook = ProvidersManagerTaskRuntime().hooks["astra"]
    assert hook is not None
    assert hook.hook_class_name == "astra_provider.hooks.astra.AstraHook"
    assert hook.connection_id_attribute_name == "astra_conn_id"


def test_airflow_providers_get_shows_the_provider():
    result = run_airflow("providers", "get", "astra-provider", "--full", "-o", "json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout[result.stdout.index("[") :])[0]
    assert shown["package-name"] == "astra-provider"
    assert shown["connection-types"][0]["hook-class-name"] == "astra_provider.hooks.astra.AstraHook"
    assert "astra_provider.operators.bundle" in shown["operators"][0]["python-modules"]


# The hook ----------------------------------------------------------------------------------------------


def _connection(**fields):
    from airflow.sdk import Connection

    return Connection(conn_id="astra_test", **fields)


def test_url_from_a_postgres_connection_escapes_credentials():
    conn = _connection(
        conn_type="astra",
        host="db.example.org",
        port=5433,
        login="astra",
        password="p@ss/w:rd",
        schema="sdss",
    )
    url = url_from_connection(conn)
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    assert parsed.drivername == "postgresql+psycopg2"
    assert (parsed.host, parsed.port, parsed.database) == ("db.example.org", 5433, "sdss")
    assert (parsed.username, parsed.password) == ("astra", "p@ss/w:rd")
    from astra_provider.database import redact

    assert "p@ss" not in redact(url) and "***" in redact(url)


def test_url_from_a_postgres_uri_connection_with_extras():
    from airflow.sdk import Connection

    conn = Connection.from_uri("postgresql://u:pw@127.0.0.1:5432/astra?sslmode=require", conn_id="x")
    assert url_from_connection(conn) == "postgresql+psycopg2://u:pw@127.0.0.1:5432/astra?sslmode=require"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://astra:p%40ss@db.example.org:5433/sdss",
        "postgresql+psycopg://u:pw@127.0.0.1:5432/astra?sslmode=require",
        "sqlite:////data/astra.db",
    ],
)
def test_connection_from_url_round_trips_through_the_hook(url):
    from airflow.sdk import Connection

    value = connection_from_url(url)  # as Airflow reads an AIRFLOW_CONN_* variable: JSON or a URI
    read = Connection.from_json if value.startswith("{") else Connection.from_uri
    conn = read(value, conn_id="x")
    assert url_from_connection(conn) == url


def test_url_from_an_sqlite_connection(tmp_path):
    from airflow.sdk import Connection

    conn = Connection.from_uri(f"sqlite:///{tmp_path}/astra.db", conn_id="x")
    assert url_from_connection(conn) == f"sqlite:///{tmp_path}/astra.db"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"conn_type": "astra", "host": "h"}, "schema field to the astra database name"),
        ({"conn_type": "mysql", "host": "h", "schema": "x"}, "has type 'mysql'"),
        ({"conn_type": "sqlite", "schema": "relative.db"}, "absolute file path"),
    ],
)
def test_bad_connections_are_refused_with_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        url_from_connection(_connection(**fields))


def test_without_a_connection_the_hook_falls_back_to_the_environment_then_the_embedded_default(tmp_path):
    with environment(AIRFLOW_CONN_ASTRA_MISSING=None, ASTRA_DATABASE_URL=f"sqlite:///{tmp_path}/env.db"):
        assert AstraHook("astra_missing").get_database_url() == f"sqlite:///{tmp_path}/env.db"
    with environment(ASTRA_DATABASE_URL=None, ASTRA_HOME=str(tmp_path / "home")):
        assert AstraHook("astra_missing").get_database_url() == f"sqlite:///{tmp_path / 'home' / 'astra.db'}"


def test_the_hook_reads_the_connection_and_configures_the_astra_database(astra_db):
    with environment(AIRFLOW_CONN_ASTRA_DEFAULT=connection_from_url(astra_db)):
        hook = AstraHook()
        assert hook.get_database_url() == astra_db
        database.configure(None)
        assert hook.configure() == astra_db
        assert database.get_database_url() == astra_db
        ok, message = hook.test_connection()
        assert ok, message
        with hook.session_scope() as session:
            assert session.execute(text("select count(*) from astra.task")).scalar() == 0
        session = hook.get_session()
        try:
            assert session.execute(text("select 1")).scalar() == 1
        finally:
            session.close()


def test_a_connection_to_a_missing_database_reports_failure(postgres_server):
    from sqlalchemy.engine import make_url

    url = make_url(postgres_server).set(database="no_such_database")
    connection = connection_from_url(url.render_as_string(hide_password=False))
    with environment(AIRFLOW_CONN_ASTRA_DEFAULT=connection):
        ok, message = AstraHook().test_connection()
    assert not ok
    assert "no_such_database" in message
