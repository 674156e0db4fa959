"""The declarative base of the astra models: the ``astra`` schema, key and JSON column types, foreign keys.

Shared by the provenance tables (:mod:`astra_provider.database.astradb`) and the result tables
(:mod:`astra_provider.database.results`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, MetaData, Table
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase

from astra_provider.database import SCHEMA

# BIGINT keys on PostgreSQL; SQLite only auto-increments INTEGER PRIMARY KEY columns.
PrimaryKey = BigInteger().with_variant(Integer(), "sqlite")
JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)
    type_annotation_map = {dict[str, Any]: JSONType, Any: JSONType}

    if TYPE_CHECKING:
        # every mapped class here declares ``__tablename__``, so its ``__table__`` is a ``Table``
        # (``DeclarativeBase`` types it as the wider ``FromClause``)
        __table__: ClassVar[Table]


def foreign_key(column: str, ondelete: str = "CASCADE") -> ForeignKey:
    """A foreign key to ``column`` (``"table.column"``) of the ``astra`` schema."""
    return ForeignKey(f"{SCHEMA}.{column}", ondelete=ondelete)


__all__ = ["Base", "JSONType", "PrimaryKey", "foreign_key", "utcnow"]
