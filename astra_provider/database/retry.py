"""Retrying database transactions that failed for a transient reason.

A transaction that fails because the server went away (a restart, a dropped connection, a failover), because
PostgreSQL chose it as the victim of a deadlock or a serialisation conflict, or because an SQLite file stayed
locked, can succeed when run again from its start. :func:`run_transaction` runs a whole transaction function
in a new session, up to a time budget, with exponential backoff between attempts; any other error is raised
at once. When the budget is spent it raises :class:`DatabaseUnavailableError`, which names the database
(password hidden), the number of attempts, the time spent and the last error.

The transaction functions of the recorder are written to be run again: a transaction whose ``COMMIT`` was
sent but not acknowledged (the server stopped mid-commit) is recognised by the next attempt, which finds its
rows already there (:mod:`astra_provider.database.recorder`).

The budget is ``ASTRA_DB_RETRY_SECONDS`` (default 120 s; 0 disables retries).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BUDGET_SECONDS = 120.0
FIRST_DELAY_SECONDS = 0.25
MAX_DELAY_SECONDS = 10.0

# SQLSTATE classes and codes that mean "try again": connection exceptions (08), serialisation failure,
# deadlock, the server shutting down or starting (57P01-57P03), too many connections (53300), lock timeout.
_TRANSIENT_CLASSES = ("08",)
_TRANSIENT_CODES = {"40001", "40P01", "57P01", "57P02", "57P03", "53300", "55P03"}


class DatabaseUnavailableError(RuntimeError):
    """The astra database could not run a transaction within the retry budget."""


def retry_budget() -> float:
    """Seconds to keep retrying a transient failure (``ASTRA_DB_RETRY_SECONDS``, default 120)."""
    value = os.environ.get("ASTRA_DB_RETRY_SECONDS")
    if value is None or value.strip() == "":
        return DEFAULT_BUDGET_SECONDS
    try:
        return max(float(value), 0.0)
    except ValueError:
        raise ValueError(f"ASTRA_DB_RETRY_SECONDS must be a number of seconds, got {value!r}") from None


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a driver error (psycopg2's ``pgcode``), if any."""
    original = getattr(error, "orig", error)
    return getattr(original, "pgcode", None) or getattr(getattr(original, "diag", None), "sqlstate", None)


def is_transient(error: BaseException) -> bool:
    """Whether running the same transaction again may succeed (see the module docstring)."""
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    code = sqlstate(error)
    if code is not None:
        return code.startswith(_TRANSIENT_CLASSES) or code in _TRANSIENT_CODES
    if isinstance(error, OperationalError):
        # psycopg2 reports a lost or refused connection without a SQLSTATE; SQLite a locked file.
        message = str(error.orig).lower()
        if "sqlite" in type(error.orig).__module__:
            return "locked" in message or "busy" in message
        return True
    return False


def run_transaction(
    work: Callable[[Session], T],
    *,
    url: str | None = None,
    description: str = "a transaction",
    budget: float | None = None,
) -> T:
    """``work(session)`` in a transaction that commits on success; transient failures run it again.

    :param url: the database (default: the process's, :func:`astra_provider.database.get_database_url`).
    :param description: what the transaction does, for the log and the final error.
    :param budget: seconds to keep retrying (default :func:`retry_budget`).
    :raises DatabaseUnavailableError: when the budget is spent; the last error is its ``__cause__``.
    """
    from astra_provider.database import get_database_url, redact, session_scope

    budget = retry_budget() if budget is None else budget
    start = time.monotonic()
    delay = FIRST_DELAY_SECONDS
    attempt = 0
    while True:
        attempt += 1
        try:
            with session_scope(url) as session:
                return work(session)
        except DBAPIError as error:
            elapsed = time.monotonic() - start
            if not is_transient(error):
                raise
            if elapsed + delay > budget:
                target = redact(url or get_database_url())
                raise DatabaseUnavailableError(
                    f"the astra database {target} failed {attempt} time(s) over {elapsed:.0f} s while "
                    f"running {description} (transient errors, retried with backoff up to "
                    f"ASTRA_DB_RETRY_SECONDS={budget:g}); last error: {_first_line(error)}"
                ) from error
            log.warning(
                "astra database: %s failed (%s); attempt %d, retrying in %.1f s",
                description,
                _first_line(error),
                attempt,
                delay,
            )
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, MAX_DELAY_SECONDS)


def _first_line(error: BaseException) -> str:
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    return f"{type(original).__name__}: {text[0] if text else ''}"


__all__ = ["DatabaseUnavailableError", "is_transient", "retry_budget", "run_transaction", "sqlstate"]
