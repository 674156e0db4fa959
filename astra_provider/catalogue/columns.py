"""The columns of a summary catalogue: the source's identifiers, the data product, the task, its parameters,
the result columns and the flags, each with a type, a unit and a description.

Units and descriptions of result columns come from the result models (``column.info``, see
:func:`astra_provider.database.astradb.result_column`); those of the other columns are defined here, once.
A column is either an SQL expression (selected, and usable in ``--where`` filters), a parameter of the task
(the pk of its value is selected, and decoded here), or a flag bit of ``bitmask_flag`` (computed from it).
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from sqlalchemy import JSON, BigInteger, Boolean, Float, Integer, SmallInteger, Text, cast, func, select
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.elements import ColumnElement

from astra_provider.database.astradb import DataProduct, OutputMixin, Parameter, Source, Task, TaskParameter
from astra_provider.sdss.paths import FILETYPES

__all__ = [
    "NULL_INT",
    "CatalogueColumn",
    "ParameterValues",
    "catalogue_columns",
    "flag_bits",
    "json_value_kind",
]

NULL_INT = -(2**63)
"""Stands for a missing integer (``TNULL`` in FITS; masked in astropy)."""

INT, FLOAT, BOOL, STR = "int", "float", "bool", "str"

SQLExpression: TypeAlias = ColumnElement[Any] | QueryableAttribute[Any]
"""A column expression of a catalogue: a Core expression or a mapped attribute (``Task.pk``)."""


@dataclass(frozen=True)
class CatalogueColumn:
    """One column of a catalogue.

    :param kind: ``int`` (int64, :data:`NULL_INT` when missing), ``float`` (NaN when missing), ``bool``,
        ``str`` (empty when missing).
    :param expression: the SQL expression of its value (``None`` for parameter and flag columns).
    :param parameter: the task parameter it holds, for parameter columns.
    :param flag: ``(bitmask column, bit value)`` for flag columns.
    """

    name: str
    kind: str
    description: str
    unit: str | None = None
    expression: SQLExpression | None = None
    parameter: str | None = None
    flag: tuple[str, int] | None = None
    values: Mapping[int, Any] | None = field(default=None, compare=False, repr=False)
    """For a parameter column: parameter pk (what ``expression`` selects) -> decoded value."""

    @property
    def selected(self) -> SQLExpression:
        """The expression as selected: a missing integer is :data:`NULL_INT`, a missing string ``""``
        (a parameter column selects the parameter's pk, decoded with :attr:`values`; none: :data:`NULL_INT`).

        :raises ValueError: for a flag column, which selects nothing (it is computed from its bitmask).
        """
        if self.expression is None:
            raise ValueError(f"catalogue column {self.name!r} has no SQL expression to select")
        if self.kind == INT or self.parameter is not None:
            return func.coalesce(self.expression, NULL_INT)
        if self.kind == STR:
            return func.coalesce(self.expression, "")
        return self.expression


def _kind(sql_type: Any) -> str:
    if isinstance(sql_type, Boolean):
        return BOOL
    if isinstance(sql_type, Integer | BigInteger | SmallInteger):
        return INT
    if isinstance(sql_type, Float):
        return FLOAT
    return STR


# Provenance columns: source, data product, task --------------------------------------------------------

_SOURCE = (
    ("source_pk", Source.pk, None, "Primary key of the source in the astra database"),
    ("sdss_id", Source.sdss_id, None, "SDSS-V source identifier"),
    ("catalogid", Source.catalogid, None, "SDSS-V catalog identifier"),
    ("obj", Source.obj, None, "APOGEE object identifier (2MASS designation, 2M form)"),
    ("thing_id", Source.thing_id, None, "SDSS-III/IV photometric object identifier"),
    ("ra", Source.ra, "deg", "Right ascension of the source (from its file headers)"),
    ("dec", Source.dec, "deg", "Declination of the source (from its file headers)"),
)
_PRODUCT = (
    ("data_product_pk", DataProduct.pk, None, "Primary key of the data product analysed"),
    ("release", DataProduct.release, None, "Data release of the data product"),
    ("filetype", DataProduct.filetype, None, "SDSS file type of the data product (full: a plain file)"),
    ("path", DataProduct.path, None, "Path of the data product file"),
)
_TASK = (
    ("task_pk", Task.pk, None, "Primary key of the task that wrote the result"),
    ("task_id", Task.task_id, None, "Identity of the task (class, parameters and inputs)"),
    ("task_name", Task.task_name, None, "Task class"),
    ("v_astra", Task.version, None, "astra-provider version that ran the task"),
    ("t_elapsed", Task.duration, "s", "Time the task took (its share of its bundle's overhead included)"),
)


def _keyword_columns(filetypes: Iterable[str], taken: set[str]) -> list[CatalogueColumn]:
    """The path keywords of ``filetypes`` (``telescope``, ``mjd``...), except names already taken."""
    columns: dict[str, CatalogueColumn] = {}
    for filetype in sorted(filetypes):
        spec = FILETYPES.get(filetype)
        for name, kind in spec.keywords.items() if spec else ():
            if name in taken or name in columns:
                continue
            value = DataProduct.kwargs[name]
            expression = value.as_integer() if kind == "int" else cast(value.as_string(), Text)
            columns[name] = CatalogueColumn(
                name,
                INT if kind == "int" else STR,
                f"Keyword {name} of the data product's path",
                None,
                expression,
            )
    return list(columns.values())


# Parameters and flags ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterValues:
    """The values a task parameter takes in a catalogue: its column kind, and parameter pk -> value."""

    kind: str
    values: Mapping[int, Any]


def _parameter_expression(table: Any, name: str) -> ColumnElement:
    """The pk of the task's value of parameter ``name`` (a correlated subquery on the result's task)."""
    return (
        select(TaskParameter.parameter_pk)
        .join(Parameter, Parameter.pk == TaskParameter.parameter_pk)
        .where(TaskParameter.task_pk == table.c.task_pk, Parameter.parameter_name == name)
        .limit(1)
        .scalar_subquery()
    )


def json_value_kind(values: Iterable[Any]) -> str:
    """The column kind that holds all ``values`` (decoded JSON): int, float, bool, else str (JSON text)."""
    kinds = {type(value) for value in values if value is not None}
    if kinds <= {bool} and kinds:
        return BOOL
    if kinds <= {int}:
        return INT
    if kinds <= {int, float}:
        return FLOAT
    return STR


def flag_bits(model: type[OutputMixin]) -> dict[str, int]:
    """The ``flag_<name>`` columns of a result model's ``flag_enum`` enum: name -> bit value."""
    path = getattr(model, "flag_enum", None)
    if not path:
        return {}
    module, _, name = path.rpartition(".")
    flags = getattr(importlib.import_module(module), name)
    if not (isinstance(flags, type) and issubclass(flags, enum.IntFlag)):
        raise TypeError(f"{model.__name__}.flag_enum = {path!r} is not an enum.IntFlag")
    # iterating an IntFlag gives its named members only
    return {f"flag_{member.name.lower()}": int(member.value) for member in flags if member.name is not None}


def _flag_description(model: type[OutputMixin], name: str) -> str:
    path = model.flag_enum
    assert path is not None  # only called for the flag columns of a model that names its flag_enum
    return f"Bit {name.removeprefix('flag_').upper()} of bitmask_flag ({path.rpartition('.')[2]})"


# All columns ---------------------------------------------------------------------------------------------


def catalogue_columns(
    model: type[OutputMixin], filetypes: Iterable[str], parameters: Mapping[str, ParameterValues]
) -> list[CatalogueColumn]:
    """Every column of the catalogue of result model ``model``.

    :param filetypes: the file types of the data products in the catalogue (their path keywords become
        columns).
    :param parameters: the task parameters and their values, by name.
    """
    columns = [CatalogueColumn(n, _kind(e.type), d, u, e) for n, e, u, d in (*_SOURCE, *_PRODUCT)]
    taken = {c.name for c in columns}
    table = model.__table__
    result_names = {c.name for c in table.columns} - {"output_pk", "task_pk", "data_product_pk"}
    columns += _keyword_columns(filetypes, taken | result_names)
    columns += [CatalogueColumn(n, _kind(e.type), d, u, e) for n, e, u, d in _TASK]
    columns.append(
        CatalogueColumn("output_pk", INT, table.c.output_pk.info["description"], None, table.c.output_pk)
    )
    taken = {c.name for c in columns} | result_names
    for name, summary in sorted(parameters.items()):
        columns.append(
            CatalogueColumn(
                name if name not in taken else f"parameter_{name}",
                summary.kind,
                f"Task parameter {name}",
                expression=_parameter_expression(table, name),
                parameter=name,
                values=summary.values,
            )
        )
    for column in table.columns:
        if column.name in ("output_pk", "task_pk", "data_product_pk"):
            continue
        info = column.info
        expression = cast(column, Text) if isinstance(column.type, JSON) else column
        kind = STR if isinstance(column.type, JSON) else _kind(column.type)
        columns.append(
            CatalogueColumn(
                column.name, kind, info.get("description", column.name), info.get("unit"), expression
            )
        )
    if "bitmask_flag" in table.c:
        for name, bit in flag_bits(model).items():
            columns.append(
                CatalogueColumn(name, BOOL, _flag_description(model, name), flag=("bitmask_flag", bit))
            )
    return columns
