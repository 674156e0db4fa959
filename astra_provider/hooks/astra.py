"""The Airflow hook to the astra database (connection type ``astra``, default connection ``astra_default``).

The astra database is the provenance and results database of the astra tasks; it is never Airflow's
metadata database. Credentials live in the Airflow connection (or in ``ASTRA_DATABASE_URL``), never in DAG
files::

    export AIRFLOW_CONN_ASTRA_DEFAULT='postgresql://astra:secret@db.example.org:5432/astra'
    # or, as JSON, with the connection type of this provider:
    export AIRFLOW_CONN_ASTRA_DEFAULT='{"conn_type": "astra", "host": "db.example.org", "port": 5432,
                                       "schema": "astra", "login": "astra", "password": "secret"}'

The connection's *schema* field is the database name. Connection types ``astra``, ``postgres`` and
``postgresql`` give a PostgreSQL URL (driver ``psycopg2`` unless ``extra`` has ``"driver"``; other ``extra``
keys become URL query parameters, e.g. ``sslmode``); type ``sqlite`` gives an SQLite file (the path is the
schema or host field: ``sqlite:////abs/path/astra.db``), as does type ``astra`` with no host and an absolute
path as the schema (the form ``astra airflow-setup`` writes, which the connection form can test). When
the connection does not exist, the hook uses ``ASTRA_DATABASE_URL``, then the embedded SQLite default under
``$ASTRA_HOME`` (with a warning naming it; ``astra airflow-setup`` creates the connection).

The hook also registers new files as data products (:meth:`AstraHook.claim_data_products`, for the data
product sensor and the asset-event operator), confined to the watched data root; the functions behind it
are in :mod:`astra_provider.hooks.data_products`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from astra_provider.database import redact
from astra_provider.hooks.data_products import claim_data_products, registered_data_products

if TYPE_CHECKING:
    from airflow.sdk import Connection
    from sqlalchemy import Select
    from sqlalchemy.orm import Session

    from astra_provider.database.astradb import DataProduct, TaskInputDataProduct, TaskOutputDataProduct

POSTGRES_TYPES = ("astra", "postgres", "postgresql")


def url_from_connection(conn: Connection) -> str:
    """The SQLAlchemy URL of the astra database described by an Airflow connection."""
    from sqlalchemy.engine import URL

    conn_type = (conn.conn_type or "astra").lower()
    extra = dict(conn.extra_dejson or {})
    if conn_type == "astra" and not conn.host and (conn.schema or "").startswith("/"):
        conn_type = "sqlite"  # an astra connection to an SQLite file: the path in the schema field
    if conn_type == "sqlite":
        path = conn.schema or conn.host
        if not path or not os.path.isabs(path):
            raise ValueError(
                f"connection {conn.conn_id!r}: an SQLite astra database needs an absolute file path "
                f"(sqlite:////abs/path/astra.db), got {path!r}"
            )
        return f"sqlite:///{path}"
    if conn_type not in POSTGRES_TYPES:
        raise ValueError(
            f"connection {conn.conn_id!r} has type {conn_type!r}; the astra database needs a connection of "
            f"type {', '.join(POSTGRES_TYPES)} or sqlite"
        )
    if not conn.schema:
        raise ValueError(f"connection {conn.conn_id!r}: set its schema field to the astra database name")
    driver = str(extra.pop("driver", "psycopg2"))
    url = URL.create(
        f"postgresql+{driver}" if driver else "postgresql",
        username=conn.login or None,
        password=conn.password or None,
        host=conn.host or None,
        port=int(conn.port) if conn.port else None,
        database=conn.schema,
        query={str(key): str(value) for key, value in extra.items()},
    )
    return url.render_as_string(hide_password=False)


def connection_from_url(url: str) -> str:
    """An ``AIRFLOW_CONN_<ID>`` value for an astra database URL (the inverse of :func:`url_from_connection`).

    SQLite gives a ``sqlite:////abs/path`` URI; PostgreSQL a JSON connection of type ``astra`` (driver and
    query options in its ``extra``).
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database is None:  # sqlite:// (in memory) names no file
            raise ValueError(f"{url!r} is an in-memory SQLite database: an Airflow connection needs a file")
        return f"sqlite:///{os.path.abspath(parsed.database)}"
    driver = parsed.drivername.partition("+")[2]  # none given: the hook's default (psycopg2)
    extra = {"driver": driver} if driver and driver != "psycopg2" else {}
    extra.update({key: value for key, value in parsed.query.items() if isinstance(value, str)})
    return json.dumps(
        {
            "conn_type": "astra",
            "host": parsed.host,
            "port": parsed.port,
            "login": parsed.username,
            "password": parsed.password,
            "schema": parsed.database,
            "extra": extra,
        }
    )


def default_database_url() -> str:
    """The astra database used without a connection: ``ASTRA_DATABASE_URL``, else the embedded SQLite."""
    from astra_provider.database import astra_home

    return os.environ.get("ASTRA_DATABASE_URL") or f"sqlite:///{astra_home() / 'astra.db'}"


class AstraHook(BaseHook):
    """Sessions on the astra database described by an Airflow connection.

    :param astra_conn_id: the Airflow connection of the astra database (type ``astra``, a PostgreSQL URI,
        or ``sqlite``); when it does not exist, ``ASTRA_DATABASE_URL`` then the embedded default are used
        (with a warning naming the embedded SQLite file). ``None`` uses the process's database
        (:func:`astra_provider.database.get_database_url`), without looking for a connection.
    """

    conn_name_attr = "astra_conn_id"
    default_conn_name = "astra_default"
    conn_type = "astra"
    hook_name = "Astra database"

    def __init__(self, astra_conn_id: str | None = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.astra_conn_id = astra_conn_id
        self._url: str | None = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Connection form: the schema field is the database name."""
        return {
            "hidden_fields": [],
            "relabeling": {"schema": "Database"},
            "placeholders": {"host": "localhost", "schema": "astra", "port": "5432"},
        }

    def get_database_url(self) -> str:
        """The SQLAlchemy URL of the astra database (contains the password: do not log it)."""
        if self._url is None:
            if self.astra_conn_id is None:
                from astra_provider.database import get_database_url

                return get_database_url()
            try:
                conn = self.get_connection(self.astra_conn_id)
            except AirflowNotFoundException:
                self._url = default_database_url()
                self._log_fallback(self._url)
            else:
                self._url = url_from_connection(conn)
        return self._url

    def _log_fallback(self, url: str) -> None:
        if os.environ.get("ASTRA_DATABASE_URL"):
            self.log.info(
                "No Airflow connection %r; using ASTRA_DATABASE_URL: %s", self.astra_conn_id, redact(url)
            )
            return
        self.log.warning(
            "No Airflow connection %r and no ASTRA_DATABASE_URL: falling back to the embedded SQLite "
            "database %s. Create the connection with `astra airflow-setup` (from ASTRA_DATABASE_URL).",
            self.astra_conn_id,
            redact(url),
        )

    def configure(self) -> str:
        """Make this database the astra database of the process (what task classes write to).

        :returns: the database URL.
        """
        from astra_provider import database

        url = self.get_database_url()
        database.configure(url)
        self.log.info("Astra database: %s", redact(url))
        return url

    def get_engine(self) -> Any:
        """The SQLAlchemy engine (its schema is checked, read-only, on first use; see ``astra initdb``)."""
        from astra_provider.database import get_engine

        return get_engine(self.get_database_url())

    def get_session(self) -> Session:
        """A new session on the astra database; the caller commits and closes it."""
        from sqlalchemy.orm import Session

        return Session(self.get_engine(), expire_on_commit=False)

    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        from astra_provider.database import session_scope

        with session_scope(self.get_database_url()) as session:
            yield session

    def test_connection(self) -> tuple[bool, str]:
        """Connect and run ``SELECT 1``: the *Test* button of the connection form.

        The connection must exist (no fallback to the embedded database), and nothing is created in the
        database. Airflow shows the button when ``[core] test_connection`` is ``Enabled``.
        """
        if self.astra_conn_id is None:
            return False, "no Airflow connection to test (astra_conn_id is None)"
        try:
            url = url_from_connection(self.get_connection(self.astra_conn_id))
        except Exception as error:
            return False, f"{type(error).__name__}: {error}"
        return self.check_database(url)

    @staticmethod
    def check_database(url: str) -> tuple[bool, str]:
        """``(True, "Connected to <url, password hidden> (<server>)")`` if ``SELECT 1`` runs on ``url``,
        else ``(False, <error>)``; no table is created."""
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        try:
            engine = create_engine(url, poolclass=NullPool)
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                    version = ".".join(map(str, engine.dialect.server_version_info or ()))
            finally:
                engine.dispose()
        except Exception as error:
            return False, f"{type(error).__name__}: {error}"
        return True, f"Connected to {redact(url)} ({' '.join(filter(None, [engine.dialect.name, version]))})"

    # Data products -------------------------------------------------------------------------------------

    def claim_data_products(
        self,
        paths: Sequence[str],
        *,
        root: str | os.PathLike[str] | None = None,
        max_new: int | None = None,
    ) -> tuple[list[DataProduct], int]:
        """Register new files as data products; see :func:`claim_data_products` (``root`` confines)."""
        return claim_data_products(
            paths, database_url=self.get_database_url(), max_new=max_new, root=root, logger=self.log
        )

    def registered_data_products(
        self, paths: Sequence[str], *, root: str | os.PathLike[str] | None = None
    ) -> list[DataProduct]:
        """The rows already registered for ``paths``; see :func:`registered_data_products`."""
        return registered_data_products(
            paths, database_url=self.get_database_url(), root=root, logger=self.log
        )

    # Provenance look-ups used by the operators -------------------------------------------------------

    def _grouped_by_task(
        self,
        task_pks: Iterable[int],
        junction: type[TaskInputDataProduct] | type[TaskOutputDataProduct],
        pairs: Select,
    ) -> dict[int, list[Any]]:
        """Run ``pairs`` (a query of ``(junction.task_pk, value)`` rows) over chunks of ``task_pks``; group
        the values by task, in the order of the junction's rows (tasks without rows are absent)."""
        from astra_provider.database.recording import chunked

        grouped: dict[int, list[Any]] = {}
        with self.session_scope() as session:
            for chunk in chunked(sorted(set(task_pks))):
                query = pairs.where(junction.task_pk.in_(chunk)).order_by(junction.task_pk, junction.pk)
                for task_pk, value in session.execute(query):
                    grouped.setdefault(task_pk, []).append(value)
        return grouped

    def output_data_product_pks(self, task_pks: Iterable[int]) -> dict[int, list[int]]:
        """The output data product pks of each task (tasks without outputs are absent)."""
        from sqlalchemy import select

        from astra_provider.database.astradb import TaskOutputDataProduct as junction

        return self._grouped_by_task(task_pks, junction, select(junction.task_pk, junction.data_product_pk))

    def data_product_pks_by_filetype(
        self, data_product_pks: Iterable[int], filetypes: Iterable[str]
    ) -> list[int]:
        """The pks, in the given order, of the data products whose filetype is one of ``filetypes``.

        A product registered as a plain file (filetype ``full``) counts as the SDSS filetype its path matches.
        """
        from sqlalchemy import select

        from astra_provider.database.astradb import DataProduct
        from astra_provider.database.recording import chunked
        from astra_provider.sdss.paths import canonical_filetype, parse_path

        def canonical(name: str) -> str:
            try:
                return canonical_filetype(name)
            except (KeyError, ValueError):
                return name

        pks = list(data_product_pks)
        wanted = {canonical(name) for name in filetypes}
        keep: set[int] = set()
        with self.session_scope() as session:
            for chunk in chunked(sorted(set(pks))):
                rows = session.execute(
                    select(DataProduct.pk, DataProduct.filetype, DataProduct.path).where(
                        DataProduct.pk.in_(chunk)
                    )
                )
                for pk, filetype, path in rows:
                    if filetype == "full" and "full" not in wanted:
                        parsed = parse_path(path)
                        filetype = parsed[0] if parsed else filetype
                    if filetype in wanted:
                        keep.add(pk)
        return [pk for pk in pks if pk in keep]

    def input_data_product_paths(self, task_pks: Iterable[int]) -> dict[int, list[str]]:
        """The paths of the input data products of each task (for logs)."""
        from sqlalchemy import select

        from astra_provider.database.astradb import DataProduct
        from astra_provider.database.astradb import TaskInputDataProduct as junction

        paths = select(junction.task_pk, DataProduct.path).join(
            DataProduct, DataProduct.pk == junction.data_product_pk
        )
        return self._grouped_by_task(task_pks, junction, paths)
