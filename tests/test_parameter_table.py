"""``astra.parameter`` is keyed by the hash of the value: long values are recorded on SQLite and PostgreSQL,
and a database of an earlier version is refused with a clear error (and upgraded with the documented SQL)."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import create_engine, func, select, text
from test_docs import DOCS, extract_blocks

from astra_provider import database
from astra_provider.base import Parameter, TaskInstance
from astra_provider.database import session_scope
from astra_provider.database.astradb import Parameter as ParameterRow
from astra_provider.database.astradb import Task, TaskParameter, parameter_value_hash
from astra_provider.database.recording import get_or_create_parameters
from astra_provider.devtools import create_database
from astra_provider.utils import canonical_json


class LineList(TaskInstance):
    lines = Parameter()
    scale = Parameter(default=1.0)

    def execute(self):
        return [len(task.parameters["lines"]) for task, _ in self.iterable()]


def long_value(seed: int, size: int = 100_000) -> str:
    """A ~``size``-character string that does not compress to a short btree entry (hex digests)."""
    digest, parts = str(seed).encode(), []
    while sum(map(len, parts)) < size:
        digest = hashlib.sha256(digest).digest()
        parts.append(digest.hex())
    return "".join(parts)[:size]


def test_a_bundle_of_100_kb_values_is_recorded_and_found_again(astra_db):
    values = tuple(long_value(seed) for seed in range(3))
    bundle = LineList(lines=values)
    assert bundle.execute() == [100_000] * 3
    assert bundle.summary()["completed"] == 3

    again = LineList(lines=values)
    again.execute()
    assert again.summary()["skipped"] == 3  # the long values are found by their hash
    with session_scope() as session:
        rows = session.execute(
            select(ParameterRow.parameter_value, ParameterRow.parameter_value_hash).where(
                ParameterRow.parameter_name == "lines"
            )
        ).all()
        links = session.scalar(select(func.count()).select_from(TaskParameter))
    assert len(rows) == 3 and links == 3 * 2
    for value, value_hash in rows:
        assert len(value) == 100_002  # the JSON string: quotes around 100,000 characters
        assert value_hash == hashlib.sha256(value.encode()).hexdigest()
    assert Task.get_by_id(bundle.tasks[1].pk).parameters["lines"] == values[1]


def test_the_hash_is_postgresql_sha256_of_the_text(postgres_db):
    value = canonical_json({"name": "Fe I ☃", "wavelengths": [15194.49, 15207.53]})
    with session_scope() as session:
        in_sql = session.scalar(
            text("SELECT encode(sha256(convert_to(:value, 'UTF8')), 'hex')"), {"value": value}
        )
    assert in_sql == parameter_value_hash(value)


OLD_PARAMETER_TABLE = """
CREATE TABLE astra.parameter (
    pk {pk},
    parameter_name TEXT NOT NULL,
    parameter_value TEXT NOT NULL,
    UNIQUE (parameter_name, parameter_value)
)
"""


def _documented_upgrade_sql() -> str:
    blocks = [
        b
        for b in extract_blocks(DOCS / "database.md")
        if b.language == "sql" and "add column parameter_value_hash" in b.code
    ]
    assert len(blocks) == 1, "docs/database.md has one upgrade SQL block"
    return blocks[0].code


def test_an_old_postgresql_database_is_refused_then_upgraded_by_the_documented_sql(postgres_server):
    url = create_database(postgres_server, "astra_old_parameter_table")
    old = create_engine(url)
    with old.begin() as connection:
        connection.execute(text("CREATE SCHEMA astra"))
        connection.execute(text(OLD_PARAMETER_TABLE.format(pk="BIGSERIAL PRIMARY KEY")))
        connection.execute(
            text("INSERT INTO astra.parameter (parameter_name, parameter_value) VALUES ('scale', '2.0')")
        )
    try:
        with pytest.raises(RuntimeError, match=r"astra_old_parameter_table.*no column parameter_value_hash"):
            database.get_engine(url)
        # The documented upgrade, as psql would run it (its own begin; ... commit;).
        with old.execution_options(isolation_level="AUTOCOMMIT").connect() as connection:
            connection.exec_driver_sql(_documented_upgrade_sql())
        database.init_database(url)  # then `astra initdb`, as documented: the tables of this version
        database.configure(url)
        with session_scope() as session:
            pk = session.scalar(select(ParameterRow.pk).where(ParameterRow.parameter_name == "scale"))
            pks = get_or_create_parameters(session, [("scale", "2.0"), ("scale", "3.0")])
        assert pks[("scale", "2.0")] == pk and pks[("scale", "3.0")] != pk
        bundle = LineList(lines=(long_value(7), long_value(8)), scale=2.0)
        bundle.execute()
        assert bundle.summary()["completed"] == 2
    finally:
        old.dispose()
        database.configure(None)
        database.dispose_engines()


def test_an_old_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "old.db"
    old = create_engine(f"sqlite:///{path}")
    with old.begin() as connection:
        connection.exec_driver_sql(OLD_PARAMETER_TABLE.format(pk="INTEGER PRIMARY KEY").replace("astra.", ""))
    old.dispose()
    try:
        with pytest.raises(RuntimeError, match=r"old\.db.*no column parameter_value_hash.*Upgrading"):
            database.get_engine(f"sqlite:///{path}")
    finally:
        database.dispose_engines()


def test_rows_added_through_the_orm_get_their_hash(astra_db):
    with session_scope() as session:
        session.add(ParameterRow(parameter_name="orm", parameter_value='"added"'))
    with session_scope() as session:
        assert get_or_create_parameters(session, [("orm", '"added"')]) == {
            ("orm", '"added"'): session.scalar(
                select(ParameterRow.pk).where(ParameterRow.parameter_name == "orm")
            )
        }
        stored = session.scalar(
            select(ParameterRow.parameter_value_hash).where(ParameterRow.parameter_name == "orm")
        )
    assert stored == parameter_value_hash('"added"')
