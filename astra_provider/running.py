"""What :meth:`TaskInstance.execute() <astra_provider.base.TaskInstance.execute>` does, step by step.

1. **Claim.** The tasks are claimed in the astra database under this process's lease
   (:class:`~astra_provider.database.recorder.Recorder`): a task already completed (same ``task_id``, same
   version) is *already done*; a task that another live run is executing is *held elsewhere* and not run
   here; a task whose previous run stopped (its lease is stale) is taken over.
2. **Run, chunk by chunk.** ``pre_execute()`` runs once for every claimed task. Then the tasks run in
   *chunks* of ``chunk_size`` tasks (``ASTRA_CHUNK_SIZE``, default 1,000): ``execute()`` and
   ``post_execute()`` run once per chunk, seeing only that chunk's tasks (``iterable()``,
   ``read_inputs()`` and the per-task parameter tuples), and the chunk's outcome is recorded before the
   next chunk starts. A process that is killed loses at most the chunk in flight; its claims lapse with its
   lease, and a later run takes them over.
3. **Wait** (``wait=True`` or a number of seconds): tasks held elsewhere are looked at again until they
   complete (their stored result is used), or their run fails or stops (they are claimed and run here).

An exception while a task is processed (between two steps of ``iterable()``) fails that task alone, and the
stage runs again for the chunk's other tasks; an exception outside ``iterable()`` fails the chunk's
remaining tasks (in ``pre_execute()``: every task). Any other interruption (``KeyboardInterrupt``, debug
mode) records the tasks not finished as failed before it propagates.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any

from astra_provider.database.items import STAGES, OutputFile, ResultRow, TaskItem
from astra_provider.database.recorder import Recorder
from astra_provider.database.retry import DatabaseUnavailableError
from astra_provider.sources.registration import input_identifiers, link_task_sources
from astra_provider.utils import gc_paused

if TYPE_CHECKING:
    from astra_provider.base import TaskInstance
    from astra_provider.database.astradb import DataProduct

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1000


def default_chunk_size() -> int:
    """Tasks per chunk (``ASTRA_CHUNK_SIZE``, default 1,000)."""
    value = os.environ.get("ASTRA_CHUNK_SIZE", "").strip()
    if not value:
        return DEFAULT_CHUNK_SIZE
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"ASTRA_CHUNK_SIZE must be a positive number of tasks, got {value!r}")
    return int(value)


@dataclass(eq=False)
class Attempt:
    """Book-keeping for one run of one stage over the tasks in scope."""

    stage: str
    in_progress: TaskItem | None = None
    yielded: list[TaskItem] = field(default_factory=list)
    times: dict[int, float] = field(default_factory=dict)
    results: list[ResultRow] = field(default_factory=list)
    outputs: list[OutputFile] = field(default_factory=list)


class Execution:
    """One call of ``execute()`` on a task instance; see the module docstring."""

    def __init__(
        self,
        instance: TaskInstance,
        kwargs: dict[str, Any],
        *,
        force: bool,
        debug: bool,
        verbose: bool,
        wait: bool | float,
        chunk_size: int | None,
    ) -> None:
        self.instance = instance
        self.kwargs = kwargs
        self.force, self.debug, self.verbose = force, debug, verbose
        self.timeout = None if wait is True else float(wait or 0.0)  # None: no limit; 0: do not wait
        self.chunk_size = chunk_size or default_chunk_size()
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tasks, got {chunk_size!r}")
        self.recorder = Recorder(type(instance), instance._bundled)
        self.name = type(instance).__name__
        self.stage_times = dict.fromkeys(STAGES, 0.0)
        self.outputs: list[OutputFile] = []  # the files written, linked to their sources at the end
        instance._identified = {}  # data product pk -> source identifiers read by read_inputs
        self._headers: dict[int, Any] = {}  # data product pk -> its header's identifiers, read early

    def run(self) -> None:
        items = self.instance._items
        for item in items:
            item.reset()
        with _verbose_logging(self.verbose), self.recorder.lease.hold():
            try:
                self._rounds(items)
            finally:
                self.recorder.release()

    def _rounds(self, items: list[TaskItem]) -> None:
        """Claim and run; with ``wait``, again for the tasks held elsewhere until none is left."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        to_claim: Sequence[TaskItem] = items
        while True:
            if to_claim:
                self.recorder.record(to_claim, force=self.force, while_waiting=self._read_headers)
                self._report_claims(to_claim)
                claimed = [item for item in to_claim if item.runnable]
                if claimed:
                    self._run(claimed)
            held = [item for item in items if item.elsewhere]
            if not held or self.timeout == 0:
                break
            if deadline is not None and time.monotonic() >= deadline:
                log.warning("%s: stopped waiting for %d task(s) held elsewhere", self.name, len(held))
                break
            time.sleep(min(2.0, self.recorder.lease.seconds / 4))
            to_claim = self.recorder.refresh_held(held)

    def _report_claims(self, items: Sequence[TaskItem]) -> None:
        done = sum(item.already_done for item in items)
        held = [item for item in items if item.elsewhere]
        claimed = len(items) - done - len(held)
        level = logging.INFO if done or held or self.verbose else logging.DEBUG
        log.log(level, "%s: %d task(s): %d to run, %d already done, %d held by other runs",
                self.name, len(items), claimed, done, len(held))  # fmt: skip
        if held:
            owners = ", ".join(sorted({item.elsewhere for item in held if item.elsewhere})[:3])
            then = "waiting for them" if self.timeout != 0 else "not run here (execute(wait=True) waits)"
            log.info("%s: %d task(s) are being run by %s; %s", self.name, len(held), owners, then)

    # Running the claimed tasks -------------------------------------------------------------------------

    def _run(self, pending: list[TaskItem]) -> None:
        instance, recorder = self.instance, self.recorder
        stage = STAGES[0]
        try:
            instance._scope = pending
            stage_start = perf_counter()
            carried = self._run_stage(stage, pending)
            pre_time = perf_counter() - stage_start
            self.stage_times[stage] += pre_time
            share = self._pre_execute_share(pending, pre_time)
            recorder.persist([i for i in pending if i.failed], [], [], {})
            active = [item for item in pending if not item.failed]
            for number, start in enumerate(range(0, len(active), self.chunk_size), start=1):
                if recorder.lease.lapsed():  # frozen or cut off for longer than the lease: still ours?
                    recorder.drop_lost(active[start:])
                chunk = [item for item in active[start : start + self.chunk_size] if not item.lost]
                if not chunk:
                    continue
                if len(active) > len(chunk):
                    log.log(self._level, "%s: chunk %d (%d task(s))", self.name, number, len(chunk))
                instance._scope = chunk
                results, outputs = _belonging_to(chunk, carried)
                chunk_overhead = 0.0
                for stage in STAGES[1:]:
                    stage_start = perf_counter()
                    attempt = self._run_stage(stage, chunk)
                    elapsed = perf_counter() - stage_start
                    self.stage_times[stage] += elapsed
                    chunk_overhead += max(elapsed - sum(item.times[stage] for item in chunk), 0.0)
                    results.extend(attempt.results)
                    outputs.extend(attempt.outputs)
                overhead = {id(item): share.get(id(item), 0.0) for item in chunk}
                if len(pending) > 1:
                    overhead = {key: value + chunk_overhead / len(chunk) for key, value in overhead.items()}
                recorder.persist(chunk, results, outputs, overhead)
                self.outputs.extend(outputs)
        except DatabaseUnavailableError:
            raise  # nothing more can be recorded: the claims lapse with the lease, and a later run retries
        except BaseException as error:  # debug mode, KeyboardInterrupt, SystemExit: nothing stays running
            message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            for item in pending:
                if not item.failed and not item.recorded and not item.lost:
                    instance._mark_failed(item, stage, f"not completed: the run stopped ({message})", "")
            self._finish(pending)
            raise
        else:
            self._finish(pending)
        finally:
            instance._attempt = None
            instance._scope = None

    def _finish(self, pending: list[TaskItem]) -> None:
        """Record the failed tasks not recorded yet, and the bundle's stage times; link the inputs and
        outputs to their sources."""
        self.recorder.persist([i for i in pending if i.failed], [], [], {})
        overheads = {s: max(self.stage_times[s] - sum(i.times[s] for i in pending), 0.0) for s in STAGES}
        self.recorder.finish(self.stage_times, overheads)
        with gc_paused():
            self._link_sources(pending)

    def _read_headers(self, products: list[DataProduct], written: Callable[[], bool]) -> None:
        """The header identifiers of the inputs the claim registered (they have no source yet), for
        :meth:`_link_sources`: read while the database writes the claim, and only until it has (the
        others are read after the run if no reader read them)."""
        for product in products:
            if written():
                break
            try:
                self._headers[product.pk] = input_identifiers(product)
            except Exception:  # read again after the run, which reports it as before (not in the claim)
                break

    def _link_sources(self, pending: list[TaskItem]) -> None:
        link_task_sources(
            {item.task.pk: item.data_products for item in pending if item.task is not None},
            self.instance._identified,
            [
                (item.task.pk, spec)
                for item, spec in self.outputs
                if not item.failed and item.task is not None
            ],
            self._headers,
        )

    @property
    def _level(self) -> int:
        return logging.INFO if self.verbose else logging.DEBUG

    def _pre_execute_share(self, pending: list[TaskItem], elapsed: float) -> dict[int, float]:
        if len(pending) < 2:
            return {}
        overhead = max(elapsed - sum(item.times["pre_execute"] for item in pending), 0.0)
        return {id(item): overhead / len(pending) for item in pending}

    def _run_stage(self, stage: str, scope: list[TaskItem]) -> Attempt:
        """Run one stage over the tasks of ``scope``, failing and retrying around per-task errors."""
        instance = self.instance
        function: Callable[..., Any] = getattr(instance, "_execute_impl" if stage == "execute" else stage)
        single = len(instance._items) == 1
        collected = Attempt(stage)
        log.log(self._level, "%s: %s (%d task(s))", self.name, stage, len(instance._active_items()))
        start = perf_counter()
        while True:
            active = instance._active_items()
            if not active:
                break
            attempt = instance._attempt = Attempt(stage)
            try:
                value = function(**self.kwargs) if stage == "execute" else function()
            except Exception as error:
                self._failed_in_stage(stage, attempt, error)
                if attempt.in_progress is None:
                    break
                continue
            for item in active:
                item.times[stage] = attempt.times.get(id(item), 0.0)
            if stage == "execute":
                _assign_results(instance, value, attempt, active)
            collected.results.extend(attempt.results)
            collected.outputs.extend(attempt.outputs)
            break
        instance._attempt = None
        elapsed = perf_counter() - start
        if single:
            for item in scope:
                item.times[stage] = elapsed
        log.log(self._level, "%s: %s took %.3f s", self.name, stage, elapsed)
        return collected

    def _failed_in_stage(self, stage: str, attempt: Attempt, error: Exception) -> None:
        instance = self.instance
        tb = traceback.format_exc()
        message = f"{type(error).__name__}: {error}"
        culprit = attempt.in_progress
        if culprit is None:
            for item in instance._active_items():
                instance._mark_failed(item, stage, message, tb)
            if self.debug:
                raise error
            return
        instance._mark_failed(culprit, stage, message, tb)
        if self.debug:
            raise error
        log.warning(
            "%s: task %s failed in %s (%s); running %s again for the other tasks",
            self.name,
            None if culprit.task is None else culprit.task.pk,
            stage,
            message,
            stage,
        )


def _belonging_to(chunk: list[TaskItem], carried: Attempt) -> tuple[list[ResultRow], list[OutputFile]]:
    """The results and outputs that ``pre_execute()`` wrote for the tasks of ``chunk``."""
    members = {id(item) for item in chunk}
    return (
        [row for row in carried.results if id(row[0]) in members],
        [output for output in carried.outputs if id(output[0]) in members],
    )


def _assign_results(instance: TaskInstance, value: Any, attempt: Attempt, active: list[TaskItem]) -> None:
    """Give each task its value from what ``execute()`` returned (one value per task of the chunk)."""
    if len(instance._items) == 1:
        active[0].result = value
        return
    order = attempt.yielded or active
    survivors = [item for item in order if not item.failed]
    if isinstance(value, list | tuple) and len(value) in (len(order), len(survivors)):
        targets = order if len(value) == len(order) else survivors
        for item, result in zip(targets, value, strict=True):
            if not item.failed:
                item.result = result
    elif value is not None:
        log.warning(
            "%s.execute() returned %s, not one value per task; results not stored per task",
            type(instance).__name__,
            type(value).__name__,
        )


@contextmanager
def _verbose_logging(enabled: bool) -> Iterator[None]:
    """With ``enabled``, show this package's INFO messages (on stderr if nothing else shows them)."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("astra_provider")
    level, handler = logger.level, None
    if not logger.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s astra %(message)s"))
        logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)


__all__ = ["DEFAULT_CHUNK_SIZE", "Attempt", "Execution", "default_chunk_size"]
