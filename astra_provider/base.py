"""Tasks: the :class:`TaskInstance` base class, its execution, and the names a task module imports.

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
those is its ``task_id``, prefixed by the class's :meth:`~TaskInstance.task_family` (``task_namespace`` and
the class name, e.g. ``RNG.RandomNumberGeneratorTask_36a5...``). The package version is not part of
``task_id`` (so one analysis can be compared across versions) but it is part of *skip-if-done*: executing a
task whose twin (same ``task_id``, same version) already completed returns the stored result without
running it again; ``force=True`` runs it. Every task also records the version parameters
``astra_version_major`` and ``astra_version_minor`` (class attributes here), which are not part of its
identity.

**Claims and chunks.** ``execute()`` claims its tasks first, so that overlapping runs never execute the same
task twice, and records the outcome of each chunk of tasks as soon as it has run, so that a crash loses at
most one chunk; see :mod:`astra_provider.running`.

**Failures.** An exception while a task of a bundle is being processed (between two steps of
``iterable()``) fails that task alone: its status, stage, message and traceback are recorded, and the stage
is run again for the remaining tasks. An exception outside ``iterable()`` fails every remaining task of the
chunk. Tasks that handle their own errors can call :meth:`TaskInstance.fail`.

**Where the parts are.** Parameters are declared with :mod:`astra_provider.parameters`; the constructor's
arguments are split into tasks by :mod:`astra_provider.arguments`; :mod:`astra_provider.running` runs the
stages; every provenance statement is written by
:class:`~astra_provider.database.recorder.Recorder`; :func:`~astra_provider.bundling.bundler` and
:func:`~astra_provider.bundling.bundle_key` live in :mod:`astra_provider.bundling`, and
:func:`~astra_provider.task_classes.import_task_class` in :mod:`astra_provider.task_classes`. This
module re-exports ``Parameter``, ``TupleParameter``, ``DictParameter``, ``bundler``, ``bundle_key`` and
``import_task_class``, so task modules keep ``from astra_provider.base import TaskInstance, Parameter``.
"""

from __future__ import annotations

import inspect
import logging
import os
import traceback
import warnings
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any, ClassVar

from astra_provider._version import __version__
from astra_provider.arguments import split_arguments
from astra_provider.bundling import bundle_key, bundler
from astra_provider.database.astradb import (
    VERSION_PARAMETERS,
    Base,
    Bundle,
    DataProduct,
    Task,
    version_parameters,
)
from astra_provider.database.items import TaskItem
from astra_provider.database.recording import DataProductSpec
from astra_provider.parameters import DictParameter, Parameter, TupleParameter
from astra_provider.running import Attempt, Execution
from astra_provider.sources.registration import spectrum_identifiers
from astra_provider.task_classes import import_task_class
from astra_provider.utils import gc_paused, to_jsonable

log = logging.getLogger(__name__)

_VERSION = version_parameters(__version__)


class TaskFailedError(RuntimeError):
    """Every task of an execution failed; ``failures`` lists ``(task, stage, message)``."""

    def __init__(self, message: str, failures: list[tuple[Task, str, str]]):
        super().__init__(message)
        self.failures = failures


# Task instances ----------------------------------------------------------------------------------------


class TaskInstance:
    """Base class of every task; see the module docstring."""

    _parameters: ClassVar[dict[str, Parameter]] = {}

    task_namespace: ClassVar[str | None] = None
    """The prefix of the class's ``task_id`` (see :meth:`task_family`); None: derived from the module."""

    astra_version_major: ClassVar[int] = _VERSION["astra_version_major"]
    """The major version of astra-provider, recorded as a parameter of every task (not part of identity)."""
    astra_version_minor: ClassVar[int] = _VERSION["astra_version_minor"]
    """The minor version of astra-provider, recorded as a parameter of every task (not part of identity)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        parameters: dict[str, Parameter] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Parameter):
                    if name in VERSION_PARAMETERS:
                        raise TypeError(f"{cls.__name__}: {name!r} is recorded for every task; rename it")
                    parameters[name] = value
                    if klass is cls:
                        value.check_default(cls.__name__)
        cls._parameters = parameters
        # The user's execute() becomes the implementation; execute() itself stays the framework runner.
        # Rewiring the class's methods is the point here, so the checker's method-assign is silenced.
        if "execute" in vars(cls):
            cls._execute_impl = vars(cls)["execute"]  # type: ignore[method-assign]
            cls.execute = TaskInstance.execute  # type: ignore[method-assign]

    def __init__(self, input_data_products: Any = None, **parameters: Any):
        with gc_paused():  # one TaskItem and data product spec per task, all kept
            self._set_items(split_arguments(type(self), input_data_products, parameters))

    def _set_items(self, items: list[TaskItem]) -> None:
        self._items = items
        self._bundled = {name: items[0].parameters[name] for name in self.bundled_parameter_names()}
        self._attempt: Attempt | None = None
        self._scope: list[TaskItem] | None = None  # the tasks of the running chunk
        self._identified: dict[int, Any] = {}  # data product pk -> source identifiers read by read_inputs
        self._bundle: Bundle | None = None
        self._verbose = False

    @classmethod
    def _from_items(cls, items: list[TaskItem]) -> TaskInstance:
        """An instance of ``cls`` holding copies of ``items`` (tasks of other instances; see ``bundler``)."""
        instance = cls.__new__(cls)
        instance._set_items([TaskItem(parameters=dict(i.parameters), inputs=list(i.inputs)) for i in items])
        return instance

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

    @classmethod
    def task_family(cls) -> str:
        """``{task_namespace}.{class name}``, the prefix of ``task_id`` (``RNG.RandomNumberGeneratorTask``).

        Without a ``task_namespace`` (set on the class or a base class), the namespace is the package under
        ``astra_provider.contrib`` (``doppler`` for ``astra_provider.contrib.doppler``), else the last part of
        the module's name; classes of ``__main__`` have none.
        """
        namespace = cls.task_namespace
        if namespace is None:
            module = cls.__module__
            if module.startswith("astra_provider.contrib."):
                namespace = module.split(".")[2]
            else:
                namespace = "" if module == "__main__" else module.rpartition(".")[2]
        return f"{namespace}.{cls.__name__}" if namespace else cls.__name__

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
        return [(item.recorded_task, item.error[0], item.error[1]) for item in self._items if item.error]

    @property
    def bundle(self) -> Bundle | None:
        return self._bundle

    def _parameter_value(self, name: str) -> Any:
        """The value (bundled, or one task); else one value per task (of the running chunk, if any)."""
        if name in self._bundled or len(self._items) == 1:
            return self._items[0].parameters[name]
        return tuple(item.parameters[name] for item in (self._scope or self._items))

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
        active = self._active_items()
        for number, item in enumerate(active, start=1):
            if item.failed:  # failed by self.fail() earlier in this pass
                continue
            attempt.in_progress = item
            if id(item) not in attempt.times:
                attempt.yielded.append(item)
                attempt.times[id(item)] = 0.0
            start = perf_counter()
            yield item.recorded_task, item.data_products
            elapsed = perf_counter() - start
            attempt.times[id(item)] += elapsed
            attempt.in_progress = None
            if self._verbose:
                log.info("%s: %s task %s (%d/%d) in %.3f s", type(self).__name__, attempt.stage,
                         item.recorded_task.pk, number, len(active), elapsed)  # fmt: skip

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
        readers name the file) fails alone, as with :meth:`fail`, and is left out of the list. The source
        identifiers of a spectrum read by :mod:`astra_provider.sdss.spectrum` are kept, to link the data
        product to its source after the run without reading the file again.
        """
        loaded = []
        for task, data_products in self.iterable():
            try:
                loaded.append((task, data_products[0], read(data_products[0].path)))
            except (ValueError, OSError) as error:
                self.fail(task, error)
                continue
            identified = spectrum_identifiers(loaded[-1][2])  # the header the reader kept: no second read
            if identified is not None:
                self._identified[data_products[0].pk] = identified
        return loaded

    # Execution ---------------------------------------------------------------------------------------

    def execute(
        self,
        *,
        force: bool = False,
        debug: bool = False,
        verbose: bool = False,
        wait: bool | float = False,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the task(s) with provenance; see the module docstring and :mod:`astra_provider.running`.

        :param force: run even if an identical task (same ``task_id`` and version) already completed, or
            another run holds its claim; the new row does not take the claim.
        :param debug: run even if done, and raise the first exception instead of recording it and going on.
        :param verbose: log each stage, chunk and task as it runs (on stderr if logging shows nothing else);
            also passed to the task's own ``execute()`` if it takes ``verbose``.
        :param wait: wait for tasks that another live run is executing (``True``, or a number of seconds),
            and use their results (or run them, if that run fails or stops); by default they are skipped.
        :param chunk_size: tasks per chunk (default ``ASTRA_CHUNK_SIZE``, 1,000).
        :param kwargs: passed to the task's own ``execute()``.
        :returns: the value returned by the task's ``execute()`` (for a bundle: a list, one per task);
            for tasks that were already done, the stored value; None for tasks held elsewhere.
        """
        if verbose and _accepts(type(self), "verbose"):
            kwargs["verbose"] = verbose
        _check_execute_kwargs(type(self), kwargs)
        self._verbose = verbose
        run = Execution(
            self, kwargs, force=force or debug, debug=debug, verbose=verbose, wait=wait, chunk_size=chunk_size
        )
        try:
            run.run()
        finally:
            self._bundle = run.recorder.bundle
            self._verbose = False
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
        failed = [item for item in self._items if item.error and not item.lost]
        elsewhere = [item for item in self._items if item.elsewhere or item.lost]
        return {
            "task_class": type(self).task_path(),
            "n_tasks": len(self._items),
            "completed": len(self._items) - len(done) - len(failed) - len(elsewhere),
            "skipped": len(done),
            "failed": len(failed),
            "elsewhere": len(elsewhere),
            "bundle_pk": self._bundle.pk if self._bundle else None,
            "task_pks": [
                item.task.pk for item in self._items if item.task is not None and item not in elsewhere
            ],
            "elsewhere_task_pks": [item.task.pk for item in elsewhere if item.task is not None],
            "failed_tasks": [
                {"pk": item.recorded_task.pk, "stage": item.error[0], "error": item.error[1][:500]}
                for item in failed
                if item.error is not None  # all of them: failed items are those with an error
            ],
        }

    # Running (see astra_provider.running) ----------------------------------------------------------

    def _active_items(self) -> list[TaskItem]:
        """The tasks still to run in the current scope (the running chunk, else all)."""
        return [item for item in (self._scope or self._items) if item.runnable]

    def _mark_failed(self, item: TaskItem, stage: str, message: str, tb: str) -> None:
        item.failed = True
        item.error = (stage, message, tb)

    def _require_attempt(self, name: str) -> Attempt:
        if self._attempt is None:
            raise RuntimeError(f"{name}() can only be called while the task is executing")
        return self._attempt

    def _item_for(self, task: Task) -> TaskItem:
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

    def _raise_all_failed(self, failed: list[TaskItem]) -> None:
        first = failed[0]
        assert first.error is not None  # failed items are those with an error
        stage, message, _ = first.error
        if len(self._items) == 1:
            raise TaskFailedError(
                f"{type(self).__name__} task {first.recorded_task.pk} failed in {stage}: {message}",
                self.failures,
            )
        raise TaskFailedError(
            f"all {len(failed)} task(s) of {type(self).__name__} failed; "
            f"first (task {first.recorded_task.pk}, {stage}): {message}",
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


def _accepts(cls: type[TaskInstance], name: str) -> bool:
    """Whether the task's own ``execute()`` takes keyword ``name``."""
    parameters = inspect.signature(cls._execute_impl).parameters.values()
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in parameters
    )


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
