"""``astra demo``: tasks and a bundle on the embedded default, then what the database recorded."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import select

from astra_provider.contrib.examples import GreedyPrimes, RandomNumberGeneratorTask, ScaledSum
from astra_provider.database import get_database_url, session_scope
from astra_provider.database.astradb import Bundle, Task


def _print_tasks(pks: list[int]) -> None:
    with session_scope() as session:
        tasks = session.scalars(select(Task).where(Task.pk.in_(pks)).order_by(Task.pk)).all()
    print(f"  {'pk':>4}  {'task':<26} {'status':<10} {'duration/s':>10}  result / error")
    for task in tasks:
        outcome = task.error_message if task.error_message else str(task.result)[:40]
        duration = f"{task.duration:.6f}" if task.duration is not None else "-"
        print(f"  {task.pk:>4}  {task.task_id[:26]:<26} {task.status.name:<10} {duration:>10}  {outcome}")


def main(argv: Sequence[str] = ()) -> int:
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(message)s")
    print(f"astra database: {get_database_url()}\n")

    primes = GreedyPrimes(max_value=30)
    print("GreedyPrimes(max_value=30).execute() ->", primes.execute())
    bundle = ScaledSum(offset=100, value=(1, 2, None, 4))
    print("ScaledSum bundle of 4 (one bad value) ->", bundle.execute())
    rng = RandomNumberGeneratorTask(seed=3, draws=2)
    rng.execute()

    pks = [t.pk for instance in (primes, bundle, rng) for t in instance.tasks]
    print("\nRecorded tasks:")
    _print_tasks(pks)
    with session_scope() as session:
        recorded = session.get(Bundle, bundle.bundle.pk) if bundle.bundle else None
    if recorded is not None:
        print(
            f"\nBundle {recorded.pk}: {recorded.n_tasks} tasks, execute took {recorded.time_execute:.6f} s "
            f"of which {recorded.time_execute_overhead:.6f} s was bundle overhead"
        )

    again = GreedyPrimes(max_value=30)
    again.execute()
    print(
        f"\nGreedyPrimes(max_value=30) again: {again.summary()['skipped']} task skipped as already done."
    )
    print("Inspect a task with:  astra show", pks[0])
    return 0
