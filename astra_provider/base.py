"""Tasks: parameters, bundles, execution with provenance.

A task is a :class:`TaskInstance` subclass with :class:`Parameter` class attributes and an ``execute()``
method (optionally ``pre_execute()`` and ``post_execute()``)::

    class GreedyPrimes(TaskInstance):
        min_value = Parameter(default=2)
        max_value = Parameter()

        def execute(self):
            ...

    GreedyPrimes(max_value=30).execute()

Calling ``execute()`` runs ``pre_execute``, ``execute`` and ``post_execute`` and records in the astra
database the task, its parameters (defaults included), its input data products, the package version, the
time of each stage, its status, its error if it failed, and its return value.

**Bundles.** One instance can hold many tasks that share their *bundled* parameters (``Parameter(bundled=
True)``), so that an expensive overhead (loading a model) is paid once. The number of tasks is the length of
``input_data_products`` when it is a list (one task per data product; a nested list gives several products
to one task), or the length of the tuples given for non-bundled parameters. A scalar value is used by every
task. ``TupleParameter`` and ``DictParameter`` values are never split. Iterate with :meth:`iterable`.

**Identity.** A task is identified by its class, its parameters and its input data products; a stable hash of
those is its ``task_id``. The package version is not part of ``task_id`` (so one analysis can be compared
across versions) but it is part of *skip-if-done*: executing a task whose twin (same ``task_id``, same
version) already completed returns the stored result without running it again; ``force=True`` runs it.

**Failures.** An exception while a task of a bundle is being processed (between two steps of
``iterable()``) fails that task alone: its status, stage, message and traceback are recorded, and the stage
is run again for the remaining tasks. An exception outside ``iterable()`` fails every remaining task. Tasks
that handle their own errors can call :meth:`TaskInstance.fail`.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import logging
import os
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from time import perf_counter
from typing import Any, ClassVar

from sqlalchemy import select, update

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
from astra_provider.utils import canonical_json, to_jsonable

log = logging.getLogger(__name__)

STAGES = ("pre_execute", "execute", "post_execute")
_MISSING = object()


class TaskFailedError(RuntimeError):
    """Every task of an execution failed; ``failures`` lists ``(task, stage, message)``."""

    def __init__(self, message: str, failures: list[tuple[Task, str, str]]):
        super().__init__(message)
        self.failures = failures


# Parameters --------------------------------------------------------------------------------------------


class Parameter:
    """A task parameter, declared as a class attribute.

    :param default: the value used when none is given; without it the parameter is required.
    :param bundled: tasks can only share a bundle if their bundled parameters are equal.
    :param description: shown in documentation and in the Airflow trigger form.
    """

    splittable: ClassVar[bool] = True

    def __init__(self, default: Any = _MISSING, *, bundled: bool = False, description: str = ""):
        self.default = default
        self.bundled = bundled
        self.description = description
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: TaskInstance | None, owner: type) -> Any:
        if instance is None:
            return self
        return instance._parameter_value(self.name)

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def normalize(self, value: Any) -> Any:
        """Convert a value (possibly decoded from JSON) to the type the task expects."""
        return value

    def __repr__(self) -> str:
        default = "required" if self.required else f"default={self.default!r}"
        return f"{type(self).__name__}({default}, bundled={self.bundled})"


class TupleParameter(Parameter):
    """A parameter whose value is a tuple; it is never split across the tasks of a bundle."""

    splittable = False

    def normalize(self, value: Any) -> Any:
        return tuple(value) if isinstance(value, list | tuple) else value


class DictParameter(Parameter):
    """A parameter whose value is a dict; it is never split across the tasks of a bundle."""

    splittable = False


def _is_sequence(value: Any) -> bool:
    return isinstance(value, list | tuple)


# Internal state of an instance -------------------------------------------------------------------------


@dataclass(eq=False)
class _Item:
    """One task of an instance: its parameters, input data products and, once recorded, its row."""

    parameters: dict[str, Any]
    inputs: list[DataProductSpec | DataProduct | int]
    task: Task | None = None
    data_products: list[DataProduct] = field(default_factory=list)
    already_done: bool = False
    failed: bool = False
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    result: Any = None
    error: tuple[str, str, str] | None = None  # (stage, message, traceback)


@dataclass(eq=False)
class _Attempt:
    """Book-keeping for one run of one stage over the active tasks."""

    stage: str
    in_progress: _Item | None = None
    yielded: list[_Item] = field(default_factory=list)
    times: dict[int, float] = field(default_factory=dict)
    results: list[tuple[_Item, type[Base], dict[str, Any]]] = field(default_factory=list)
    outputs: list[tuple[_Item, DataProductSpec]] = field(default_factory=list)


# Task instances ----------------------------------------------------------------------------------------


class TaskInstance:
    """Base class of every task; see the module docstring."""

    _parameters: ClassVar[dict[str, Parameter]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        parameters: dict[str, Parameter] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Parameter):
                    parameters[name] = value
        cls._parameters = parameters
        # The user's execute() becomes the implementation; execute() itself stays the framework runner.
        if "execute" in vars(cls):
            cls._execute_impl = vars(cls)["execute"]
            cls.execute = TaskInstance.execute

    def __init__(self, input_data_products: Any = None, **parameters: Any):
        cls = type(self)
        unknown = sorted(set(parameters) - set(cls._parameters))
        if unknown:
            known = ", ".join(sorted(cls._parameters)) or "none"
            raise TypeError(
                f"{cls.__name__}() got unexpected parameter(s): {', '.join(map(repr, unknown))} "
                f"(known parameters: {known})"
            )
        missing = [n for n, p in cls._parameters.items() if p.required and n not in parameters]
        if missing:
            raise TypeError(
                f"{cls.__name__}() missing required parameter(s): {', '.join(map(repr, missing))}"
            )

        values = {name: parameters.get(name, p.default) for name, p in cls._parameters.items()}
        inputs = _parse_input_data_products(input_data_products)

        lengths: dict[str, int] = {}
        if isinstance(input_data_products, list | tuple):
            lengths["input_data_products"] = len(inputs)
        for name, p in cls._parameters.items():
            value = values[name]
            if not (p.splittable and _is_sequence(value)):
                continue
            if p.bundled:
                raise TypeError(
                    f"{cls.__name__}(): bundled parameter {name!r} takes one value for the whole bundle, "
                    f"got {len(value)} values; use bundler() to group tasks with different bundled values"
                )
            if name in parameters:
                lengths[name] = len(value)
        if len(set(lengths.values())) > 1:
            described = ", ".join(f"{name} has {n}" for name, n in lengths.items())
            raise ValueError(
                f"{cls.__name__}(): the per-task values do not agree on the number of tasks ({described}); "
                "give one value per task, or a single value for all (use TupleParameter for a tuple value)"
            )
        n_tasks = next(iter(lengths.values()), 1)
        if n_tasks == 0:
            raise ValueError(f"{cls.__name__}(): no tasks (an empty list of data products or values)")
        if not isinstance(input_data_products, list | tuple):
            inputs = [inputs[0] if inputs else []] * n_tasks

        items: list[_Item] = []
        for index in range(n_tasks):
            item_parameters = {}
            for name, p in cls._parameters.items():
                value = values[name]
                if name in lengths:
                    value = value[index]
                try:
                    item_parameters[name] = p.normalize(to_jsonable(value))
                except TypeError as error:
                    raise TypeError(
                        f"{cls.__name__}(): parameter {name!r} is not JSON serializable: {error}"
                    ) from None
            items.append(_Item(parameters=item_parameters, inputs=list(inputs[index])))
        self._set_items(items)

    def _set_items(self, items: list[_Item]) -> None:
        self._items = items
        self._bundled = {name: items[0].parameters[name] for name in self.bundled_parameter_names()}
        self._attempt: _Attempt | None = None
        self._bundle: Bundle | None = None
        self._debug = False

    # Class-level introspection ---------------------------------------------------------------------

    @classmethod
    def parameter_definitions(cls) -> dict[str, Parameter]:
        """Every parameter of the class (inherited ones included), by name."""
        return dict(cls._parameters)

    @classmethod
    def bundled_parameter_names(cls) -> list[str]:
        return [name for name, p in cls._parameters.items() if p.bundled]

    @classmethod
    def task_path(cls) -> str:
        """The dotted path of the class, as stored in ``task.task_module`` + ``task.task_name``."""
        return f"{cls.__module__}.{cls.__qualname__}"

    # Accessors ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    @property
    def is_bundle(self) -> bool:
        return len(self._items) > 1

    @property
    def tasks(self) -> list[Task]:
        """The ``Task`` records of this instance (available once it has been executed or recorded)."""
        return [item.task for item in self._items if item.task is not None]

    @property
    def failures(self) -> list[tuple[Task, str, str]]:
        """``(task, stage, message)`` for every task that failed in the last execution."""
        return [(item.task, item.error[0], item.error[1]) for item in self._items if item.error]

    @property
    def bundle(self) -> Bundle | None:
        return self._bundle

    def _parameter_value(self, name: str) -> Any:
        if name in self._bundled or len(self._items) == 1:
            return self._items[0].parameters[name]
        return tuple(item.parameters[name] for item in self._items)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} tasks={len(self._items)} bundled={self._bundled}>"

    # User hooks ------------------------------------------------------------------------------------

    def pre_execute(self) -> Any:
        """Run before ``execute()`` (e.g. to load a model); timed separately."""
        return None

    def _execute_impl(self, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define execute()")

    def post_execute(self) -> Any:
        """Run after ``execute()`` (e.g. to write outputs); timed separately."""
        return None

    # What tasks call while executing ----------------------------------------------------------------

    def iterable(self) -> Iterator[tuple[Task, list[DataProduct]]]:
        """Yield ``(task, data_products)`` for each task still to run; the time spent on each is recorded.

        ``task.parameters`` holds all of that task's parameters (defaults included) and each
        ``data_product.path`` is a file path.
        """
        attempt = self._attempt
        if attempt is None:
            raise RuntimeError("iterable() can only be used while the task is executing")
        for item in self._active_items():
            if item.failed:  # failed by self.fail() earlier in this pass
                continue
            attempt.in_progress = item
            if id(item) not in attempt.times:
                attempt.yielded.append(item)
                attempt.times[id(item)] = 0.0
            start = perf_counter()
            yield item.task, item.data_products
            attempt.times[id(item)] += perf_counter() - start
            attempt.in_progress = None

    def add_result(
        self, task: Task, model: type[Base], data_product: DataProduct | None = None, **columns: Any
    ) -> None:
        """Write a row of result table ``model`` for ``task`` (inserted in bulk when the stage succeeds)."""
        attempt = self._require_attempt("add_result")
        item = self._item_for(task)
        columns = {key: to_jsonable(value) for key, value in columns.items()}
        if data_product is not None:
            columns["data_product_pk"] = data_product.pk
        attempt.results.append((item, model, columns))

    def add_output_data_product(self, task: Task, path: str | os.PathLike, **spec: Any) -> None:
        """Record a file written by ``task`` as one of its output data products."""
        attempt = self._require_attempt("add_output_data_product")
        item = self._item_for(task)
        product = DataProductSpec(path=os.fspath(path), **spec) if spec else DataProductSpec.from_path(path)
        attempt.outputs.append((item, product))

    def fail(self, task: Task, error: BaseException | str) -> None:
        """Mark ``task`` failed in the current stage without interrupting the others."""
        attempt = self._require_attempt("fail")
        item = self._item_for(task)
        if isinstance(error, BaseException):
            message = f"{type(error).__name__}: {error}"
            tb = "".join(traceback.format_exception(error))
        else:
            message, tb = str(error), ""
        self._mark_failed(item, attempt.stage, message, tb)

    def read_inputs(self, read: Callable[[str], Any]) -> list[tuple[Task, DataProduct, Any]]:
        """``(task, data_product, read(data_product.path))`` for the first input of each task to run.

        The batch-first pattern of the science components: read every input, then process them together.
        A task whose ``read`` raises ``ValueError`` or ``OSError`` (a corrupt, truncated or unusable file;
        readers name the file) fails alone, as with :meth:`fail`, and is left out of the list.
        """
        loaded = []
        for task, data_products in self.iterable():
            try:
                loaded.append((task, data_products[0], read(data_products[0].path)))
            except (ValueError, OSError) as error:
                self.fail(task, error)
        return loaded

    # Execution ---------------------------------------------------------------------------------------

    def execute(self, *, force: bool = False, debug: bool = False, **kwargs: Any) -> Any:
        """Run the task(s) with provenance; see the module docstring.

        :param force: run even if an identical task (same ``task_id`` and version) already completed.
        :param debug: run even if done, and raise the first exception instead of recording it and going on.
        :param kwargs: passed to the task's own ``execute()``.
        :returns: the value returned by the task's ``execute()`` (for a bundle: a list, one per task);
            for tasks that were already done, the stored value.
        """
        _check_execute_kwargs(type(self), kwargs)
        self._debug = debug
        self._record(force=force or debug)
        pending = [item for item in self._items if not item.already_done]
        if pending:
            skipped = len(self._items) - len(pending)
            if skipped:
                log.info(
                    "%s: %d of %d tasks already done, running %d",
                    type(self).__name__,
                    skipped,
                    len(self),
                    len(pending),
                )
            self._run(pending, kwargs)
        else:
            log.info(
                "%s: all %d task(s) already done; returning stored results", type(self).__name__, len(self)
            )
        failed = [item for item in self._items if item.error]
        if failed and len(failed) == len(self._items):
            self._raise_all_failed(failed)
        if self.failures:
            log.warning(
                "%s: %d of %d task(s) failed: %s",
                type(self).__name__,
                len(self.failures),
                len(self),
                "; ".join(f"task {t.pk} ({stage}): {msg}" for t, stage, msg in self.failures),
            )
        if len(self._items) == 1:
            return self._items[0].result
        return [item.result for item in self._items]

    def summary(self) -> dict[str, Any]:
        """A compact, JSON-safe account of the last execution (used for Airflow XComs)."""
        done = [item for item in self._items if item.already_done]
        failed = [item for item in self._items if item.error]
        return {
            "task_class": type(self).task_path(),
            "n_tasks": len(self._items),
            "completed": len(self._items) - len(done) - len(failed),
            "skipped": len(done),
            "failed": len(failed),
            "bundle_pk": self._bundle.pk if self._bundle else None,
            "task_pks": [item.task.pk for item in self._items if item.task is not None],
            "failed_tasks": [
                {"pk": item.task.pk, "stage": item.error[0], "error": item.error[1][:500]} for item in failed
            ],
        }

    # Recording ---------------------------------------------------------------------------------------

    def _record(self, *, force: bool) -> None:
        """Create (or find) the rows of this instance's tasks, in bulk.

        The statements run on a :class:`~astra_provider.database.recording.Pipeline` worker while this
        thread encodes parameters, hashes task identities and builds the next statement's arrays.
        """
        cls = type(self)
        with _gc_paused(), session_scope() as session, Pipeline.for_session(session) as pipeline:
            resolved = pipeline.submit(self._resolve_data_products, session)
            # Each parameter value is encoded once: for the task's identity and for its parameter rows.
            encoded = [
                {name: _encode(value) for name, value in item.parameters.items()} for item in self._items
            ]
            if any(isinstance(dp, int) for item in self._items for dp in item.inputs):
                resolved.result()  # the identity of a data product given by pk is in the database
                identities = [[dp.identity for dp in item.data_products] for item in self._items]
            else:  # a spec has the identity of the row it resolves to (same release, filetype, hash)
                identities = [[dp.identity for dp in item.inputs] for item in self._items]
            task_ids = [
                _task_id(cls, parameters, ids) for parameters, ids in zip(encoded, identities, strict=True)
            ]
            twins: dict[str, Task] = {}
            if not force:
                completed_twins = select(Task).where(
                    Task.version == __version__, Task.status_code == Status.COMPLETED
                )
                found = pipeline.submit(
                    select_in, session, completed_twins.order_by(Task.pk), Task.task_id, set(task_ids)
                )
                for (task,) in found.result():
                    twins[task.task_id] = task  # the most recent completed twin wins
            new_items = []
            for item, task_id, parameters in zip(self._items, task_ids, encoded, strict=True):
                item.failed, item.error, item.result, item.times = (
                    False,
                    None,
                    None,
                    dict.fromkeys(STAGES, 0.0),
                )
                twin = twins.get(task_id)
                if twin is not None:
                    item.task, item.already_done, item.result = twin, True, twin.result
                    twin.__dict__["_parameters"] = item.parameters
                else:
                    item.already_done = False
                    new_items.append((item, task_id, parameters))
            self._insert_tasks(session, pipeline, new_items)
            resolved.result()

    def _resolve_data_products(self, session: Any) -> None:
        specs = [dp for item in self._items for dp in item.inputs if isinstance(dp, DataProductSpec)]
        pks = {dp for item in self._items for dp in item.inputs if isinstance(dp, int)}
        products = get_or_create_data_products(session, specs) if specs else []
        by_identity = {spec.identity: product for spec, product in zip(specs, products, strict=True)}
        by_pk = {dp.pk: dp for (dp,) in select_in(session, select(DataProduct), DataProduct.pk, sorted(pks))}
        missing = sorted(pks - set(by_pk))
        if missing:
            raise LookupError(
                f"no data product with pk {', '.join(map(str, missing[:10]))} in the astra database"
            )
        for item in self._items:
            item.data_products = [
                by_identity[dp.identity]
                if isinstance(dp, DataProductSpec)
                else by_pk[dp]
                if isinstance(dp, int)
                else dp
                for dp in item.inputs
            ]

    def _insert_tasks(
        self, session: Any, pipeline: Pipeline, new_items: list[tuple[_Item, str, dict[str, str]]]
    ) -> None:
        """Insert the new tasks with their parameters, input data products and bundle (a few statements).

        Tasks are inserted ``RUNNING``: they are executed right away, so this is their state until
        :meth:`_finish` writes their final status, timings and result in one ``UPDATE``.
        """
        self._bundle = None
        if not new_items:
            return
        cls = type(self)
        now = datetime.now(UTC)
        parameter_pks = pipeline.submit(
            get_or_create_parameters,
            session,
            sorted({pair for _, _, parameters in new_items for pair in parameters.items()}),
        )
        bundle = None
        if len(new_items) > 1:
            bundle = Bundle(
                task_module=cls.__module__,
                task_name=cls.__qualname__,
                bundled_parameters=self._bundled,
                n_tasks=len(new_items),
                created=now,
            )
            pipeline.submit(_add_and_flush, session, bundle)
        allocated = pipeline.submit(allocate_pks, session, Task.__table__, len(new_items))
        shared = {
            "task_module": cls.__module__,
            "task_name": cls.__qualname__,
            "version": __version__,
            "status_code": int(Status.RUNNING),
            "created": now,
            "modified": now,
        }
        pks = allocated.result()
        if bundle is not None:
            shared["bundle_pk"] = bundle.pk  # flushed by the worker before it allocated the pks
        pipeline.submit(
            prepare_insert(
                session,
                Task.__table__,
                [{"pk": pk, "task_id": task_id} for pk, (_, task_id, _) in zip(pks, new_items, strict=True)],
                same_for_all=shared,
            )
        )
        template = {**dict.fromkeys(c.name for c in Task.__table__.columns), **shared}
        for pk, (item, task_id, _) in zip(pks, new_items, strict=True):
            item.task = build(
                Task, {**template, "pk": pk, "task_id": task_id, "_parameters": item.parameters}
            )
        parameter_pks = parameter_pks.result()
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
        self._bundle = bundle

    # Running -----------------------------------------------------------------------------------------

    def _active_items(self) -> list[_Item]:
        return [item for item in self._items if not item.already_done and not item.failed]

    def _run(self, pending: list[_Item], kwargs: dict[str, Any]) -> None:
        stage_times = dict.fromkeys(STAGES, 0.0)
        results: list[tuple[_Item, type[Base], dict[str, Any]]] = []
        outputs: list[tuple[_Item, DataProductSpec]] = []
        stage = STAGES[0]
        try:
            for stage in STAGES:
                if not self._active_items():
                    break
                start = perf_counter()
                attempt = self._run_stage(stage, kwargs)
                stage_times[stage] = perf_counter() - start
                if attempt is not None:
                    results.extend(r for r in attempt.results if not r[0].failed)
                    outputs.extend(o for o in attempt.outputs if not o[0].failed)
        except BaseException as error:  # debug mode, KeyboardInterrupt, SystemExit: nothing stays running
            message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            for item in self._active_items():
                self._mark_failed(item, stage, f"not completed: the run stopped ({message})", "")
            raise
        finally:
            self._attempt = None
            self._finish(pending, stage_times, results, outputs)

    def _run_stage(self, stage: str, kwargs: dict[str, Any]) -> _Attempt | None:
        """Run one stage over the active items, failing and retrying around per-task errors."""
        function: Callable[..., Any] = getattr(self, "_execute_impl" if stage == "execute" else stage)
        while True:
            active = self._active_items()
            if not active:
                return None
            attempt = self._attempt = _Attempt(stage)
            try:
                value = function(**kwargs) if stage == "execute" else function()
            except Exception as error:
                tb = traceback.format_exc()
                message = f"{type(error).__name__}: {error}"
                culprit = attempt.in_progress
                if culprit is None:
                    for item in self._active_items():
                        self._mark_failed(item, stage, message, tb)
                    if self._debug:
                        raise
                    return None
                self._mark_failed(culprit, stage, message, tb)
                if self._debug:
                    raise
                log.warning(
                    "%s: task %s failed in %s (%s); running %s again for the other tasks",
                    type(self).__name__,
                    culprit.task.pk,
                    stage,
                    message,
                    stage,
                )
                continue
            for item in active:
                item.times[stage] = attempt.times.get(id(item), 0.0)
            if stage == "execute":
                self._assign_results(value, attempt, active)
            return attempt

    def _assign_results(self, value: Any, attempt: _Attempt, active: list[_Item]) -> None:
        if len(self._items) == 1:
            active[0].result = value
            return
        order = attempt.yielded or active
        survivors = [item for item in order if not item.failed]
        if _is_sequence(value) and len(value) in (len(order), len(survivors)):
            targets = order if len(value) == len(order) else survivors
            for item, result in zip(targets, value, strict=True):
                if not item.failed:
                    item.result = result
        elif value is not None:
            log.warning(
                "%s.execute() returned %s, not one value per task; results not stored per task",
                type(self).__name__,
                type(value).__name__,
            )

    def _mark_failed(self, item: _Item, stage: str, message: str, tb: str) -> None:
        item.failed = True
        item.error = (stage, message, tb)

    def _require_attempt(self, name: str) -> _Attempt:
        if self._attempt is None:
            raise RuntimeError(f"{name}() can only be called while the task is executing")
        return self._attempt

    def _item_for(self, task: Task) -> _Item:
        # by pk, through an index rebuilt when it misses (add_result is called once per row of a bundle)
        index = self.__dict__.get("_items_by_pk") or {}
        item = index.get(task.pk)
        if item is None or item.task is None or item.task.pk != task.pk:
            index = {}
            for each in self._items:
                if each.task is not None:
                    index.setdefault(each.task.pk, each)  # the first item of a task, as before
            self.__dict__["_items_by_pk"] = index
            item = index.get(task.pk)
        if item is None:
            raise ValueError(f"{task!r} is not a task of this instance")
        return item

    def _finish(
        self,
        pending: list[_Item],
        stage_times: dict[str, float],
        results: list[tuple[_Item, type[Base], dict[str, Any]]],
        outputs: list[tuple[_Item, DataProductSpec]],
    ) -> None:
        """Store statuses, timings, errors, results and output data products of the run, in bulk.

        Result rows are inserted first, so that each task's row is updated once, with its status, timings,
        error, return value and ``output_pk`` together (one ``UPDATE`` for the whole bundle).
        """
        now = datetime.now(UTC)
        bundle = len(pending) > 1
        overheads = {
            stage: max(stage_times[stage] - sum(i.times[stage] for i in pending), 0.0) for stage in STAGES
        }
        overhead_share = sum(overheads.values()) / len(pending) if bundle else 0.0
        shared = {"time_bundle_overhead": overhead_share, "modified": now}
        with _gc_paused(), session_scope() as session, Pipeline.for_session(session) as pipeline:
            first_output = self._store_results(session, pipeline, results)
            if outputs:
                pipeline.submit(_store_output_data_products, session, outputs)
            rows = []
            completed, failed = int(Status.COMPLETED), int(Status.FAILED)
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
                row = {
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
                }
                _set_fields(item.task, **row, **shared)
                rows.append(row)
            pipeline.submit(prepare_update(session, Task.__table__, rows, same_for_all=shared))
            if self._bundle is not None:
                statement = (
                    update(Bundle)
                    .where(Bundle.pk == self._bundle.pk)
                    .values(
                        **{f"time_{s}": stage_times[s] for s in STAGES},
                        **{f"time_{s}_overhead": overheads[s] for s in STAGES},
                    )
                )
                pipeline.submit(session.execute, statement)
            pipeline.submit(lambda: None).result()  # the first error, if any, is raised here

    def _store_results(
        self, session: Any, pipeline: Pipeline, results: list[tuple[_Item, type[Base], dict[str, Any]]]
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

    def _raise_all_failed(self, failed: list[_Item]) -> None:
        first = failed[0]
        if len(self._items) == 1:
            raise TaskFailedError(
                f"{type(self).__name__} task {first.task.pk} failed in {first.error[0]}: {first.error[1]}",
                self.failures,
            )
        raise TaskFailedError(
            f"all {len(failed)} task(s) of {type(self).__name__} failed; first (task {first.task.pk}, "
            f"{first.error[0]}): {first.error[1]}",
            self.failures,
        )

    # Rebuilding --------------------------------------------------------------------------------------

    @staticmethod
    def from_task(task: Task) -> TaskInstance:
        """Rebuild the instance that ran ``task`` (same class, parameters and input data products)."""
        klass = import_task_class(f"{task.task_module}.{task.task_name}", task_pk=task.pk)
        if task.version != __version__:
            warnings.warn(
                f"task {task.pk} was recorded by astra-provider {task.version}; this is {__version__}",
                stacklevel=2,
            )
        parameters = dict(task.parameters)
        stale = sorted(set(parameters) - set(klass._parameters))
        if stale:
            warnings.warn(
                f"task {task.pk}: parameters {stale} no longer exist in {klass.__name__}; ignored",
                stacklevel=2,
            )
            for name in stale:
                parameters.pop(name)
        return klass(input_data_products=[task.input_data_products], **parameters)


def _encode(value: Any) -> str:
    """The stored form of a parameter value: its canonical JSON."""
    return canonical_json_fast(value)


def _task_id(cls: type[TaskInstance], parameters: dict[str, str], identities: list[str]) -> str:
    """``{class name}_{stable_hash([module, qualname, parameters, data product identities])}``.

    ``parameters`` holds the already encoded values (name -> canonical JSON). The canonical JSON of a dict
    is its sorted ``"key":value`` pairs, so the text assembled here from those pieces is exactly
    ``canonical_json([...])``, and the hash is ``stable_hash([...])``, without encoding every value twice.
    """
    pairs = ",".join(f"{_encode(name)}:{value}" for name, value in sorted(parameters.items()))
    inputs = ",".join(map(_encode, identities))
    return f"{cls.__name__}_" + hash_json(
        f"[{_encode(cls.__module__)},{_encode(cls.__qualname__)},{{{pairs}}},[{inputs}]]"
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


def _store_output_data_products(session: Any, outputs: list[tuple[_Item, DataProductSpec]]) -> None:
    products = get_or_create_data_products(session, [spec for _, spec in outputs])
    insert_rows(
        session,
        TaskOutputDataProduct.__table__,
        [
            {"task_pk": item.task.pk, "data_product_pk": product.pk}
            for (item, _), product in zip(outputs, products, strict=True)
        ],
    )


def _add_and_flush(session: Any, record: Base) -> None:
    session.add(record)
    session.flush()


def _set_fields(task: Task, **values: Any) -> None:
    """Set attributes of a ``Task`` built by :func:`build` (a detached record: no ORM events needed)."""
    task.__dict__.update(values)


def _check_execute_kwargs(cls: type[TaskInstance], kwargs: dict[str, Any]) -> None:
    """Refuse keywords that the task's own execute() cannot take, naming them."""
    if not kwargs:
        return
    parameters = inspect.signature(cls._execute_impl).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    unexpected = sorted(set(kwargs) - accepted)
    if unexpected:
        raise TypeError(
            f"{cls.__name__}.execute() got unexpected keyword(s): {', '.join(map(repr, unexpected))}"
        )


def import_task_class(path: str, task_pk: int | None = None) -> type[TaskInstance]:
    """The ``TaskInstance`` subclass at dotted ``path`` (``module.Class``); ``LookupError`` if none."""
    where = f" (task pk={task_pk})" if task_pk is not None else ""
    module_name, _, qualname = path.rpartition(".")
    candidates = [(module_name, qualname)]
    while "." in module_name:  # nested classes: module.Outer.Inner
        module_name, _, outer = module_name.rpartition(".")
        candidates.append((module_name, f"{outer}.{candidates[-1][1]}"))
    for module_name, qualname in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        obj: Any = module
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and issubclass(obj, TaskInstance):
            return obj
    raise LookupError(f"unknown task class {path!r}{where}: it cannot be imported as a TaskInstance subclass")


def _parse_input_data_products(value: Any) -> list[list[DataProductSpec | DataProduct | int]]:
    """Per-task lists of data products from a path, a DataProduct, a pk, or a (nested) list of those."""

    def one(x: Any) -> DataProductSpec | DataProduct | int:
        if isinstance(x, DataProduct | DataProductSpec):
            return x
        if isinstance(x, bool):
            raise TypeError(f"input data product {x!r} is not a path, a DataProduct or a data product pk")
        if isinstance(x, int):
            return x
        if isinstance(x, str | os.PathLike):
            return DataProductSpec.from_path(x)
        raise TypeError(f"input data product {x!r} is not a path, a DataProduct or a data product pk")

    if value is None:
        return []
    if not isinstance(value, list | tuple):
        return [[one(value)]]
    return [[one(x) for x in entry] if isinstance(entry, list | tuple) else [one(entry)] for entry in value]


# Bundling ----------------------------------------------------------------------------------------------


def bundle_key(instance: TaskInstance) -> str:
    """What tasks must share to be bundled: their class and bundled parameter values."""
    return canonical_json([type(instance).task_path(), instance._bundled])


def bundler(tasks: Iterable[TaskInstance], max_size: int | None = None) -> list[TaskInstance]:
    """Group task instances that share their class and bundled parameters into bundles.

    :param max_size: split groups into bundles of at most this many tasks.
    """
    groups: dict[str, list[_Item]] = {}
    first: dict[str, TaskInstance] = {}
    for instance in tasks:
        key = bundle_key(instance)
        first.setdefault(key, instance)
        groups.setdefault(key, []).extend(instance._items)
    bundles = []
    for key, items in groups.items():
        size = max_size or len(items)
        for start in range(0, len(items), size):
            bundles.append(_from_items(type(first[key]), items[start : start + size]))
    return bundles


def _from_items(cls: type[TaskInstance], items: list[_Item]) -> TaskInstance:
    instance = cls.__new__(cls)
    instance._set_items([_Item(parameters=dict(i.parameters), inputs=list(i.inputs)) for i in items])
    return instance


__all__ = [
    "DictParameter",
    "Parameter",
    "TaskFailedError",
    "TaskInstance",
    "TupleParameter",
    "bundle_key",
    "bundler",
    "import_task_class",
]
