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
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    event,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column

from astra_provider.database import SCHEMA
from astra_provider.utils import parse_json

# BIGINT keys on PostgreSQL; SQLite only auto-increments INTEGER PRIMARY KEY columns.
PrimaryKey = BigInteger().with_variant(Integer(), "sqlite")
JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


VERSION_PARAMETERS = ("astra_version_major", "astra_version_minor")
"""Parameters that every task carries, from the astra-provider version that ran it (provenance).

Their values are rows of ``astra.parameter``, recorded once per value and tied to the version by
``astra.version_parameter``; the view ``astra.task_parameter`` shows them with each task's own parameters,
so SQL on the parameter tables lists them for every task, without a row per task (see
:class:`TaskParameter`). They are not part of ``task_id`` and not arguments of any task class (see
``docs/database.md``, *Versions and identity*).
"""


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


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)
    type_annotation_map = {dict[str, Any]: JSONType, Any: JSONType}


def _fk(column: str, ondelete: str = "CASCADE") -> ForeignKey:
    return ForeignKey(f"{SCHEMA}.{column}", ondelete=ondelete)


class OutputInterface(Base):
    """A key shared by all result tables, so that every result has a globally unique ``output_pk``."""

    __tablename__ = "output_interface"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    table_name: Mapped[str] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now()
    )


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
    created: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now()
    )
    renewed: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now()
    )
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
    created: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now()
    )
    modified: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now()
    )
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

    def _data_products(self, junction: type[Base]) -> list[DataProduct]:
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
    """An astronomical source (star); data products are linked to it through ``source_data_product``."""

    __tablename__ = "source"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    catalogid: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    obj: Mapped[str | None] = mapped_column(Text, unique=True)
    ra: Mapped[float | None] = mapped_column(Float)
    dec: Mapped[float | None] = mapped_column(Float)


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
    created: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now()
    )

    @property
    def identity(self) -> str:
        """A string that identifies this product in any database (used in task identity hashes)."""
        return f"{self.release}/{self.filetype}/{self.kwargs_hash}"

    def __repr__(self) -> str:
        return f"<DataProduct pk={self.pk} {self.filetype} {self.path}>"


class SourceDataProduct(Base):
    __tablename__ = "source_data_product"
    __table_args__ = (UniqueConstraint("source_pk", "data_product_pk"),)

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    source_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("source.pk"), index=True)
    data_product_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("data_product.pk"), index=True)


class TaskInputDataProduct(Base):
    __tablename__ = "task_input_data_product"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    task_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("task.pk"), index=True)
    data_product_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("data_product.pk"), index=True)


class TaskOutputDataProduct(Base):
    __tablename__ = "task_output_data_product"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    task_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("task.pk"), index=True)
    data_product_pk: Mapped[int] = mapped_column(PrimaryKey, _fk("data_product.pk"), index=True)


class Bundle(Base):
    """The context in which a group of tasks sharing bundled parameters was executed together."""

    __tablename__ = "bundle"

    pk: Mapped[int] = mapped_column(PrimaryKey, primary_key=True)
    task_module: Mapped[str] = mapped_column(Text)
    task_name: Mapped[str] = mapped_column(Text)
    bundled_parameters: Mapped[dict[str, Any]] = mapped_column(JSONType)
    n_tasks: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now()
    )
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


class OutputMixin:
    """Columns every result table has: its ``output_interface`` key, the task and the data product.

    Declare a result table once::

        class RandomNumberGenerator(OutputMixin, Base):
            __tablename__ = "random_number_generator"
            samples: Mapped[list[float]] = mapped_column(JSONType)

    and write rows from a task with :meth:`astra_provider.base.TaskInstance.add_result`.
    """

    @declared_attr
    def output_pk(cls) -> Mapped[int]:
        return mapped_column(PrimaryKey, _fk("output_interface.pk", ondelete="RESTRICT"), primary_key=True)

    @declared_attr
    def task_pk(cls) -> Mapped[int]:
        return mapped_column(PrimaryKey, _fk("task.pk"), index=True)

    @declared_attr
    def data_product_pk(cls) -> Mapped[int | None]:
        return mapped_column(PrimaryKey, _fk("data_product.pk", ondelete="SET NULL"), index=True)


# Result tables -----------------------------------------------------------------------------------------


class RandomNumberGenerator(OutputMixin, Base):
    """The user's guide example result table (``astra_provider.contrib.examples``)."""

    __tablename__ = "random_number_generator"

    samples: Mapped[list[float]] = mapped_column(JSON().with_variant(JSONB(), "postgresql"))


class Continuum(OutputMixin, Base):
    """Sinusoidal pseudo-continuum fits; the normalised spectra are output data products."""

    __tablename__ = "continuum"

    row_index: Mapped[int] = mapped_column(Integer, default=0)
    snr: Mapped[float | None] = mapped_column(Float)
    n_continuum_pixels: Mapped[int | None] = mapped_column(Integer)
    rms_residual: Mapped[float | None] = mapped_column(Float)
    bitmask_flag: Mapped[int] = mapped_column(Integer, default=0)


class Doppler(OutputMixin, Base):
    """Radial velocity (and template labels) of one visit spectrum.

    One row per visit: an apVisit or BOSS file gives one (``row_index`` 0), an apStar file one per visit row
    (``row_index`` is the row of the file). ``vhelio = vrel + bc`` always; for BOSS, whose wavelengths are
    already heliocentric, ``bc = −HELIO_RV``. ``template_grid`` names the grid of the reported fit,
    ``model_mismatch`` the model error its χ² implies (fraction of the continuum), and ``bitmask_flag`` holds
    :class:`astra_provider.science.doppler.RVFlag` bits.
    """

    __tablename__ = "doppler"

    row_index: Mapped[int] = mapped_column(Integer, default=0)
    vhelio: Mapped[float | None] = mapped_column(Float)
    vrel: Mapped[float | None] = mapped_column(Float)
    u_vrel: Mapped[float | None] = mapped_column(Float)
    bc: Mapped[float | None] = mapped_column(Float)
    teff: Mapped[float | None] = mapped_column(Float)
    u_teff: Mapped[float | None] = mapped_column(Float)
    logg: Mapped[float | None] = mapped_column(Float)
    u_logg: Mapped[float | None] = mapped_column(Float)
    fe_h: Mapped[float | None] = mapped_column(Float)
    u_fe_h: Mapped[float | None] = mapped_column(Float)
    chisq: Mapped[float | None] = mapped_column(Float)
    ccf_peak: Mapped[float | None] = mapped_column(Float)
    model_mismatch: Mapped[float | None] = mapped_column(Float)
    template_grid: Mapped[str | None] = mapped_column(Text)
    snr: Mapped[float | None] = mapped_column(Float)
    bitmask_flag: Mapped[int] = mapped_column(Integer, default=0)


class TheCannon(OutputMixin, Base):
    """Labels from The Cannon for one spectrum (3-label model: teff, logg, fe_h).

    Models with other label sets store all labels in ``labels`` (JSON: name -> value, ``e_<name>``,
    ``rho_<a>_<b>``); the named columns are filled for the labels they name.
    """

    __tablename__ = "thecannon"

    row_index: Mapped[int] = mapped_column(Integer, default=0)
    snr: Mapped[float | None] = mapped_column(Float)
    teff: Mapped[float | None] = mapped_column(Float)
    e_teff: Mapped[float | None] = mapped_column(Float)
    logg: Mapped[float | None] = mapped_column(Float)
    e_logg: Mapped[float | None] = mapped_column(Float)
    fe_h: Mapped[float | None] = mapped_column(Float)
    e_fe_h: Mapped[float | None] = mapped_column(Float)
    rho_teff_logg: Mapped[float | None] = mapped_column(Float)
    rho_teff_fe_h: Mapped[float | None] = mapped_column(Float)
    rho_logg_fe_h: Mapped[float | None] = mapped_column(Float)
    chi_sq: Mapped[float | None] = mapped_column(Float)
    reduced_chi_sq: Mapped[float | None] = mapped_column(Float)
    bitmask_flag: Mapped[int] = mapped_column(Integer, default=0)
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class ThePayne(OutputMixin, Base):
    """Labels from The Payne for one spectrum (3-label model: teff, logg, fe_h).

    Like :class:`TheCannon`: models with other label sets store all labels in ``labels`` (JSON: name ->
    value, ``e_<name>``, ``rho_<a>_<b>``, fit statistics); the named columns are filled for the labels they
    name. ``bitmask_flag`` holds :class:`~astra_provider.science.payne.PayneFlag` bits.
    """

    __tablename__ = "thepayne"

    row_index: Mapped[int] = mapped_column(Integer, default=0)
    snr: Mapped[float | None] = mapped_column(Float)
    teff: Mapped[float | None] = mapped_column(Float)
    e_teff: Mapped[float | None] = mapped_column(Float)
    logg: Mapped[float | None] = mapped_column(Float)
    e_logg: Mapped[float | None] = mapped_column(Float)
    fe_h: Mapped[float | None] = mapped_column(Float)
    e_fe_h: Mapped[float | None] = mapped_column(Float)
    rho_teff_logg: Mapped[float | None] = mapped_column(Float)
    rho_teff_fe_h: Mapped[float | None] = mapped_column(Float)
    rho_logg_fe_h: Mapped[float | None] = mapped_column(Float)
    chi_sq: Mapped[float | None] = mapped_column(Float)
    reduced_chi_sq: Mapped[float | None] = mapped_column(Float)
    bitmask_flag: Mapped[int] = mapped_column(Integer, default=0)
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


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
    "version_parameters",
]
