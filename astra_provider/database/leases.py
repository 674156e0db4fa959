"""Leases: which process is running a task, until when, and what happens to its tasks when it stops.

Each process that executes tasks has one row of ``astra.lease`` per database: its *owner* (``host/pid/a
random id``) and an expiry. Tasks it claims are inserted ``RUNNING`` with its ``lease_pk``. While it runs
tasks, a heartbeat thread renews the expiry every quarter of the lease time (``ASTRA_LEASE_SECONDS``,
default 120 s); between executions the lease may lapse, which is harmless since the process then has no
running tasks.

A ``RUNNING`` task is **stale** when its lease has expired, when its lease belongs to a process of this host
that no longer exists (killed, out of memory), or when it has no lease (recorded by an earlier version).
Another run of the same task takes a stale task over (the stale row is marked failed, and releases its
claim); :func:`recover_stale_tasks` (``astra recover``) marks every stale task failed;
:func:`task_status` (``astra status``) counts them. Times are the database server's clock on PostgreSQL (so
hosts need not agree) and this host's UTC clock on SQLite.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Update, bindparam, func, select, text, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from astra_provider.database.astradb import Lease, Status, Task

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 120.0
LEASE_STAGE = "lease"
"""``task.error_stage`` of a task whose run stopped without recording it (taken over, or recovered)."""


def lease_seconds() -> float:
    """How long a claim holds without a heartbeat (``ASTRA_LEASE_SECONDS``, default 120 s, at least 1)."""
    value = os.environ.get("ASTRA_LEASE_SECONDS", "").strip()
    if not value:
        return DEFAULT_LEASE_SECONDS
    try:
        return max(float(value), 1.0)
    except ValueError:
        raise ValueError(f"ASTRA_LEASE_SECONDS must be a number of seconds, got {value!r}") from None


def _host() -> str:
    return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return True


# The clock ------------------------------------------------------------------------------------------------


def _now_sql(session: Session) -> Any:
    """'Now' for comparisons with lease expiries: the server's clock (PostgreSQL) or this host's (SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.statement_timestamp()
    return bindparam("now", datetime.now(UTC), type_=Lease.expires.type)


def _expiry_sql(session: Session, seconds: float) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return text("statement_timestamp() + make_interval(secs => :seconds)").bindparams(seconds=seconds)
    from datetime import timedelta

    return bindparam("expiry", datetime.now(UTC) + timedelta(seconds=seconds), type_=Lease.expires.type)


# Which leases are stale --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseState:
    """A lease as seen now: its row, and whether its tasks are stale (and why)."""

    pk: int
    owner: str
    host: str
    pid: int
    expires: datetime
    expired: bool

    @property
    def dead(self) -> bool:
        """Its process is known to be gone (same host, no such process)."""
        return self.host == _host() and not process_alive(self.pid)

    @property
    def stale(self) -> bool:
        return self.expired or self.dead

    def describe(self) -> str:
        reason = f"expired at {_iso(self.expires)}" if self.expired else "whose process is gone"
        return f"lease {self.owner} ({reason})"


def lease_states(session: Session, lease_pks: Iterable[int | None]) -> dict[int, LeaseState]:
    """The state of each of ``lease_pks`` that exists (one query; ``None``, no lease, is skipped)."""
    pks = sorted({pk for pk in lease_pks if pk is not None})
    if not pks:
        return {}
    now = _now_sql(session)
    rows = session.execute(
        select(Lease.pk, Lease.owner, Lease.host, Lease.pid, Lease.expires, (Lease.expires < now)).where(
            Lease.pk.in_(pks)
        )
    ).all()
    return {
        pk: LeaseState(pk, owner, host, pid, expires, expired=bool(expired))
        for pk, owner, host, pid, expires, expired in rows
    }


def _fail_stopped(condition: ColumnElement[bool], reason: str, by: str) -> Update:
    """The ``UPDATE`` that marks the ``RUNNING`` tasks matching ``condition`` failed (error stage ``lease``),
    releasing their claim: their run stopped (``reason``, its lease described) without recording them."""
    message = f"the run that claimed this task stopped without recording it ({reason}); marked failed by {by}"
    return (
        update(Task)
        .where(condition, Task.status_code == Status.RUNNING)
        .values(
            status_code=Status.FAILED,
            claim=None,
            error_stage=LEASE_STAGE,
            error_message=message,
            modified=datetime.now(UTC),
        )
    )


def take_over(session: Session, stale: dict[int, str | None], by: str) -> int:
    """Mark the stale ``RUNNING`` tasks ``stale`` (task pk -> the lease's description, None: no lease) failed.

    Each row is changed only if it is still running under the same lease, and it releases its claim, so that
    a new row can claim the task. One ``UPDATE`` per distinct lease (a handful).

    :param by: who takes them over, for the recorded message.
    :returns: the number of tasks marked failed.
    """
    by_reason: dict[str | None, list[int]] = {}
    for pk, reason in stale.items():
        by_reason.setdefault(reason, []).append(pk)
    changed = 0
    for reason, pks in by_reason.items():
        statement = _fail_stopped(Task.pk.in_(pks), reason or "no lease", by)
        result = cast(CursorResult[Any], session.execute(statement))  # an UPDATE's result: the row count
        changed += result.rowcount
    return changed


# The lease of this process -----------------------------------------------------------------------------


class ProcessLease:
    """This process's lease on one database, renewed by a heartbeat thread while tasks run.

    Use :func:`process_lease` to get it; ``with lease.hold(): ...`` keeps it alive around an execution.
    """

    def __init__(self, url: str, heartbeat: bool = True) -> None:
        self.url = url
        self.owner = f"{_host()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"
        self.pid = os.getpid()
        self.seconds = lease_seconds()
        self.pk: int | None = None
        self.in_flight: set[int] = set()
        """Pks of the tasks that executions of this process have claimed and not recorded yet."""
        self._renewed_at = 0.0  # time.monotonic() of the last renewal
        self._lapsed = False
        self._heartbeat = heartbeat
        self._holders = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def hold(self) -> Iterator[ProcessLease]:
        """Make sure the lease row exists and is fresh, and keep it fresh until the block ends."""
        self.renew()
        with self._lock:
            self._holders += 1
            if self._heartbeat and (self._thread is None or not self._thread.is_alive()):
                self._stop.clear()
                self._thread = threading.Thread(target=self._beat, name="astra-lease", daemon=True)
                self._thread.start()
        try:
            yield self
        finally:
            thread: threading.Thread | None
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._thread is not None:
                    self._stop.set()
                    thread, self._thread = self._thread, None
                else:
                    thread = None
            if thread is not None:
                thread.join(timeout=5)

    def renew(self) -> None:
        """Create the lease row, or push its expiry ``seconds`` ahead (retried if the database is away)."""
        from astra_provider.database.retry import run_transaction

        run_transaction(self._renew, url=self.url, description="renewing this process's lease")
        self._renewed()

    def _renewed(self) -> None:
        now = time.monotonic()
        if self._renewed_at and now - self._renewed_at > self.seconds:
            self._lapsed = True
        self._renewed_at = now

    def lapsed(self) -> bool:
        """Whether the lease may have expired since the last call (no renewal for longer than the lease):
        then another run may have taken this process's tasks over."""
        lapsed = self._lapsed or time.monotonic() - self._renewed_at > self.seconds
        self._lapsed = False
        return lapsed

    def _renew(self, session: Session) -> None:
        if self.pk is not None:
            result = cast(  # an UPDATE's result is a CursorResult, with the row count
                CursorResult[Any],
                session.execute(
                    update(Lease)
                    .where(Lease.pk == self.pk)
                    .values(renewed=_now_sql(session), expires=_expiry_sql(session, self.seconds))
                ),
            )
            if result.rowcount == 1:
                return
        lease = Lease(
            owner=self.owner,
            host=_host(),
            pid=self.pid,
            expires=datetime.now(UTC),  # replaced below, with the database's clock
        )
        session.add(lease)
        session.flush()
        session.execute(
            update(Lease).where(Lease.pk == lease.pk).values(expires=_expiry_sql(session, self.seconds))
        )
        self.pk = lease.pk

    def _beat(self) -> None:
        from astra_provider.database import session_scope

        while not self._stop.wait(self.seconds / 4):
            try:
                with session_scope(self.url) as session:
                    self._renew(session)
                self._renewed()
            except Exception as error:  # the next beat tries again; recording checks ownership
                log.warning("astra: could not renew the lease %s: %s", self.owner, error)


_leases: dict[tuple[str, int], ProcessLease] = {}
_leases_lock = threading.Lock()


def process_lease(url: str) -> ProcessLease:
    """The lease of this process on the database ``url`` (a new one after a fork)."""
    from astra_provider.database import is_in_memory

    key = (url, os.getpid())
    with _leases_lock:
        lease = _leases.get(key)
        if lease is None:
            # An in-memory SQLite database is private to this process (and shares one connection).
            lease = _leases[key] = ProcessLease(url, heartbeat=not is_in_memory(url))
    return lease


# Status and recovery -----------------------------------------------------------------------------------


def _running_by_lease(session: Session) -> Sequence[tuple[str, str, int | None, int, datetime]]:
    """``(task_module, task_name, lease_pk, number of running tasks, oldest modified)``."""
    return session.execute(
        select(Task.task_module, Task.task_name, Task.lease_pk, func.count(), func.min(Task.modified))
        .where(Task.status_code == Status.RUNNING)
        .group_by(Task.task_module, Task.task_name, Task.lease_pk)
    ).all()


def task_status(session: Session) -> dict[str, Any]:
    """Counts of tasks by class and status, running tasks split into live and stale, and the leases.

    :returns: ``{"classes": [{"task": ..., "CREATED": n, "RUNNING": n, "STALE": n, "COMPLETED": n,
        "FAILED": n}], "stale": n, "live": n, "oldest_stale_lease": {...} | None, "leases": [...]}``.
    """
    counts: dict[str, dict[str, int]] = {}
    for module, name, code, n in session.execute(
        select(Task.task_module, Task.task_name, Task.status_code, func.count()).group_by(
            Task.task_module, Task.task_name, Task.status_code
        )
    ):
        row = counts.setdefault(f"{module}.{name}", dict.fromkeys(["CREATED", "RUNNING", "STALE"], 0))
        row[Status(code).name] = row.get(Status(code).name, 0) + n
    running = _running_by_lease(session)
    states = lease_states(session, [lease_pk for _, _, lease_pk, _, _ in running])
    leases: dict[int | None, dict[str, Any]] = {}
    for module, name, lease_pk, n, oldest in running:
        state = states.get(lease_pk) if lease_pk is not None else None
        stale = state is None or state.stale
        if stale:
            counts[f"{module}.{name}"]["RUNNING"] -= n
            counts[f"{module}.{name}"]["STALE"] += n
        entry = leases.setdefault(lease_pk, _lease_entry(lease_pk, state))
        entry["tasks"] += n
        entry["oldest_task_modified"] = min(filter(None, [entry["oldest_task_modified"], _iso(oldest)]))
    stale_leases = [entry for entry in leases.values() if entry["stale"]]
    return {
        "classes": [{"task": task, **row} for task, row in sorted(counts.items())],
        "live": sum(entry["tasks"] for entry in leases.values() if not entry["stale"]),
        "stale": sum(entry["tasks"] for entry in stale_leases),
        "oldest_stale_lease": min(stale_leases, key=lambda e: e["expires"] or "", default=None),
        "leases": sorted(leases.values(), key=lambda e: (not e["stale"], e["expires"] or "")),
    }


def _lease_entry(lease_pk: int | None, state: LeaseState | None) -> dict[str, Any]:
    if state is None:
        return {"lease_pk": lease_pk, "owner": None, "expires": None, "stale": True, "reason": "no lease",
                "tasks": 0, "oldest_task_modified": None}  # fmt: skip
    reason = "expired" if state.expired else "process gone" if state.dead else "live"
    return {
        "lease_pk": state.pk,
        "owner": state.owner,
        "expires": _iso(state.expires),
        "stale": state.stale,
        "reason": reason,
        "tasks": 0,
        "oldest_task_modified": None,
    }


def recover_stale_tasks(session: Session, *, dry_run: bool = False) -> dict[str, Any]:
    """Mark every stale ``RUNNING`` task failed (error stage ``lease``), releasing its claim.

    Idempotent: a second call finds nothing to do. Tasks of live leases are left alone.

    :returns: ``{"recovered": n, "leases": [...]}`` (with ``dry_run``, what would be recovered).
    """
    running = _running_by_lease(session)
    states = lease_states(session, [lease_pk for _, _, lease_pk, _, _ in running])
    stale = {lease_pk for _, _, lease_pk, _, _ in running if lease_pk not in states or states[lease_pk].stale}
    described = [
        _lease_entry(pk, states.get(pk) if pk is not None else None)
        for pk in sorted(stale, key=lambda pk: (pk is None, pk))
    ]
    would = sum(n for _, _, lease_pk, n, _ in running if lease_pk in stale)
    if dry_run or not stale:
        return {"recovered": 0 if dry_run else would, "would_recover": would, "leases": described}
    recovered = 0
    for lease_pk in stale:
        state = states.get(lease_pk) if lease_pk is not None else None
        reason = state.describe() if state is not None else "no lease"
        condition = Task.lease_pk.is_(None) if lease_pk is None else Task.lease_pk == lease_pk
        statement = _fail_stopped(condition, reason, "astra recover")
        if state is not None and state.expired and not state.dead:  # unless renewed meanwhile
            statement = statement.where(
                select(Lease.pk).where(Lease.pk == lease_pk, Lease.expires < _now_sql(session)).exists()
            )
        recovered += cast(CursorResult[Any], session.execute(statement)).rowcount  # an UPDATE's result
    return {"recovered": recovered, "would_recover": would, "leases": described}


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive datetimes; they are UTC
        value = value.replace(tzinfo=UTC)
    return value.isoformat(timespec="seconds")


__all__ = [
    "LEASE_STAGE",
    "LeaseState",
    "ProcessLease",
    "lease_seconds",
    "lease_states",
    "process_alive",
    "process_lease",
    "recover_stale_tasks",
    "take_over",
    "task_status",
]
