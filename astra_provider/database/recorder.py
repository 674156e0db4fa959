"""The provenance of task executions: the one place that writes the rows of executed tasks.

A :class:`Recorder` records the tasks of one :class:`~astra_provider.base.TaskInstance` (one task, or a
bundle) in two steps around their execution:

1. :meth:`Recorder.record` resolves the input data products (creating their rows), computes each task's
   identity (:func:`task_id`), finds the tasks whose completed twin is already recorded (skip-if-done),
   and inserts the others as ``RUNNING``, with their parameters, input data products and bundle;
2. :meth:`Recorder.finish`, once the stages have run, stores the result rows and output data products,
   and updates every task with its status, timings, error and return value (one ``UPDATE``).

Each step is one transaction of a few bulk statements (:mod:`astra_provider.database.bulk`,
:mod:`astra_provider.database.recording`), run on a :class:`~astra_provider.database.bulk.Pipeline` worker
while this thread builds the next statement.
The task instance owns the execution; the recorder owns every statement about it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from astra_provider._version import __version__
from astra_provider.database import session_scope
from astra_provider.database.astradb import (
    Base,
    Bundle,
    DataProduct,
    OutputInterface,
    Status,
    Task,
    TaskInputDataProduct,
    TaskOutputDataProduct,
    TaskParameter,
)
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
from astra_provider.utils import to_json_value, to_jsonable

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
    failed: bool = False
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    result: Any = None
    error: tuple[str, str, str] | None = None  # (stage, message, traceback)

    def reset(self) -> None:
        """Forget the outcome of a previous execution."""
        self.failed, self.error, self.result = False, None, None
        self.times = dict.fromkeys(STAGES, 0.0)


ResultRow = tuple[TaskItem, type[Base], dict[str, Any]]
"""A row of a result table written by a task: ``(task, model, columns)``."""

OutputFile = tuple[TaskItem, DataProductSpec]
"""A file written by a task: ``(task, data product)``."""


# Identity ----------------------------------------------------------------------------------------------


def encode_parameter_value(value: Any) -> str:
    """The stored form of a parameter value: its canonical JSON."""
    return canonical_json_fast(value)


def task_id(task_class: type, parameters: Mapping[str, str], identities: Sequence[str]) -> str:
    """``{class name}_{stable_hash([module, qualname, parameters, data product identities])}``.

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
    return f"{task_class.__name__}_" + hash_json(f"[{module},{qualname},{{{pairs}}},[{inputs}]]")


# The recorder ------------------------------------------------------------------------------------------


class Recorder:
    """Records the tasks of one task instance; see the module docstring.

    :param task_class: the ``TaskInstance`` subclass of the tasks.
    :param items: the tasks (their ``task``, ``data_products`` and ``already_done`` are set by
        :meth:`record`).
    :param bundled: the values of the bundled parameters, shared by every task.
    """

    def __init__(self, task_class: type, items: Sequence[TaskItem], bundled: Mapping[str, Any]) -> None:
        self.task_class = task_class
        self.items = list(items)
        self.bundled = dict(bundled)
        self.bundle: Bundle | None = None
        """The bundle row of the tasks inserted by :meth:`record` (None for fewer than two)."""

    # Before the run ------------------------------------------------------------------------------

    def record(self, *, force: bool) -> None:
        """Create (or find) the rows of the tasks, in bulk, and set each item's ``task``.

        A task whose completed twin (same ``task_id``, same version) is recorded gets that twin as its
        ``task``, its stored result, and ``already_done``; with ``force``, every task gets a new row.
        """
        items = self.items
        with _gc_paused(), session_scope() as session, Pipeline.for_session(session) as pipeline:
            resolved = pipeline.submit(self._resolve_data_products, session)
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
            twins = {} if force else self._completed_twins(session, pipeline, task_ids)
            new_items = []
            for item, identity, parameters in zip(items, task_ids, encoded, strict=True):
                twin = twins.get(identity)
                if twin is not None:
                    item.task, item.already_done, item.result = twin, True, twin.result
                    twin.__dict__["_parameters"] = item.parameters
                else:
                    item.already_done = False
                    new_items.append((item, identity, parameters))
            self._insert_tasks(session, pipeline, new_items)
            resolved.result()

    def _resolve_data_products(self, session: Session) -> None:
        """Set each item's ``data_products``: rows for its specs (created if new) and its pks."""
        specs = [dp for item in self.items for dp in item.inputs if isinstance(dp, DataProductSpec)]
        pks = {dp for item in self.items for dp in item.inputs if isinstance(dp, int)}
        products = get_or_create_data_products(session, specs) if specs else []
        by_identity = {spec.identity: product for spec, product in zip(specs, products, strict=True)}
        by_pk = {dp.pk: dp for (dp,) in select_in(session, select(DataProduct), DataProduct.pk, sorted(pks))}
        missing = sorted(pks - set(by_pk))
        if missing:
            raise LookupError(
                f"no data product with pk {', '.join(map(str, missing[:10]))} in the astra database"
            )
        for item in self.items:
            item.data_products = [
                by_identity[dp.identity]
                if isinstance(dp, DataProductSpec)
                else by_pk[dp]
                if isinstance(dp, int)
                else dp
                for dp in item.inputs
            ]

    def _completed_twins(self, session: Session, pipeline: Pipeline, task_ids: list[str]) -> dict[str, Task]:
        """The completed tasks of this version with one of ``task_ids``; the most recent one of each."""
        completed = select(Task).where(Task.version == __version__, Task.status_code == Status.COMPLETED)
        found = pipeline.submit(select_in, session, completed.order_by(Task.pk), Task.task_id, set(task_ids))
        return {task.task_id: task for (task,) in found.result()}  # in pk order: the last one wins

    def _insert_tasks(
        self, session: Session, pipeline: Pipeline, new_items: list[tuple[TaskItem, str, dict[str, str]]]
    ) -> None:
        """Insert the new tasks with their parameters, input data products and bundle (a few statements).

        Tasks are inserted ``RUNNING``: they are executed right away, so this is their state until
        :meth:`finish` writes their final status, timings and result in one ``UPDATE``.
        """
        self.bundle = None
        if not new_items:
            return
        now = datetime.now(UTC)
        parameter_pks = pipeline.submit(
            get_or_create_parameters,
            session,
            sorted({pair for _, _, parameters in new_items for pair in parameters.items()}),
        )
        bundle = None
        if len(new_items) > 1:
            bundle = Bundle(
                task_module=self.task_class.__module__,
                task_name=self.task_class.__qualname__,
                bundled_parameters=to_json_value(self.bundled),  # JSON(B): inf, nan, -0.0 tagged
                n_tasks=len(new_items),
                created=now,
            )
            pipeline.submit(_add_and_flush, session, bundle)
        pks = pipeline.submit(allocate_pks, session, Task.__table__, len(new_items)).result()
        # The bundle was flushed (it has its pk) by the worker before it allocated the task pks.
        self._insert_task_rows(session, pipeline, new_items, pks, bundle, now)
        self._insert_links(session, pipeline, new_items, pks, parameter_pks.result())
        self.bundle = bundle

    def _insert_task_rows(
        self,
        session: Session,
        pipeline: Pipeline,
        new_items: list[tuple[TaskItem, str, dict[str, str]]],
        pks: list[int],
        bundle: Bundle | None,
        now: datetime,
    ) -> None:
        """Submit the ``INSERT`` of the task rows; give each item its (detached) ``Task`` record."""
        shared = {
            "task_module": self.task_class.__module__,
            "task_name": self.task_class.__qualname__,
            "version": __version__,
            "status_code": int(Status.RUNNING),
            "created": now,
            "modified": now,
        }
        if bundle is not None:
            shared["bundle_pk"] = bundle.pk
        rows = [{"pk": pk, "task_id": identity} for pk, (_, identity, _) in zip(pks, new_items, strict=True)]
        pipeline.submit(prepare_insert(session, Task.__table__, rows, same_for_all=shared))
        template = {**dict.fromkeys(c.name for c in Task.__table__.columns), **shared}
        for pk, (item, identity, _) in zip(pks, new_items, strict=True):
            item.task = build(
                Task, {**template, "pk": pk, "task_id": identity, "_parameters": item.parameters}
            )

    def _insert_links(
        self,
        session: Session,
        pipeline: Pipeline,
        new_items: list[tuple[TaskItem, str, dict[str, str]]],
        pks: list[int],
        parameter_pks: dict[tuple[str, str], int],
    ) -> None:
        """Insert the ``task_parameter`` and ``task_input_data_product`` rows; wait for them."""
        pipeline.submit(
            prepare_insert(
                session,
                TaskParameter.__table__,
                [
                    {"task_pk": pk, "parameter_pk": parameter_pks[pair]}
                    for pk, (_, _, parameters) in zip(pks, new_items, strict=True)
                    for pair in parameters.items()
                ],
            )
        )
        # The data products were resolved first: the worker runs in submission order.
        last = pipeline.submit(
            prepare_insert(
                session,
                TaskInputDataProduct.__table__,
                [
                    {"task_pk": pk, "data_product_pk": dp.pk}
                    for pk, (item, _, _) in zip(pks, new_items, strict=True)
                    for dp in item.data_products
                ],
            )
        )
        last.result()

    # After the run -------------------------------------------------------------------------------

    def finish(
        self,
        pending: Sequence[TaskItem],
        stage_times: Mapping[str, float],
        results: Sequence[ResultRow],
        outputs: Sequence[OutputFile],
    ) -> None:
        """Store statuses, timings, errors, results and output data products of the run, in bulk.

        Result rows are inserted first, so that each task's row is updated once, with its status, timings,
        error, return value and ``output_pk`` together (one ``UPDATE`` for the whole bundle).

        :param pending: the tasks that ran (not the ones already done).
        :param stage_times: the wall time of each stage, for all tasks together.
        """
        overheads = {
            stage: max(stage_times[stage] - sum(i.times[stage] for i in pending), 0.0) for stage in STAGES
        }
        overhead_share = sum(overheads.values()) / len(pending) if len(pending) > 1 else 0.0
        shared = {"time_bundle_overhead": overhead_share, "modified": datetime.now(UTC)}
        with _gc_paused(), session_scope() as session, Pipeline.for_session(session) as pipeline:
            first_output = self._store_results(session, pipeline, results)
            if outputs:
                pipeline.submit(_store_output_data_products, session, outputs)
            rows = []
            for item, row in _final_rows(pending, stage_times, overhead_share, first_output):
                _set_fields(item.task, **row, **shared)
                rows.append(row)
            pipeline.submit(prepare_update(session, Task.__table__, rows, same_for_all=shared))
            if self.bundle is not None:
                statement = (
                    update(Bundle)
                    .where(Bundle.pk == self.bundle.pk)
                    .values(
                        **{f"time_{s}": stage_times[s] for s in STAGES},
                        **{f"time_{s}_overhead": overheads[s] for s in STAGES},
                    )
                )
                pipeline.submit(session.execute, statement)
            pipeline.submit(lambda: None).result()  # the first error, if any, is raised here

    def _store_results(
        self, session: Session, pipeline: Pipeline, results: Sequence[ResultRow]
    ) -> dict[int, int]:
        """Insert result rows, each under a new ``output_interface`` key; return each task's first key."""
        if not results:
            return {}
        output_pks = pipeline.submit(allocate_pks, session, OutputInterface.__table__, len(results)).result()
        pipeline.submit(
            prepare_insert(
                session,
                OutputInterface.__table__,
                [
                    {"pk": pk, "table_name": model.__tablename__}
                    for pk, (_, model, _) in zip(output_pks, results, strict=True)
                ],
                same_for_all={"created": datetime.now(UTC)},
            )
        )
        by_model: dict[type[Base], list[dict[str, Any]]] = {}
        first_output: dict[int, int] = {}
        for (item, model, columns), output_pk in zip(results, output_pks, strict=True):
            by_model.setdefault(model, []).append(
                {**columns, "output_pk": output_pk, "task_pk": item.task.pk}
            )
            first_output.setdefault(item.task.pk, output_pk)
        for model, rows in by_model.items():
            pipeline.submit(prepare_insert(session, model.__table__, rows))
        return first_output


def _final_rows(
    pending: Sequence[TaskItem],
    stage_times: Mapping[str, float],
    overhead_share: float,
    first_output: Mapping[int, int],
) -> list[tuple[TaskItem, dict[str, Any]]]:
    """The final ``task`` columns of each task that ran: status, timings, error, result, first output."""
    bundle = len(pending) > 1
    completed, failed = int(Status.COMPLETED), int(Status.FAILED)
    rows = []
    for item in pending:
        times = item.times if bundle else stage_times
        try:
            result = to_jsonable(item.result)
        except TypeError:
            log.warning(
                "task %s returned a %s, which is not stored", item.task.pk, type(item.result).__name__
            )
            result = None
        error_stage, error_message, error_traceback = item.error or (None, None, None)
        rows.append(
            (
                item,
                {
                    "pk": item.task.pk,
                    "status_code": failed if item.error else completed,
                    "time_pre_execute": times["pre_execute"],
                    "time_execute": times["execute"],
                    "time_post_execute": times["post_execute"],
                    "duration": sum(times.values()) + overhead_share,
                    "error_stage": error_stage,
                    "error_message": error_message,
                    "error_traceback": error_traceback,
                    "result": result,
                    "output_pk": first_output.get(item.task.pk),
                },
            )
        )
    return rows


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


def _store_output_data_products(session: Session, outputs: Sequence[OutputFile]) -> None:
    products = get_or_create_data_products(session, [spec for _, spec in outputs])
    insert_rows(
        session,
        TaskOutputDataProduct.__table__,
        [
            {"task_pk": item.task.pk, "data_product_pk": product.pk}
            for (item, _), product in zip(outputs, products, strict=True)
        ],
    )


def _add_and_flush(session: Session, record: Base) -> None:
    session.add(record)
    session.flush()


def _set_fields(task: Task, **values: Any) -> None:
    """Set attributes of a ``Task`` built by :func:`build` (a detached record: no ORM events needed)."""
    task.__dict__.update(values)


__all__ = ["STAGES", "OutputFile", "Recorder", "ResultRow", "TaskItem", "encode_parameter_value", "task_id"]
