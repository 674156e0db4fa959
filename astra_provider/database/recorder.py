"""The provenance of task executions: the one place that writes the rows of executed tasks.

A :class:`Recorder` records the tasks of one :class:`~astra_provider.base.TaskInstance` (one task, or a
bundle) around their execution:

1. :meth:`Recorder.record` *claims* the tasks (:class:`~astra_provider.database.claims.Claimer`). It
   resolves the input data products (creating their rows), computes each task's identity (:func:`task_id`),
   and looks up the rows of the same tasks at this version: a completed twin makes the task *already done*
   (skip-if-done); a running row of another live process makes it *held elsewhere* (not run here); a running
   row whose lease is stale is taken over (:mod:`astra_provider.database.leases`). The others are inserted
   ``RUNNING`` under this process's lease, holding the claim on their ``(task_id, version)``, with their
   parameters, input data products and bundle. The claim is a unique index: when a concurrent run inserted
   some of the same claims first, the insert fails, and the transaction runs again and finds them.
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
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from astra_provider.database import get_database_url, normalize_url
from astra_provider.database.astradb import Bundle, DataProduct, Status, Task
from astra_provider.database.claims import Claimer
from astra_provider.database.claims import encode_parameter_value as encode_parameter_value  # re-exported
from astra_provider.database.claims import task_id as task_id
from astra_provider.database.claims import task_identifier as task_identifier
from astra_provider.database.items import STAGES, OutputFile, ResultRow
from astra_provider.database.items import TaskItem as TaskItem
from astra_provider.database.leases import LEASE_STAGE, process_lease
from astra_provider.database.outcomes import final_rows, store_output_data_products, store_results
from astra_provider.database.recording import Pipeline, prepare_update, select_in
from astra_provider.database.retry import run_transaction
from astra_provider.utils import gc_paused

log = logging.getLogger(__name__)

CLAIM_ATTEMPTS = 20
"""How many times claiming looks again after concurrent runs claimed some of the same tasks first."""


class _OwnershipChanged(Exception):
    """Some tasks of a chunk are no longer running under this lease (rolled back; sorted out after)."""


class Recorder:
    """Records the tasks of one task instance; see the module docstring.

    :param task_class: the ``TaskInstance`` subclass of the tasks.
    :param bundled: the values of the bundled parameters, shared by every task.
    """

    def __init__(self, task_class: type, bundled: Mapping[str, Any]) -> None:
        self.task_class = task_class
        self.name = task_class.__name__
        self.url = normalize_url(get_database_url())
        self.lease = process_lease(self.url)
        self.claimer = Claimer(task_class, bundled, self.lease, self.url)
        self.bundle: Bundle | None = None
        """The bundle row of the first tasks this run inserted (None for fewer than two)."""
        self._claimed: set[int] = set()

    def _transaction(self, work: Callable[[Session], Any], description: str) -> Any:
        return run_transaction(work, url=self.url, description=description)

    # Claiming ------------------------------------------------------------------------------------

    def record(
        self,
        items: Sequence[TaskItem],
        *,
        force: bool,
        while_waiting: Callable[[list[DataProduct], Callable[[], bool]], None] | None = None,
    ) -> None:
        """Claim ``items`` (see the module docstring) and set each one's ``task``.

        Sets ``already_done`` (with the twin's stored result) or ``elsewhere`` on the tasks not claimed.
        With ``force``, every task gets a new row, which does not take the claim. ``while_waiting`` gets the
        data products that the claim inserted while the database writes the tasks (see ``Claimer.claim``).
        """
        inserted_before: set[int] = set()  # rows of an attempt whose commit may have gone through
        items = list(items)
        claim = functools.partial(
            self.claimer.claim,
            items=items,
            force=force,
            inserted_before=inserted_before,
            while_waiting=while_waiting,
        )
        description = f"claiming {len(items)} task(s) of {self.name}"
        if not self.claimer.version_parameters_recorded():
            self._transaction(self.claimer.record_version_parameters, "recording the version parameters")
        for attempt in range(1, CLAIM_ATTEMPTS + 1):
            try:
                with gc_paused():
                    bundle = self._transaction(claim, description)
                break
            except IntegrityError as error:  # a concurrent run inserted some of the same claims first
                if "ux_task_claim" not in str(error.orig) or attempt == CLAIM_ATTEMPTS:
                    raise
                log.info("%s: a concurrent run claimed some of these tasks first; looking again", self.name)
        self.bundle = self.bundle or bundle
        claimed = {item.recorded_task.pk for item in items if item.runnable}
        self._claimed |= claimed
        self.lease.in_flight |= claimed

    def release(self) -> None:
        """Forget this run's claims in the process (its execution ended, recorded or not)."""
        self.lease.in_flight -= self._claimed
        self._claimed = set()

    def refresh_held(self, items: Sequence[TaskItem]) -> list[TaskItem]:
        """Look again at tasks held elsewhere: completed ones become already done; return the ones whose
        holder failed or stopped (to be claimed again); the others stay held."""
        held = [item for item in items if item.elsewhere]
        gone = [item for item in held if item.task is None]
        held = [item for item in held if item.task is not None]
        if not held:
            return gone
        look = functools.partial(self.claimer.look_again, held=held)
        return gone + self._transaction(look, "looking up tasks held by other runs")

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
        with gc_paused():
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
        log.warning("%s: task %s %s", self.task_class.__name__, item.recorded_task.pk, message)
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
        """One attempt at recording a chunk: results, outputs, and the final columns of its tasks that
        still run under this lease; if that is not all of them, nothing (the transaction rolls back)."""
        with Pipeline.for_session(session) as pipeline:
            first_output = store_results(session, pipeline, results)
            if outputs:
                pipeline.submit(store_output_data_products, session, outputs)
            now = datetime.now(UTC)
            rows = final_rows(items, overhead, first_output)
            ours = {"status_code": int(Status.RUNNING), "lease_pk": self.lease.pk}
            update_rows = prepare_update(
                session, Task.__table__, rows, same_for_all={"modified": now}, only_if=ours
            )
            updated = pipeline.submit(update_rows).result()
        if updated != len(items):  # a takeover changed some rows first (it waits for this update otherwise)
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
                row[0]: row[1:]
                for row in select_in(session, statement, Task.pk, [i.recorded_task.pk for i in items])
            }

        rows = self._transaction(look, "looking up the tasks of a chunk")
        remaining = []
        for item in items:
            status, stage, lease_pk = rows.get(item.recorded_task.pk, (None, None, None))
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
        lost = [item.recorded_task.pk for item in items if item.lost]
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


__all__ = ["CLAIM_ATTEMPTS", "Recorder"]
