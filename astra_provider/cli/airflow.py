"""``astra airflow-setup``: the Airflow connection of the astra database."""

from __future__ import annotations

import argparse
import sys

HELP = "create or update the Airflow connection astra_default from ASTRA_DATABASE_URL"
DESCRIPTION = (
    "Create or update the Airflow connection of the astra database (in Airflow's metadata database, for "
    "the AIRFLOW_HOME of this environment) from --database-url, else ASTRA_DATABASE_URL, else the embedded "
    "SQLite default; print it with the password hidden, and test it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conn-id", default="astra_default", help="connection id (default: astra_default)")
    parser.add_argument("--no-test", action="store_true", help="do not connect to test it")


def run(args: argparse.Namespace) -> int:
    """Run ``astra airflow-setup`` (after ``--database-url``, if given, has configured the astra database)."""
    return airflow_setup(args.database_url, args.conn_id, test=not args.no_test)


def airflow_setup(database_url: str | None, conn_id: str = "astra_default", test: bool = True) -> int:
    """Create or update the Airflow connection ``conn_id`` of the astra database and print it redacted.

    The URL is ``database_url``, else ``ASTRA_DATABASE_URL``, else the embedded SQLite default (said so).
    Needs Airflow's metadata database (``airflow db migrate``). With ``test``, connects once (``SELECT 1``).
    """
    import os

    from sqlalchemy import select

    from astra_provider.database import redact
    from astra_provider.hooks.astra import (
        AstraHook,
        connection_from_url,
        default_database_url,
        url_from_connection,
    )

    url, source = database_url, "--database-url"
    if not url:
        url, source = os.environ.get("ASTRA_DATABASE_URL"), "ASTRA_DATABASE_URL"
    if not url:
        url = default_database_url()
        source = "the embedded SQLite default (set ASTRA_DATABASE_URL for a PostgreSQL server)"
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    value = connection_from_url(url)
    if value.startswith("{"):
        new = Connection.from_json(value, conn_id=conn_id)
    else:  # SQLite: an astra connection (so that the connection form's Test button can test it)
        new = Connection(conn_id, conn_type="astra", schema=Connection(uri=value).schema)
    fields = ("conn_type", "host", "schema", "login", "password", "port", "extra")
    try:
        with create_session() as session:
            existing = session.scalar(select(Connection).where(Connection.conn_id == conn_id))
            if existing is None:
                session.add(new)
            for name in fields if existing is not None else ():
                setattr(existing, name, getattr(new, name))
    except Exception as error:  # e.g. no metadata database yet
        print(
            f"cannot store the connection {conn_id!r} in Airflow's metadata database: {error}",
            file=sys.stderr,
        )
        print("(run `airflow db migrate` with the same AIRFLOW_HOME first)", file=sys.stderr)
        return 1
    action = "Created" if existing is None else "Updated"
    print(f"{action} the Airflow connection {conn_id!r} (type {new.conn_type}) from {source}: {redact(url)}")
    if os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}"):
        print(f"note: AIRFLOW_CONN_{conn_id.upper()} is set in this environment and takes precedence")
    if not test:
        return 0
    ok, message = AstraHook.check_database(url_from_connection(new))
    print(f"{'Connection test OK' if ok else 'Connection test FAILED'}: {message}")
    return 0 if ok else 1
