"""SQLAlchemy 2 models of the astra database (schema ``astra``).

Provenance tables: ``task``, ``parameter`` and the ``task_parameter_link`` junction (read through the view
``task_parameter``, which adds each task's version parameters from ``version_parameter``), ``data_product``
with the ``task_input_data_product`` / ``task_output_data_product`` junctions, ``bundle`` (a task's bundle is
its ``bundle_pk``), ``lease`` (the processes running tasks), ``source`` and ``source_data_product``, and
``output_interface``, which gives every result row a key that is unique across all result tables. Result
tables (``doppler``, ``thecannon``, ``thepayne``, ...) use :class:`OutputMixin`.

``schema/astradb.sql`` is generated from these models and the view of
:mod:`astra_provider.database.schema` (``astra schema``), and a test keeps the two equal.
"""

from __future__ import annotations

import enum
import hashlib
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    Index,
    Integer,
    SmallInteger,
    Text,
    UniqueConstraint,
    event,
    func,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from astra_provider.database.declarative import Base, JSONType, PrimaryKey, utcnow
from astra_provider.database.declarative import foreign_key as _fk
from astra_provider.utils import parse_json

VERSION_PARAMETERS = ("astra_version_major", "astra_version_minor")
"""Parameters that every task carries, from the astra-provider version that ran it (provenance).

Their values are rows of ``astra.parameter``, recorded once per value and tied to the version by
``astra.version_parameter``; the view ``astra.task_parameter`` shows them with each task's own parameters,
so SQL on the parameter tables lists them for every task, without a row per task (see
:class:`TaskParameter`). They are not part of ``task_id`` and not arguments of any task class (see
``docs/database.md``, *Versions and identity*).
"""


def _timestamp() -> Mapped[datetime]:
    """A time stamp column set to the time of the insert (by the client, or else by the database)."""
    return mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())


def version_parameters(version: str) -> dict[str, int]:
    """``{"astra_version_major": 0, "astra_version_minor": 1}`` for version ``"0.1.0"``."""
    major, minor = (version.split(".") + ["0", "0"])[:2]
    return {VERSION_PARAMETERS[0]: _leading_int(major), VERSION_PARAMETERS[1]: _leading_int(minor)}


def _leading_int(text: str) -> int:
    digits = ""
    for character in text:
        if not character.isdigit():
            break
        digits += character
    return int(digits or 0)


class Status(enum.IntEnum):
    """``task.status_code`` values."""

    CREATED = 0
    RUNNING = 1
    COMPLETED = 2
    FAILED = 3


class OutputInterface(Base):
    """A key shared by all result tables, so that every result has a globally unique ``output_pk``."""

    __tablename__ = "output_interface"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    table_name: Mapped[str] = mapped_column(Text)
    created: Mapped[datetime] = _timestamp()


class Lease(Base):
    """A process that executes tasks: its owner (host, pid, a random id) and how long its claims hold.

    A running task belongs to the lease of the process that claimed it (``task.lease_pk``). The process
    renews ``expires`` (a heartbeat) while it runs tasks; once ``expires`` has passed, or the process is
    known to be dead (same host, no such pid), its running tasks are *stale*: another run takes them over
    and ``astra recover`` marks them failed (:mod:`astra_provider.database.leases`).
    """

    __tablename__ = "lease"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    owner: Mapped[str] = mapped_column(Text)
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = _timestamp()
    renewed: Mapped[datetime] = _timestamp()
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    def __repr__(self) -> str:
        return f"<Lease pk={self.pk} {self.owner} expires={self.expires}>"


class Task(Base):
    """One executed (or executing) task: its identity, status, timings, version and error.

    A row records one execution: executing a task again (``force=True``, a failed task, a new version)
    inserts a new row, so a row belongs to at most one bundle, ``bundle_pk`` (NULL for a task executed
    alone).

    **Claims.** ``claim`` is 1 on the one row that holds the claim on its ``(task_id, version)``: the row
    being executed (``RUNNING``, owned by the lease ``lease_pk``) or the row that completed it. It is NULL
    on failed rows, on rows taken over after their lease expired, and on rows of forced runs. The unique
    index on ``(task_id, version, claim)`` lets only one row hold a claim (NULLs are distinct), so two
    overlapping runs cannot both execute or complete the same task; the same index serves skip-if-done's
    look-ups by ``task_id`` (one index to fill per inserted task, not two).
    """

    __tablename__ = "task"
    __table_args__ = (Index("ux_task_claim", "task_id", "version", "claim", unique=True),)

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    task_module: Mapped[str] = mapped_column(Text)
    task_name: Mapped[str] = mapped_column(Text)
    task_id: Mapped[str] = mapped_column(Text)
    version: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int] = mapped_column(SmallInteger, default=Status.CREATED, server_default="0")
    created: Mapped[datetime] = _timestamp()
    modified: Mapped[datetime] = _timestamp()
    duration: Mapped[float | None] = mapped_column(Float)
    time_pre_execute: Mapped[float | None] = mapped_column(Float)
    time_execute: Mapped[float | None] = mapped_column(Float)
    time_post_execute: Mapped[float | None] = mapped_column(Float)
    time_bundle_overhead: Mapped[float | None] = mapped_column(Float)
    error_stage: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    error_traceback: Mapped[str | None] = mapped_column(Text)
    result: Mapped[Any | None] = mapped_column(JSONType)
    output_pk: Mapped[int | None] = mapped_column(
        PrimaryKey, _fk("output_interface.pk", ondelete="SET NULL"), index=True
    )
    bundle_pk: Mapped[int | None] = mapped_column(
        PrimaryKey, _fk("bundle.pk", ondelete="SET NULL"), index=True
    )
    claim: Mapped[int | None] = mapped_column(SmallInteger)
    lease_pk: Mapped[int | None] = mapped_column(PrimaryKey, _fk("lease.pk", ondelete="SET NULL"))

    @property
    def status(self) -> Status:
        return Status(self.status_code)

    @property
    def parameters(self) -> dict[str, Any]:
        """All parameters of the task class (defaults included), decoded from the ``parameter`` table.

        These rebuild the task (:meth:`~astra_provider.base.TaskInstance.from_task`). The version parameters
        every task carries (:data:`VERSION_PARAMETERS`) are in :attr:`version_parameters`.
        """
        cached = self.__dict__.get("_parameters")
        if cached is None:
            cached = self._recorded_parameters()
            self.__dict__["_parameters"] = cached
        return cached

    @property
    def version_parameters(self) -> dict[str, int]:
        """``astra_version_major`` and ``astra_version_minor`` of the version that ran the task."""
        from astra_provider.database import session_scope

        with session_scope() as session:
            rows = session.execute(
                select(Parameter.parameter_name, Parameter.parameter_value)
                .join(VersionParameter, VersionParameter.parameter_pk == Parameter.pk)
                .where(VersionParameter.version == self.version)
            ).all()
        return {name: parse_json(value) for name, value in sorted(rows)}

    def _recorded_parameters(self) -> dict[str, Any]:
        from astra_provider.database import session_scope

        with session_scope() as session:
            rows = session.execute(
                select(Parameter.parameter_name, Parameter.parameter_value)
                .join(TaskParameter, TaskParameter.parameter_pk == Parameter.pk)
                .where(TaskParameter.task_pk == self.pk)
            ).all()
        return {name: parse_json(value) for name, value in rows}

    @property
    def input_data_products(self) -> list[DataProduct]:
        """The task's input data products, in the order they were given."""
        return self._data_products(TaskInputDataProduct)

    @property
    def output_data_products(self) -> list[DataProduct]:
        return self._data_products(TaskOutputDataProduct)

    def _data_products(
        self, junction: type[TaskInputDataProduct] | type[TaskOutputDataProduct]
    ) -> list[DataProduct]:
        from astra_provider.database import session_scope

        with session_scope() as session:
            return list(
                session.scalars(
                    select(DataProduct)
                    .join(junction, junction.data_product_pk == DataProduct.pk)
                    .where(junction.task_pk == self.pk)
                    .order_by(junction.pk)
                )
            )

    @classmethod
    def get_by_id(cls, pk: int) -> Task:
        """The task with primary key ``pk`` (``LookupError`` if there is none)."""
        from astra_provider.database import session_scope

        with session_scope() as session:
            task = session.get(cls, pk)
        if task is None:
            raise LookupError(f"no task with pk={pk} in the astra database")
        return task

    def __repr__(self) -> str:
        return f"<Task pk={self.pk} {self.task_name} {self.task_id} status={self.status.name}>"


def parameter_value_hash(value: str) -> str:
    """The key of a parameter value in ``astra.parameter``: the hex SHA-256 of its canonical JSON text.

    The same as PostgreSQL's ``encode(sha256(convert_to(parameter_value, 'UTF8')), 'hex')``.
    """
    return hashlib.sha256(value.encode()).hexdigest()


class Parameter(Base):
    """A unique (name, JSON-encoded value) pair, unique by name and :func:`parameter_value_hash`.

    A value can be long (a list of wavelengths, a line list). PostgreSQL's btree indexes refuse an entry over
    2,704 bytes, so the unique key holds the SHA-256 of the value, never the value itself.
    """

    __tablename__ = "parameter"
    __table_args__ = (UniqueConstraint("parameter_name", "parameter_value_hash"),)

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    parameter_name: Mapped[str] = mapped_column(Text)
    parameter_value: Mapped[str] = mapped_column(Text)
    parameter_value_hash: Mapped[str] = mapped_column(Text)


@event.listens_for(Parameter, "before_insert")
def _fill_parameter_value_hash(_mapper: Any, _connection: Any, row: Parameter) -> None:
    """Rows added through the ORM get their hash (the bulk recording writes it itself)."""
    if row.parameter_value_hash is None:
        row.parameter_value_hash = parameter_value_hash(row.parameter_value)


class TaskParameter(Base):
    """A task's own parameter: the junction of ``task`` and ``parameter`` (table ``task_parameter_link``).

    SQL reads the view ``astra.task_parameter``: these rows, and one row per version parameter of each task
    (from ``version_parameter`` and ``task.version``; ``pk`` NULL), as in the user's guide. Only this table
    is written.
    """

    __tablename__ = "task_parameter_link"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    task_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("task.pk"), index=True)
    parameter_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("parameter.pk"), index=True)


class VersionParameter(Base):
    """The values of the version parameters of an astra-provider version: recorded once per version."""

    __tablename__ = "version_parameter"

    version: Mapped[str] = mapped_column(Text, primary_key=True)
    parameter_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("parameter.pk"), primary_key=True)


class Source(Base):
    """An astronomical source (a star), found from the identifiers in the headers of its data products.

    Any of ``sdss_id``, ``catalogid``, ``obj`` (the APOGEE object id: a 2MASS designation ``2M...``) and
    ``thing_id`` (an SDSS-III/IV photometric object) identifies it; each is unique. Data products are linked
    to it through ``source_data_product`` (:mod:`astra_provider.sources`).
    """

    __tablename__ = "source"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    sdss_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    catalogid: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    obj: Mapped[str | None] = mapped_column(Text, unique=True)
    thing_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    ra: Mapped[float | None] = mapped_column(Float)
    dec: Mapped[float | None] = mapped_column(Float)
    created: Mapped[datetime] = _timestamp()

    def __repr__(self) -> str:
        names = ("sdss_id", "catalogid", "obj", "thing_id")
        ids = " ".join(f"{name}={getattr(self, name)}" for name in names if getattr(self, name) is not None)
        return f"<Source pk={self.pk} {ids}>"


class DataProduct(Base):
    """A file: an SDSS data product (release, filetype, keywords) or any file (filetype ``full``)."""

    __tablename__ = "data_product"
    # kwargs_hash first: the unique index also serves lookups by kwargs_hash alone (no second index).
    __table_args__ = (UniqueConstraint("kwargs_hash", "release", "filetype"),)

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    release: Mapped[str] = mapped_column(Text, default="", server_default="")
    filetype: Mapped[str] = mapped_column(Text)
    kwargs: Mapped[dict[str, Any]] = mapped_column(JSONType)
    kwargs_hash: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    created: Mapped[datetime] = _timestamp()

    @property
    def identity(self) -> str:
        """A string that identifies this product in any database (used in task identity hashes)."""
        return f"{self.release}/{self.filetype}/{self.kwargs_hash}"

    def __repr__(self) -> str:
        return f"<DataProduct pk={self.pk} {self.filetype} {self.path}>"


class SourceDataProduct(Base):
    """The source a data product observes: at most one per data product (the unique key)."""

    __tablename__ = "source_data_product"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    source_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("source.pk"), index=True)
    data_product_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("data_product.pk"), unique=True)


class _TaskDataProductLink:
    """The columns of the task <-> data product junctions: a task and one of its inputs or outputs."""

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    task_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("task.pk"), index=True)
    data_product_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("data_product.pk"), index=True)


class TaskInputDataProduct(_TaskDataProductLink, Base):
    """A data product that a task read."""

    __tablename__ = "task_input_data_product"


class TaskOutputDataProduct(_TaskDataProductLink, Base):
    """A data product that a task wrote."""

    __tablename__ = "task_output_data_product"


class Bundle(Base):
    """The context in which a group of tasks sharing bundled parameters was executed together."""

    __tablename__ = "bundle"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    task_module: Mapped[str] = mapped_column(Text)
    task_name: Mapped[str] = mapped_column(Text)
    bundled_parameters: Mapped[dict[str, Any]] = mapped_column(JSONType)
    n_tasks: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = _timestamp()
    time_pre_execute: Mapped[float | None] = mapped_column(Float)
    time_execute: Mapped[float | None] = mapped_column(Float)
    time_post_execute: Mapped[float | None] = mapped_column(Float)
    time_pre_execute_overhead: Mapped[float | None] = mapped_column(Float)
    time_execute_overhead: Mapped[float | None] = mapped_column(Float)
    time_post_execute_overhead: Mapped[float | None] = mapped_column(Float)

    @property
    def tasks(self) -> list[Task]:
        from astra_provider.database import session_scope

        with session_scope() as session:
            return list(session.scalars(select(Task).where(Task.bundle_pk == self.pk).order_by(Task.pk)))


# The result tables are declared in their own module, and imported from here (the user's API).
from astra_provider.database.results import (  # noqa: E402
    Continuum,
    Doppler,
    OutputMixin,
    RandomNumberGenerator,
    TheCannon,
    ThePayne,
    result_column,
)

__all__ = [
    "Base",
    "Bundle",
    "Continuum",
    "DataProduct",
    "Doppler",
    "JSONType",
    "Lease",
    "OutputInterface",
    "OutputMixin",
    "Parameter",
    "RandomNumberGenerator",
    "Source",
    "SourceDataProduct",
    "Status",
    "Task",
    "TaskInputDataProduct",
    "TaskOutputDataProduct",
    "TaskParameter",
    "TheCannon",
    "ThePayne",
    "VERSION_PARAMETERS",
    "VersionParameter",
    "parameter_value_hash",
    "result_column",
    "version_parameters",
]
