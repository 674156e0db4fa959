"""The statements that record what a chunk of tasks produced: result rows, output files, final task rows.

Used by :meth:`astra_provider.database.recorder.Recorder.persist`, inside its transaction: result rows are
inserted first, each under a new ``output_interface`` key, so that each task row is then updated once, with
its status, timings, error, return value and first ``output_pk`` together (one ``UPDATE`` per chunk).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from astra_provider.database.astradb import Base, OutputInterface, Status, TaskOutputDataProduct
from astra_provider.database.recording import (
    Pipeline,
    allocate_pks,
    get_or_create_data_products,
    insert_rows,
    prepare_insert,
)
from astra_provider.utils import to_jsonable

if TYPE_CHECKING:
    from astra_provider.database.items import OutputFile, ResultRow, TaskItem

log = logging.getLogger(__name__)


def store_results(session: Session, pipeline: Pipeline, results: Sequence[ResultRow]) -> dict[int, int]:
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
            {**columns, "output_pk": output_pk, "task_pk": item.recorded_task.pk}
        )
        first_output.setdefault(item.recorded_task.pk, output_pk)
    for model, rows in by_model.items():
        pipeline.submit(prepare_insert(session, model.__table__, rows))
    return first_output


def store_output_data_products(session: Session, outputs: Sequence[OutputFile]) -> None:
    """The data product rows of the output files (created if new) and their links to the tasks."""
    products = get_or_create_data_products(session, [spec for _, spec in outputs])
    insert_rows(
        session,
        TaskOutputDataProduct.__table__,
        [
            {"task_pk": item.recorded_task.pk, "data_product_pk": product.pk}
            for (item, _), product in zip(outputs, products, strict=True)
        ],
    )


def final_rows(
    items: Sequence[TaskItem], overhead: Mapping[int, float], first_output: Mapping[int, int]
) -> list[dict[str, Any]]:
    """The final ``task`` columns of each task that ran: status, timings, error, result, first output.

    A failed task releases its claim (``claim`` NULL), so that a later run can claim it again.

    :param overhead: each task's share of its bundle's overhead, by ``id(item)``.
    """
    completed, failed = int(Status.COMPLETED), int(Status.FAILED)
    rows = []
    for item in items:
        times, task = item.times, item.recorded_task
        try:
            result = to_jsonable(item.result)
        except TypeError:
            log.warning(
                "task %s returned a %s, which is not stored",
                task.pk,
                type(item.result).__name__,
            )
            result = None
        share = overhead.get(id(item), 0.0)
        error_stage, error_message, error_traceback = item.error or (None, None, None)
        rows.append(
            {
                "pk": task.pk,
                "status_code": failed if item.error else completed,
                "time_pre_execute": times["pre_execute"],
                "time_execute": times["execute"],
                "time_post_execute": times["post_execute"],
                "time_bundle_overhead": share,
                "duration": sum(times.values()) + share,
                "error_stage": error_stage,
                "error_message": error_message,
                "error_traceback": error_traceback,
                "result": result,
                "output_pk": first_output.get(task.pk),
                "claim": None if item.error else task.claim,
            }
        )
    return rows


__all__ = ["final_rows", "store_output_data_products", "store_results"]
