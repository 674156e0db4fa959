"""schema/astradb.sql matches the ORM; it loads into an empty PostgreSQL; the ``astra`` CLI works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from astra_provider.cli import schema_sql
from astra_provider.database.astradb import Base

REPO = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO / "schema" / "astradb.sql"


def test_schema_file_is_generated_from_the_orm():
    assert SCHEMA_FILE.read_text() == schema_sql(), "regenerate with: astra schema > schema/astradb.sql"


def test_schema_file_loads_with_psql_and_matches_the_orm(postgres_server):
    from conftest import _new_postgres_database

    url = sqlalchemy.engine.make_url(_new_postgres_database(postgres_server, schema=False))
    with SCHEMA_FILE.open() as sql:
        completed = subprocess.run(
            [
                "psql",
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-h",
                url.host,
                "-p",
                str(url.port),
                "-U",
                url.username,
                url.database,
            ],
            stdin=sql,
            capture_output=True,
            text=True,
        )
    assert completed.returncode == 0, completed.stderr
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_schemas": True, "include_name": _only_astra_schema}
        )
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def _only_astra_schema(name, type_, parent_names):
    return name == "astra" if type_ == "schema" else True


def run_cli(*args: str, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASTRA_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "astra_provider.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_cli_show_and_rerun(astra_db):
    assert "initdb" in run_cli("--help", url=astra_db).stdout
    assert run_cli("initdb", url=astra_db).returncode == 0
    from astra_provider.contrib.examples import GreedyPrimes

    instance = GreedyPrimes(max_value=12)
    instance.execute()
    pk = instance.tasks[0].pk
    shown = run_cli("show", str(pk), url=astra_db)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["status"] == "COMPLETED"
    assert record["parameters"] == {"min_value": 2, "max_value": 12}
    assert record["timings"]["execute"] >= 0
    assert record["result"] == [2, 3, 5, 7, 11]
    rerun = run_cli("rerun", str(pk), url=astra_db)
    assert rerun.returncode == 0, rerun.stderr
    output = json.loads(rerun.stdout)
    assert output["result"] == [2, 3, 5, 7, 11] and output["summary"]["completed"] == 1
    missing = run_cli("show", "424242", url=astra_db)
    assert missing.returncode != 0 and "no task with pk=424242" in missing.stderr
