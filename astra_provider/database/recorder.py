"""The provenance of task executions: the one place that writes the rows of executed tasks.

A :class:`Recorder` records the tasks of one :class:`~astra_provider.base.TaskInstance` (one task, or a
bundle) around their execution:

1. :meth:`Recorder.record` *claims* the tasks. It resolves the input data products (creating their rows),
   computes each task's identity (:func:`task_id`), and looks up the rows of the same tasks at this version:
   a completed twin makes the task *already done* (skip-if-done); a running row of another live process
   makes it *held elsewhere* (not run here); a running row whose lease is stale is taken over
   (:mod:`astra_provider.database.leases`). The others are inserted ``RUNNING`` under this process's lease,
   holding the claim on their ``(task_id, version)`` (a unique index: a concurrent run that inserted the
   same claim first wins, and the task is held elsewhere), with their parameters, the version parameters,
   their input data products and their bundle.
2. :meth:`Recorder.persist`, after each chunk of tasks has run, stores their result rows and output data
   products and updates each task with its status, timings, error and return value, in one transaction
   that only changes tasks still running under this lease. A task whose claim was taken over meanwhile is
   not recorded here (*lost*); a chunk whose commit was not acknowledged is recognised when it is run again.
3. :meth:`Recorder.finish` writes the bundle's stage times.

Each step is one transaction of a few bulk statements (:mod:`astra_provider.database.bulk`,
:mod:`astra_provider.database.recording`), retried on transient errors
(:mod:`astra_provider.database.retry`). The task instance owns the execution; the recorder owns every
statement about it.
"""

from __future__ import annotations

import functools
import gc
import logging
import operator
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from astra_provider._version import __version__
from astra_provider.database import get_database_url, normalize_url
from astra_provider.database.astradb import (
    Base,
    Bundle,
    DataProduct,
    Status,
    Task,
    TaskInputDataProduct,
    TaskParameter,
    VersionParameter,
    version_parameters,
)
from astra_provider.database.leases import LEASE_STAGE, LeaseState, lease_states, process_lease, take_over
from astra_provider.database.outcomes import final_rows, store_output_data_products, store_results
from astra_provider.database.recording import (
    DataProductSpec,
    Pipeline,
    allocate_pks,
    build,
    canonical_json_fast,
    get_or_create_data_products,
    get_or_create_parameters,
    hash_json,
    insert_rows,
    prepare_insert,
    prepare_update,
    select_in,
)
from astra_provider.database.retry import run_transaction
from astra_provider.database.text import clean_json
from astra_provider.utils import to_json_value

log = logging.getLogger(__name__)

STAGES = ("pre_execute", "execute", "post_execute")


@dataclass(eq=False)
class TaskItem:
    """One task of a task instance: its parameters and inputs, its row once recorded, and its run."""

    parameters: dict[str, Any]
    inputs: list[DataProductSpec | DataProduct | int]
    task: Task | None = None
    data_products: list[DataProduct] = field(default_factory=list)
    already_done: bool = False
    elsewhere: str | None = None  # held by another live run (its lease, described): not run here
    failed: bool = False
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    result: Any = None
    error: tuple[str, str, str] | None = None  # (stage, message, traceback)
    recorded: bool = False  # its outcome is in the database
    lost: bool = False  # its claim was taken over while it ran: its outcome was not recorded here

    def reset(self) -> None:
        """Forget the outcome of a previous execution."""
        self.failed, self.error, self.result = False, None, None
        self.already_done, self.elsewhere, self.recorded, self.lost = False, None, False, False
        self.times = dict.fromkeys(STAGES, 0.0)

    @property
    def runnable(self) -> bool:
        """Claimed by this run and not finished: it still has stages to run."""
        return not (self.already_done or self.elsewhere or self.failed or self.lost or self.recorded)


ResultRow = tuple[TaskItem, type[Base], dict[str, Any]]
"""A row of a result table written by a task: ``(task, model, columns)``."""

OutputFile = tuple[TaskItem, DataProductSpec]
"""A file written by a task: ``(task, data product)``."""


# Identity ----------------------------------------------------------------------------------------------


def encode_parameter_value(value: Any) -> str:
    """The stored form of a parameter value: its canonical JSON."""
    return canonical_json_fast(value)


def task_id(task_class: type, parameters: Mapping[str, str], identities: Sequence[str]) -> str:
    """``{namespace}.{class name}_{stable_hash([module, qualname, parameters, data product identities])}``.

    The prefix is the class's ``task_family()`` (``RNG.RandomNumberGeneratorTask``); the hash does not
    depend on it, nor on the version parameters.

    :param parameters: the already encoded values (name -> :func:`encode_parameter_value`). The canonical
        JSON of a dict is its sorted ``"key":value`` pairs, so the text assembled here from those pieces is
        exactly ``canonical_json([...])``, and the hash is ``stable_hash([...])``, without encoding every
        value twice.
    :param identities: the :attr:`~astra_provider.database.astradb.DataProduct.identity` of each input.
    """
    encode = encode_parameter_value
    pairs = ",".join(f"{encode(name)}:{value}" for name, value in sorted(parameters.items()))
    inputs = ",".join(map(encode, identities))
    module, qualname = encode(task_class.__module__), encode(task_class.__qualname__)
    family = task_class.task_family() if hasattr(task_class, "task_family") else task_class.__name__
    return f"{family}_" + hash_json(f"[{module},{qualname},{{{pairs}}},[{inputs}]]")


CLAIM_ATTEMPTS = 20
"""How many times claiming looks again after concurrent runs claimed some of the same tasks first."""

_VERSIONS_RECORDED: set[str] = set()
"""Database URLs where this process has made sure the version parameters of this version are recorded."""


class _OwnershipChanged(Exception):
    """Some tasks of a chunk are no longer running under this lease (rolled back; sorted out after)."""


# The recorder ------------------------------------------------------------------------------------------


class Recorder:
    """Records the tasks of one task instance; see the module docstring.

    :param task_class: the ``TaskInstance`` subclass of the tasks.
    :param bundled: the values of the bundled parameters, shared by every task.
    """

    def __init__(self, task_class: type, bundled: Mapping[str, Any]) -> None:
        self.task_class = task_class
        self.name = task_class.__name__
        self.bundled = dict(bundled)
        self.url = normalize_url(get_database_url())
        self.lease = process_lease(self.url)
        self.bundle: Bundle | None = None
        """The bundle row of the first tasks this run inserted (None for fewer than two)."""
        self._claimed: set[int] = set()
        self._version_pairs = [
            (k, encode_parameter_value(v)) for k, v in version_parameters(__version__).items()
        ]

    def _transaction(self, work: Callable[[Session], Any], description: str) -> Any:
        return run_transaction(work, url=self.url, description=description)

    # Claiming ------------------------------------------------------------------------------------

    def record(self, items: Sequence[TaskItem], *, force: bool) -> None:
        """Claim ``items`` (see the module docstring) and set each one's ``task``.

        Sets ``already_done`` (with the twin's stored result) or ``elsewhere`` on the tasks not claimed.
        With ``force``, every task gets a new row, which does not take the claim.
        """
        inserted_before: set[int] = set()  # rows of an attempt whose commit may have gone through
        items = list(items)
        description = f"claiming {len(items)} task(s) of {self.task_class.__name__}"
        for attempt in range(1, CLAIM_ATTEMPTS + 1):
            try:
                with _gc_paused():
                    bundle = self._transaction(
                        lambda session: self._record(session, items, force, inserted_before), description
                    )
                break
            except IntegrityError as error:
                if "ux_task_claim" not in str(error.orig) or attempt == CLAIM_ATTEMPTS:
                    raise
                log.info("%s: a concurrent run claimed some of these tasks first; looking again", self.name)
        self.bundle = self.bundle or bundle
        _VERSIONS_RECORDED.add(self.url)
        claimed = {item.task.pk for item in items if item.runnable}
        self._claimed |= claimed
        self.lease.in_flight |= claimed

    def release(self) -> None:
        """Forget this run's claims in the process (its execution ended, recorded or not)."""
        self.lease.in_flight -= self._claimed
        self._claimed = set()

    def _record(
        self, session: Session, items: list[TaskItem], force: bool, inserted_before: set[int]
    ) -> Bundle | None:
        """One attempt at claiming ``items``; the bundle row of the new tasks."""
        for item in items:
            item.task, item.already_done, item.elsewhere, item.result = None, False, None, None
        with Pipeline.for_session(session) as pipeline:
            resolved = pipeline.submit(self._resolve_data_products, session, items)
            # Each parameter value is encoded once: for the task's identity and for its parameter rows.
            encoded = [
                {name: encode_parameter_value(value) for name, value in item.parameters.items()}
                for item in items
            ]
            if any(isinstance(dp, int) for item in items for dp in item.inputs):
                resolved.result()  # the identity of a data product given by pk is in the database
                identities = [[dp.identity for dp in item.data_products] for item in items]
            else:  # a spec has the identity of the row it resolves to (same release, filetype, hash)
                identities = [[dp.identity for dp in item.inputs] for item in items]
            task_ids = [
                task_id(self.task_class, parameters, ids)
                for parameters, ids in zip(encoded, identities, strict=True)
            ]
            existing = self._existing(session, pipeline, task_ids)
            new_items = self._sort_out(session, items, task_ids, encoded, existing, force, inserted_before)
            bundle = self._insert_tasks(session, pipeline, new_items, force, inserted_before)
            resolved.result()
        if bundle is None:  # an earlier attempt that did commit inserted these tasks, and their bundle
            bundle_pks = {
                item.task.bundle_pk
                for item in items
                if item.task is not None and item.task.pk in inserted_before
            }
            bundle = session.get(Bundle, min(bundle_pks)) if bundle_pks - {None} else None
        return bundle

    def _resolve_data_products(self, session: Session, items: Sequence[TaskItem]) -> None:
        """Set each item's ``data_products``: rows for its specs (created if new) and its pks."""
        specs = [dp for item in items for dp in item.inputs if isinstance(dp, DataProductSpec)]
        pks = {dp for item in items for dp in item.inputs if isinstance(dp, int)}
        products = get_or_create_data_products(session, specs) if specs else []
        by_identity = {spec.identity: product for spec, product in zip(specs, products, strict=True)}
        by_pk = {dp.pk: dp for (dp,) in select_in(session, select(DataProduct), DataProduct.pk, sorted(pks))}
        missing = sorted(pks - set(by_pk))
        if missing:
            raise LookupError(
                f"no data product with pk {', '.join(map(str, missing[:10]))} in the astra database"
            )
        for item in items:
            item.data_products = [
                by_identity[dp.identity]
                if isinstance(dp, DataProductSpec)
                else by_pk[dp]
                if isinstance(dp, int)
                else dp
                for dp in item.inputs
            ]

    def _existing(self, session: Session, pipeline: Pipeline, task_ids: list[str]) -> dict[str, list[Task]]:
        """The rows of these tasks at this version that are completed or hold the claim, in pk order."""
        statement = select(Task).where(
            Task.version == __version__, or_(Task.status_code == Status.COMPLETED, Task.claim == 1)
        )
        found = pipeline.submit(select_in, session, statement.order_by(Task.pk), Task.task_id, set(task_ids))
        existing: dict[str, list[Task]] = {}
        for (task,) in found.result():
            existing.setdefault(task.task_id, []).append(task)
        return existing

    def _sort_out(
        self,
        session: Session,
        items: list[TaskItem],
        task_ids: list[str],
        encoded: list[dict[str, str]],
        existing: Mapping[str, list[Task]],
        force: bool,
        inserted_before: set[int],
    ) -> list[tuple[TaskItem, str, dict[str, str]]]:
        """Set already-done and held-elsewhere items; take stale claims over; return the items to insert."""
        holders = {
            tid: next((t for t in rows if t.claim == 1 and t.status_code == Status.RUNNING), None)
            for tid, rows in existing.items()
        }
        states = lease_states(session, [h.lease_pk for h in holders.values() if h is not None])
        new_items, stale = [], {}
        for item, tid, parameters in zip(items, task_ids, encoded, strict=True):
            rows, holder = existing.get(tid, []), holders.get(tid)
            completed = [t for t in rows if t.status_code == Status.COMPLETED]
            if holder is not None and holder.pk in inserted_before:  # ours: an attempt that did commit
                item.task = holder
                holder.__dict__["_parameters"] = item.parameters
            elif completed and not force:
                twin = completed[-1]  # the most recent one
                item.task, item.already_done, item.result = twin, True, twin.result
                twin.__dict__["_parameters"] = item.parameters
            elif holder is not None and not force:
                state = states.get(holder.lease_pk)
                mine = holder.lease_pk == self.lease.pk
                if mine and holder.pk not in self.lease.in_flight:  # left by an execution that failed
                    stale[holder.pk] = f"lease {self.lease.owner} (left by an earlier execution)"
                elif state is not None and not state.stale:
                    item.task, item.elsewhere = holder, state.owner
                    continue
                else:
                    stale[holder.pk] = state.describe() if state is not None else None
                new_items.append((item, tid, parameters))
            else:
                new_items.append((item, tid, parameters))
        if stale:
            taken = take_over(session, stale, by=f"{self.lease.owner} (taken over)")
            log.warning(
                "%s: took over %d stale task(s) whose run stopped (%s)",
                self.task_class.__name__,
                taken,
                "; ".join(sorted({reason or "no lease" for reason in stale.values()})),
            )
        return new_items

    def _insert_tasks(
        self,
        session: Session,
        pipeline: Pipeline,
        new_items: list[tuple[TaskItem, str, dict[str, str]]],
        force: bool,
        inserted_before: set[int],
    ) -> Bundle | None:
        """Insert the new tasks with their parameters, input data products and bundle (a few statements).

        On PostgreSQL, a claim that a concurrent run inserted since the look-up makes the insert fail on the
        unique index (after that run commits): :meth:`record` then runs the transaction again, and finds
        that claim. SQLite transactions take the write lock when they begin, so the rows read above cannot
        change before the insert.
        """
        if not new_items:
            return None
        now = datetime.now(UTC)
        parameter_pks = pipeline.submit(
            get_or_create_parameters, session, sorted({pair for _, _, p in new_items for pair in p.items()})
        )
        if self.url not in _VERSIONS_RECORDED:
            pipeline.submit(self._record_version_parameters, session)
        bundle = None
        if len(new_items) > 1:
            bundle = Bundle(
                task_module=self.task_class.__module__,
                task_name=self.task_class.__qualname__,
                bundled_parameters=clean_json(to_json_value(self.bundled)),  # inf, nan, -0.0 tagged
                n_tasks=len(new_items),
                created=now,
            )
            pipeline.submit(_add_and_flush, session, bundle)
        pks = pipeline.submit(allocate_pks, session, Task.__table__, len(new_items)).result()
        inserted_before.update(pks)
        claim = None if force else 1
        shared = {
            "task_module": self.task_class.__module__,
            "task_name": self.task_class.__qualname__,
            "version": __version__,
            "status_code": int(Status.RUNNING),
            "created": now,
            "modified": now,
            "claim": claim,
            "lease_pk": self.lease.pk,
        }
        if bundle is not None:
            shared["bundle_pk"] = bundle.pk  # flushed by the worker before it allocated the task pks
        # In task_id order: concurrent runs inserting the same claims meet in one order (no deadlock)
        rows = sorted(
            ({"pk": pk, "task_id": tid} for pk, (_, tid, _) in zip(pks, new_items, strict=True)),
            key=operator.itemgetter("task_id"),
        )
        pipeline.submit(prepare_insert(session, Task.__table__, rows, same_for_all=shared))
        links = self._link_rows(new_items, pks, parameter_pks.result())
        for rows, table in zip(links, (TaskParameter.__table__, TaskInputDataProduct.__table__), strict=True):
            pipeline.submit(prepare_insert(session, table, rows))
        template = {**dict.fromkeys(c.name for c in Task.__table__.columns), **shared}
        for pk, (item, tid, _) in zip(pks, new_items, strict=True):
            item.task = build(Task, {**template, "pk": pk, "task_id": tid, "_parameters": item.parameters})
        pipeline.submit(lambda: None).result()  # the first error, if any, is raised here
        return bundle

    def _record_version_parameters(self, session: Session) -> None:
        """The version parameters of this version: two ``parameter`` rows and their ``version_parameter``
        rows, recorded once per version (the view ``astra.task_parameter`` gives them to every task)."""
        pks = get_or_create_parameters(session, self._version_pairs)
        rows = [{"version": __version__, "parameter_pk": pk} for pk in sorted(pks.values())]
        insert_rows(
            session, VersionParameter.__table__, rows, on_conflict_do_nothing=("version", "parameter_pk")
        )

    def _link_rows(
        self,
        new_items: list[tuple[TaskItem, str, dict[str, str]]],
        pks: list[int],
        parameter_pks: Mapping[tuple[str, str], int],
    ) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
        """The ``task_parameter_link`` and ``task_input_data_product`` rows of the new tasks."""
        parameters = [
            {"task_pk": pk, "parameter_pk": parameter_pks[pair]}
            for pk, (_, _, values) in zip(pks, new_items, strict=True)
            for pair in values.items()
        ]
        inputs = [
            {"task_pk": pk, "data_product_pk": dp.pk}
            for pk, (item, _, _) in zip(pks, new_items, strict=True)
            for dp in item.data_products
        ]
        return parameters, inputs

    # Waiting for tasks held elsewhere -----------------------------------------------------------------

    def refresh_held(self, items: Sequence[TaskItem]) -> list[TaskItem]:
        """Look again at tasks held elsewhere: completed ones become already done; return the ones whose
        holder failed or stopped (to be claimed again); the others stay held."""
        held = [item for item in items if item.elsewhere]
        if any(item.task is None for item in held):  # its holder is gone: claim it again
            return [item for item in held if item.task is None] + self.refresh_held(
                [item for item in held if item.task is not None]
            )

        def look(session: Session) -> list[TaskItem]:
            rows = {t.pk: t for (t,) in select_in(session, select(Task), Task.pk, [i.task.pk for i in held])}
            states = lease_states(session, [t.lease_pk for t in rows.values()])
            free = []
            for item in held:
                row = rows.get(item.task.pk)
                if row is not None and row.status_code == Status.COMPLETED:
                    item.task, item.already_done, item.result, item.elsewhere = row, True, row.result, None
                    row.__dict__["_parameters"] = item.parameters
                elif row is None or row.status_code != Status.RUNNING or _stale(states.get(row.lease_pk)):
                    free.append(item)
            return free

        return self._transaction(look, "looking up tasks held by other runs") if held else []

    # Recording outcomes --------------------------------------------------------------------------

    def persist(
        self,
        items: Sequence[TaskItem],
        results: Sequence[ResultRow],
        outputs: Sequence[OutputFile],
        overhead: Mapping[int, float],
    ) -> None:
        """Record the outcome of ``items`` (tasks of this run that finished or failed), in one transaction.

        Output files that no longer exist fail their task (no record points at a missing file). A chunk that
        the database refuses (a value a column cannot hold) is split in halves until the task at fault is
        found; that task is recorded failed, with the database's error.

        :param overhead: each task's share of its bundle's overhead (by ``id(item)``).
        """
        items = [item for item in items if not item.recorded and not item.lost]
        if not items:
            return
        _fail_missing_outputs(outputs)
        results = [r for r in results if not r[0].failed]
        outputs = [o for o in outputs if not o[0].failed]
        with _gc_paused():
            self._persist_or_split(items, results, outputs, overhead)

    def _persist_or_split(self, items, results, outputs, overhead) -> None:  # noqa: ANN001
        try:
            self._persist_owned(items, results, outputs, overhead)
        except (SQLAlchemyError, ValueError, TypeError) as error:  # refused: transient errors were retried
            if len(items) == 1:
                self._record_unrecordable(items, error)
                return
            log.warning("%s: the database refused a chunk of %d task(s) (%s); splitting it",
                        self.task_class.__name__, len(items), error)  # fmt: skip
            half = len(items) // 2
            for part in (items[:half], items[half:]):
                members = {id(item) for item in part}
                self._persist_or_split(
                    part,
                    [r for r in results if id(r[0]) in members],
                    [o for o in outputs if id(o[0]) in members],
                    overhead,
                )

    def _record_unrecordable(self, items: list[TaskItem], error: Exception) -> None:
        item = items[0]
        message = f"the database refused this task's outcome: {type(error).__name__}: {str(error)[:2000]}"
        log.warning("%s: task %s %s", self.task_class.__name__, item.task.pk, message)
        item.failed, item.result = True, None
        item.error = ("record", message, item.error[2] if item.error else "")
        self._persist_owned(items, [], [], {})

    def _persist_owned(self, items, results, outputs, overhead) -> None:  # noqa: ANN001
        """Persist, sorting out tasks that are no longer (or no longer only) ours."""
        for _ in range(5):
            try:
                self._transaction(
                    functools.partial(
                        self._persist, items=items, results=results, outputs=outputs, overhead=overhead
                    ),
                    f"recording {len(items)} task(s) of {self.task_class.__name__}",
                )
            except _OwnershipChanged:
                items = self._sort_out_ownership(items)
                members = {id(item) for item in items}
                results = [r for r in results if id(r[0]) in members]
                outputs = [o for o in outputs if id(o[0]) in members]
                if not items:
                    return
                continue
            for item in items:
                item.recorded = True
            return
        raise RuntimeError(f"{self.task_class.__name__}: the ownership of the tasks kept changing")

    def _persist(self, session, items, results, outputs, overhead) -> None:  # noqa: ANN001
        with Pipeline.for_session(session) as pipeline:
            first_output = store_results(session, pipeline, results)
            if outputs:
                pipeline.submit(store_output_data_products, session, outputs)
            now = datetime.now(UTC)
            rows = final_rows(items, overhead, first_output)
            updated = pipeline.submit(
                prepare_update(
                    session,
                    Task.__table__,
                    rows,
                    same_for_all={"modified": now},
                    where={"status_code": int(Status.RUNNING), "lease_pk": self.lease.pk},
                )
            ).result()
        if updated != len(items):
            raise _OwnershipChanged
        for item, row in zip(items, rows, strict=True):
            item.task.__dict__.update(row, modified=now)

    def drop_lost(self, items: Sequence[TaskItem]) -> None:
        """Mark ``lost`` the tasks of ``items`` that another run took over (this process's lease lapsed), so
        that they are not run here again; one query."""
        items = [item for item in items if item.runnable and item.task is not None]
        if items:
            self._sort_out_ownership(items)

    def _sort_out_ownership(self, items: list[TaskItem]) -> list[TaskItem]:
        """After a chunk found some tasks not running under this lease: mark the ones another run took over
        ``lost``, the ones an earlier attempt recorded ``recorded``; return the ones still to record."""

        def look(session: Session) -> dict[int, tuple[int, str | None, int | None]]:
            statement = select(Task.pk, Task.status_code, Task.error_stage, Task.lease_pk)
            return {
                row[0]: row[1:] for row in select_in(session, statement, Task.pk, [i.task.pk for i in items])
            }

        rows = self._transaction(look, "looking up the tasks of a chunk")
        remaining = []
        for item in items:
            status, stage, lease_pk = rows.get(item.task.pk, (None, None, None))
            if status == Status.RUNNING and lease_pk == self.lease.pk:
                remaining.append(item)
            elif (
                lease_pk == self.lease.pk
                and status in (Status.COMPLETED, Status.FAILED)
                and stage != LEASE_STAGE
            ):
                item.recorded = True  # an earlier attempt committed, unacknowledged
            else:
                item.lost = True
        lost = [item.task.pk for item in items if item.lost]
        if lost:
            log.warning(
                "%s: %d task(s) were taken over by another run while this one ran them (their lease "
                "lapsed); their outcome here is not recorded: task pks %s",
                self.task_class.__name__,
                len(lost),
                ", ".join(map(str, lost[:20])),
            )
        return remaining

    def finish(self, stage_times: Mapping[str, float], overheads: Mapping[str, float]) -> None:
        """Write the bundle's stage times and overheads (when this run inserted a bundle)."""
        if self.bundle is None:
            return
        values = {
            **{f"time_{s}": stage_times[s] for s in STAGES},
            **{f"time_{s}_overhead": overheads[s] for s in STAGES},
        }
        statement = update(Bundle).where(Bundle.pk == self.bundle.pk).values(**values)
        self._transaction(lambda session: session.execute(statement), "recording the bundle's times")
        self.bundle.__dict__.update(values)


def _stale(state: LeaseState | None) -> bool:
    return state is None or state.stale


def _fail_missing_outputs(outputs: Sequence[OutputFile]) -> None:
    """Fail the tasks whose output file is gone (one ``stat`` per file)."""
    for item, spec in outputs:
        if not item.failed and not os.path.exists(spec.path):
            item.failed, item.result = True, None
            item.error = (
                "post_execute",
                f"output data product {spec.path!r} does not exist when recorded",
                "",
            )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector while recording a bundle.

    Recording 10,000 tasks creates a few hundred thousand objects that all stay alive (rows, ``Task`` and
    ``DataProduct`` records); each time enough of them accumulate, the collector walks every object of
    the process, which made up about a quarter of the recording's CPU time. Nothing here creates garbage
    cycles worth collecting early; the collector's previous state is restored on exit.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _add_and_flush(session: Session, record: Base) -> None:
    session.add(record)
    session.flush()


__all__ = ["STAGES", "OutputFile", "Recorder", "ResultRow", "TaskItem", "encode_parameter_value", "task_id"]
