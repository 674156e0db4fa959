"""Claiming tasks: who runs what, decided in the database before anything runs.

A :class:`Claimer` makes one attempt at claiming the tasks of a task instance, in one transaction of a few
bulk statements (see :meth:`~astra_provider.database.recorder.Recorder.record`, which runs it and runs it
again after a conflict): it resolves the input data products, computes each task's identity
(:func:`task_id`), looks up the rows of the same tasks at this version (completed twins, claims of other
runs, stale claims to take over), and inserts the new tasks ``RUNNING`` with their claim, lease, parameters,
input data products and bundle. The version parameters are recorded once per version
(``astra.version_parameter``).
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from astra_provider._version import __version__
from astra_provider.database import get_engine
from astra_provider.database.astradb import (
    Bundle,
    DataProduct,
    Status,
    Task,
    TaskInputDataProduct,
    TaskParameter,
    VersionParameter,
    version_parameters,
)
from astra_provider.database.items import TaskItem
from astra_provider.database.leases import LeaseState, ProcessLease, lease_states, take_over
from astra_provider.database.recording import (
    DataProducts,
    DataProductSpec,
    Parameters,
    Pipeline,
    allocate_pks,
    build,
    canonical_json_fast,
    get_or_create_parameters,
    hash_json,
    insert_rows,
    prepare_insert,
    select_in,
    spec_key,
)
from astra_provider.database.text import clean_json
from astra_provider.utils import to_json_value

log = logging.getLogger(__name__)

_VERSIONS_RECORDED: set[tuple[str, int]] = set()
"""``(URL, id of its engine)`` of the databases where this process has recorded this version's parameters
(a new engine, e.g. after ``dispose_engines()`` and a new database at the same URL, looks again)."""


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
    return task_identifier(task_class)(parameters, identities)


def task_identifier(task_class: type) -> Callable[[Mapping[str, str], Sequence[str]], str]:
    """:func:`task_id` for one class, with what all its tasks share (family, module, name) made once."""
    encode = encode_parameter_value
    head = f"[{encode(task_class.__module__)},{encode(task_class.__qualname__)},"
    family = task_class.task_family() if hasattr(task_class, "task_family") else task_class.__name__
    prefix = f"{family}_"

    def identify(parameters: Mapping[str, str], identities: Sequence[str]) -> str:
        pairs = ",".join(f"{encode(name)}:{value}" for name, value in sorted(parameters.items()))
        inputs = ",".join(map(encode, identities))
        return prefix + hash_json(f"{head}{{{pairs}}},[{inputs}]]")

    return identify


class Claimer:
    """Claims the tasks of one task class; see the module docstring.

    :param bundled: the values of the bundled parameters, shared by every task.
    :param lease: this process's lease on the database ``url``.
    """

    def __init__(self, task_class: type, bundled: Mapping[str, Any], lease: ProcessLease, url: str) -> None:
        self.task_class = task_class
        self.name = task_class.__name__
        self.bundled = dict(bundled)
        self.lease = lease
        self.url = url
        self._version_pairs = [
            (k, encode_parameter_value(v)) for k, v in version_parameters(__version__).items()
        ]

    def version_parameters_recorded(self) -> bool:
        return (self.url, id(get_engine(self.url))) in _VERSIONS_RECORDED

    def record_version_parameters(self, session: Session) -> None:
        """The version parameters of this version: two ``parameter`` rows and their ``version_parameter``
        rows, recorded once per version (the view ``astra.task_parameter`` gives them to every task).

        Run in a transaction of its own, before the first claim of the process: concurrent processes then
        wait for each other only for this short transaction, not for each other's claims.
        """
        pks = get_or_create_parameters(session, self._version_pairs)
        rows = [{"version": __version__, "parameter_pk": pk} for pk in sorted(pks.values())]
        insert_rows(
            session, VersionParameter.__table__, rows, on_conflict_do_nothing=("version", "parameter_pk")
        )
        session.commit()
        _VERSIONS_RECORDED.add((self.url, id(get_engine(self.url))))

    def claim(
        self,
        session: Session,
        items: list[TaskItem],
        force: bool,
        inserted_before: set[int],
        while_waiting: Callable[[list[DataProduct], Callable[[], bool]], None] | None = None,
    ) -> Bundle | None:
        """One attempt at claiming ``items``, in ``session``'s transaction; the bundle row of the new tasks.

        :param inserted_before: the pks of the rows that earlier attempts inserted (an attempt whose commit
            was not acknowledged may have committed them); the pks of this attempt are added.
        :param while_waiting: called with the data products this attempt inserted and a function that
            tells whether the database has written everything, once every statement is sent: client work
            for the time the database writes the tasks (it should stop when they are written).
        """
        for item in items:
            item.task, item.already_done, item.elsewhere, item.result = None, False, None, None
        # The client builds each statement while the worker thread executes the previous ones (see Pipeline)
        with Pipeline.for_session(session) as pipeline:
            products = DataProducts(
                session, [dp for i in items for dp in i.inputs if isinstance(dp, DataProductSpec)]
            )
            resolved = self._resolve_data_products(session, pipeline, items, products)
            # Each parameter value is encoded once: for the task's identity and for its parameter rows.
            encoded = [
                {name: encode_parameter_value(value) for name, value in item.parameters.items()}
                for item in items
            ]
            if any(isinstance(dp, int) for item in items for dp in item.inputs):
                resolved()  # the identity of a data product given by pk is in the database
                identities = [[dp.identity for dp in item.data_products] for item in items]
            else:  # a spec has the identity of the row it resolves to (same release, filetype, hash)
                identities = [
                    [dp.identity for dp in item.inputs if not isinstance(dp, int)] for item in items
                ]
            identify = task_identifier(self.task_class)
            task_ids = [
                identify(parameters, ids) for parameters, ids in zip(encoded, identities, strict=True)
            ]
            existing = self._existing(session, pipeline, task_ids)
            # Built while the look-ups run, and used as is when every task is new (a first run)
            parameters = Parameters(session, sorted({pair for values in encoded for pair in values.items()}))
            found = existing.result()
            new_items = self._sort_out(session, items, task_ids, encoded, found, force, inserted_before)
            if len(new_items) < len(items):
                pairs = {pair for _, _, values in new_items for pair in values.items()}
                parameters = Parameters(session, sorted(pairs))
            bundle = self._insert_tasks(
                session, pipeline, new_items, parameters, resolved, force, inserted_before
            )
            resolved()
            written = pipeline.submit(lambda: None)
            if while_waiting is not None:
                while_waiting(products.inserted(), written.done)
            written.result()  # the first error, if any, is raised here
        if bundle is None:  # an earlier attempt that did commit inserted these tasks, and their bundle
            bundle_pks = {
                item.task.bundle_pk
                for item in items
                if item.task is not None and item.task.pk in inserted_before and item.task.bundle_pk
            }
            bundle = session.get(Bundle, min(bundle_pks)) if bundle_pks else None
        return bundle

    def _resolve_data_products(
        self, session: Session, pipeline: Pipeline, items: Sequence[TaskItem], products: DataProducts
    ) -> Callable[[], None]:
        """Get or create the rows of the items' specs (``products``) and look up their pks, in the worker;
        the function returned sets each item's ``data_products`` (in the caller's thread)."""
        pks = sorted({dp for item in items for dp in item.inputs if isinstance(dp, int)})
        executed = pipeline.submit(products.execute)
        by_pk = pipeline.submit(select_in, session, select(DataProduct), DataProduct.pk, pks)

        def resolve() -> None:
            executed.result()
            _set_data_products(items, products.products(), {dp.pk: dp for (dp,) in by_pk.result()})

        return functools.cache(resolve)

    def _existing(self, session: Session, pipeline: Pipeline, task_ids: list[str]) -> Future:
        """The rows of these tasks at this version that are completed or hold the claim, in pk order (a
        future of a dict by ``task_id``)."""
        statement = select(Task).where(
            Task.version == __version__, or_(Task.status_code == Status.COMPLETED, Task.claim == 1)
        )

        def look_up() -> dict[str, list[Task]]:
            existing: dict[str, list[Task]] = {}
            for (task,) in select_in(session, statement.order_by(Task.pk), Task.task_id, set(task_ids)):
                existing.setdefault(task.task_id, []).append(task)
            return existing

        return pipeline.submit(look_up)

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
        states = lease_states(
            session,
            [h.lease_pk for h in holders.values() if h is not None],  # None: no lease, skipped
        )
        new_items: list[tuple[TaskItem, str, dict[str, str]]] = []
        stale: dict[int, str | None] = {}
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
                state = states.get(holder.lease_pk) if holder.lease_pk is not None else None
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
        parameters: Parameters,
        resolve: Callable[[], None],
        force: bool,
        inserted_before: set[int],
    ) -> Bundle | None:
        """Send the inserts of the new tasks with their parameters, input data products and bundle (a few
        statements; the caller waits for them).

        :param parameters: the new tasks' parameter values (prepared, not executed).
        :param resolve: sets the items' ``data_products`` (see :meth:`_resolve_data_products`).

        On PostgreSQL, a claim that a concurrent run inserted since the look-up makes the insert fail on the
        unique index (after that run commits): :meth:`record` then runs the transaction again, and finds
        that claim. SQLite transactions take the write lock when they begin, so the rows read above cannot
        change before the insert.
        """
        if not new_items:
            return None
        now = datetime.now(UTC)
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
        allocated = pipeline.submit(allocate_pks, session, Task.__table__, len(new_items))
        parameters_done = pipeline.submit(parameters.execute)  # the task rows are built while this runs
        pks = allocated.result()
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
        resolve()
        parameters_done.result()
        links = self._link_rows(new_items, pks, parameters.pks())
        for rows, table in zip(links, (TaskParameter.__table__, TaskInputDataProduct.__table__), strict=True):
            pipeline.submit(prepare_insert(session, table, rows))
        template = {**dict.fromkeys(c.name for c in Task.__table__.columns), **shared}
        for pk, (item, tid, _) in zip(pks, new_items, strict=True):
            item.task = build(Task, {**template, "pk": pk, "task_id": tid, "_parameters": item.parameters})
        return bundle

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

    def look_again(self, session: Session, held: list[TaskItem]) -> list[TaskItem]:
        """Tasks held elsewhere, looked at again: completed ones become already done (with the stored
        result); the ones whose holder failed or stopped are returned, to be claimed again."""
        rows = {
            t.pk: t for (t,) in select_in(session, select(Task), Task.pk, [i.recorded_task.pk for i in held])
        }
        states = lease_states(session, [t.lease_pk for t in rows.values()])
        free = []
        for item in held:
            row = rows.get(item.recorded_task.pk)
            if row is not None and row.status_code == Status.COMPLETED:
                item.task, item.already_done, item.result, item.elsewhere = row, True, row.result, None
                row.__dict__["_parameters"] = item.parameters
            elif row is None or row.status_code != Status.RUNNING or _stale(states.get(row.lease_pk)):
                free.append(item)
        return free


def _stale(state: LeaseState | None) -> bool:
    return state is None or state.stale


def _set_data_products(
    items: Sequence[TaskItem],
    by_key: Mapping[tuple[str, str, str], DataProduct],
    by_pk: Mapping[int, DataProduct],
) -> None:
    missing = sorted({dp for item in items for dp in item.inputs if isinstance(dp, int)} - set(by_pk))
    if missing:
        raise LookupError(
            f"no data product with pk {', '.join(map(str, missing[:10]))} in the astra database"
        )
    for item in items:
        item.data_products = [
            by_key[spec_key(dp)]
            if isinstance(dp, DataProductSpec)
            else by_pk[dp]
            if isinstance(dp, int)
            else dp
            for dp in item.inputs
        ]


def _add_and_flush(session: Session, record: Bundle) -> None:
    session.add(record)
    session.flush()


__all__ = ["Claimer", "encode_parameter_value", "task_id", "task_identifier"]
