"""Operators that execute astra task classes through the core framework (provenance, skip-if-done).

* :class:`AstraTaskOperator` runs any :class:`~astra_provider.base.TaskInstance` class, given as a class or a
  dotted path, with templated ``parameters`` and ``input_data_products``.
* :class:`ExecuteBundleOperator` runs one bundle planned by
  :class:`~astra_provider.operators.bundle.BundleTasksOperator`; map it with ``.partial(...).expand_kwargs(
  bundles.output)`` so that each mapped task instance runs one bundle (the model is loaded once per bundle).

Both push a compact summary XCom (counts and range-encoded task pks, never results) and fail the Airflow task
when more than ``max_failure_fraction`` of the tasks failed, listing the failed tasks in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from astra_provider.operators._inputs import (
    is_discovery,
    is_summary,
    materialize,
    resolve_data_products,
    skip_unless_enabled,
)
from astra_provider.utils import as_bool

if TYPE_CHECKING:
    from airflow.sdk import Context

    from astra_provider.base import TaskInstance
    from astra_provider.hooks.astra import AstraHook

DEFAULT_MAP_INDEX_TEMPLATE = "{{ task.bundle['label'] }}"
FAILED_TASKS_IN_XCOM = 20


#: Environment variable: BLAS/OpenMP threads per task process (unset: the libraries' defaults, usually one
#: per core). With as many task processes as cores (the executor's slots), 1 keeps the cores from being
#: oversubscribed; see docs/deployment.md.
THREADS_PER_TASK_VARIABLE = "ASTRA_THREADS_PER_TASK"


@contextmanager
def threads_per_task() -> Iterator[int | None]:
    """Limit the BLAS/OpenMP thread pools to ``$ASTRA_THREADS_PER_TASK`` threads while a task runs
    (``threadpoolctl``: it applies to libraries already loaded, unlike ``OMP_NUM_THREADS`` set after
    NumPy's import); yields the limit, or ``None`` when the variable is unset.

    :raises ValueError: if the variable is not a positive integer.
    """
    value = os.environ.get(THREADS_PER_TASK_VARIABLE, "").strip()
    if not value:
        yield None
        return
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_PER_TASK_VARIABLE} must be a positive integer, got {value!r}")
    import numpy  # noqa: F401  (load the BLAS library, so that its pool is limited too)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(value)):
        yield int(value)


class AstraTaskFailedError(AirflowException):
    """More astra tasks failed than the operator's ``max_failure_fraction`` allows."""


def task_class_path(task_class: str | type) -> str:
    """The dotted path of a task class given as a class or a path."""
    if isinstance(task_class, str):
        if "." not in task_class:
            raise ValueError(f"task_class {task_class!r} is not a dotted path (module.Class)")
        return task_class
    return f"{task_class.__module__}.{task_class.__qualname__}"


def compact_summary(summary: Mapping[str, Any], label: str | None = None) -> dict[str, Any]:
    """The XCom form of :meth:`TaskInstance.summary`: pks as ranges, at most 20 failure details."""
    from astra_provider.bundling import encode_pks

    failed = list(summary.get("failed_tasks") or [])
    compact = {
        "task_class": summary["task_class"],
        "n_tasks": summary["n_tasks"],
        "completed": summary["completed"],
        "skipped": summary["skipped"],
        "failed": summary["failed"],
        "bundle_pk": summary.get("bundle_pk"),
        "task_pks": encode_pks(summary.get("task_pks") or []),
        "failed_task_pks": encode_pks(item["pk"] for item in failed),
        "failed_tasks": failed[:FAILED_TASKS_IN_XCOM],
    }
    if label:
        compact["label"] = label
    return compact


LOGGED_FAILURES = 20


def _shorten(value: Any, width: int = 100) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def failure_line(failure: Mapping[str, Any], inputs: Sequence[str]) -> str:
    """One failed task on one line: pk, stage, input file names and the error, paths by base name."""
    names = [os.path.basename(path) for path in inputs]
    error = str(failure["error"])
    for path, name in zip(inputs, names, strict=True):
        error = error.replace(f"{path}: ", "").replace(path, name)
    where = f" {', '.join(names)}" if names else ""
    return f"task {failure['pk']} [{failure['stage']}]{where}: {_shorten(error, 160)}"


class _FailuresLoggedOnce(logging.Filter):
    """Drops the task framework's own failure warnings while an operator runs a bundle: the operator lists
    each failed task once, compactly, at the end (the same errors are in the astra database)."""

    LOGGER = "astra_provider.base"
    MESSAGES = (
        "%s: %d of %d task(s) failed: %s",
        "%s: task %s failed in %s (%s); running %s again for the other tasks",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.MESSAGES

    @classmethod
    @contextmanager
    def applied(cls) -> Iterator[None]:
        logger, quiet = logging.getLogger(cls.LOGGER), cls()
        logger.addFilter(quiet)
        try:
            yield
        finally:
            logger.removeFilter(quiet)


class AstraTaskOperator(BaseOperator):
    """Execute an astra task class with provenance.

    :param task_class: a :class:`~astra_provider.base.TaskInstance` subclass, or its dotted path (imported
        when the task runs, so DAG files stay cheap to parse).
    :param parameters: the task's parameters (templated). Tuples of per-task values make a bundle, as in
        ``TaskInstance(...)``.
    :param input_data_products: (templated) what the task class accepts (a path, a pk, a list of those, one
        per task), or an upstream XCom: the data product sensor's, or an astra operator's (meaning the output
        data products of its completed tasks).
    :param input_filetypes: keep only the input data products of these filetypes (with an upstream XCom).
    :param force: run even if identical tasks already completed (templated).
    :param max_failure_fraction: the Airflow task fails when more than this fraction of the tasks failed
        (templated; ``0`` fails on any failure). Failed tasks are recorded in the astra database either way.
    :param astra_conn_id: the Airflow connection of the astra database (see
        :class:`~astra_provider.hooks.astra.AstraHook`).
    :param enabled: (templated) false skips this Airflow task, saying so in its log (an optional step).
    """

    template_fields: Sequence[str] = (
        *("parameters", "input_data_products", "force", "max_failure_fraction", "enabled"),
    )
    template_fields_renderers = {"parameters": "json", "input_data_products": "json"}
    ui_color = "#e8d8f5"

    def __init__(
        self,
        *,
        task_class: str | type,
        parameters: dict[str, Any] | None = None,
        input_data_products: Any = None,
        input_filetypes: Sequence[str] | None = None,
        force: bool | str = False,
        max_failure_fraction: float | str = 0.0,
        astra_conn_id: str = "astra_default",
        enabled: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.task_class = task_class_path(task_class)
        self._task_class_object = None if isinstance(task_class, str) else task_class
        self.parameters = parameters or {}
        self.input_data_products = input_data_products
        self.input_filetypes = list(input_filetypes) if input_filetypes else None
        self.force = force
        self.max_failure_fraction = max_failure_fraction
        self.astra_conn_id = astra_conn_id
        self.enabled, self.enabled_source = enabled, enabled

    # Helpers shared with ExecuteBundleOperator ------------------------------------------------------

    def get_hook(self) -> AstraHook:
        from astra_provider.hooks.astra import AstraHook

        return AstraHook(astra_conn_id=self.astra_conn_id)

    def load_task_class(self) -> type[TaskInstance]:
        """The task class (imported now: science modules may be heavy)."""
        if self._task_class_object is not None:
            return self._task_class_object
        from astra_provider.base import import_task_class

        return import_task_class(self.task_class)

    def run_instance(
        self, instance: TaskInstance, hook: AstraHook, label: str | None = None
    ) -> dict[str, Any]:
        """Execute ``instance``, log what happened, fail past the failure fraction; return the XCom."""
        from astra_provider.base import TaskFailedError

        name = label or f"{type(instance).__name__} ({len(instance)} task{'s' if len(instance) != 1 else ''})"
        with threads_per_task() as threads, _FailuresLoggedOnce.applied(), suppress(TaskFailedError):
            self.log.info("Running %s%s", name, f" ({threads} BLAS thread(s))" if threads else "")
            instance.execute(force=as_bool(self.force, "force"))  # all failed: see the summary
        summary = instance.summary()
        n_tasks, done, failed = summary["n_tasks"], summary["skipped"], summary["failed"]
        if done == n_tasks:
            self.log.info(
                "%s: all %d task(s) already done (identical tasks completed with this version); stored "
                "results reused. Set force=True to run them again.",
                name,
                n_tasks,
            )
        elif done:
            self.log.info(
                "%s: %d of %d task(s) already done; ran the other %d", name, done, n_tasks, n_tasks - done
            )
        xcom = compact_summary(summary, label)
        self.log.info(
            "%s: %d completed, %d already done, %d failed (bundle pk %s; task pks %s)",
            name,
            summary["completed"],
            done,
            failed,
            summary["bundle_pk"],
            _shorten(xcom["task_pks"]),
        )
        if failed:
            fraction = failed / n_tasks
            allowed = float(self.max_failure_fraction)
            message = (
                f"{failed} of {n_tasks} {summary['task_class'].rsplit('.', 1)[-1]} task(s) failed "
                f"({fraction:.1%}, max_failure_fraction={allowed:g})"
            )
            if n_tasks == 1:  # the one failure in the message itself
                [only] = summary["failed_tasks"]
                paths = hook.input_data_product_paths([only["pk"]])
                message += f": {failure_line(only, paths.get(only['pk'], []))}"
            else:
                self._log_failures(summary["failed_tasks"], hook)
                message += "; each is listed above"
            if fraction > allowed:
                raise AstraTaskFailedError(message)
            self.log.warning("%s; within max_failure_fraction, so this Airflow task succeeds", message)
        return xcom

    def _log_failures(self, failures: list[dict[str, Any]], hook: AstraHook) -> None:
        shown = failures[:LOGGED_FAILURES]
        paths = hook.input_data_product_paths([item["pk"] for item in shown])
        lines = [f"  {failure_line(item, paths.get(item['pk'], []))}" for item in shown]
        if len(failures) > len(shown):
            lines.append(f"  ... and {len(failures) - len(shown)} more")
        self.log.error("%d failed task(s) (details: `astra show <pk>`):\n%s", len(failures), "\n".join(lines))

    def execute(self, context: Context) -> dict[str, Any]:
        skip_unless_enabled(self.enabled, self.enabled_source, self.task_id)
        hook = self.get_hook()
        hook.configure()
        cls = self.load_task_class()
        inputs = materialize(self.input_data_products)
        if (
            is_discovery(inputs)
            or is_summary(inputs)
            or (isinstance(inputs, list) and inputs and all(is_summary(i) or is_discovery(i) for i in inputs))
        ):
            inputs = resolve_data_products(inputs, hook, self.input_filetypes)
            if not inputs:
                from airflow.sdk.exceptions import AirflowSkipException

                raise AirflowSkipException("no input data products upstream")
        parameters = dict(self.parameters or {})
        instance = cls(input_data_products=inputs, **parameters) if inputs is not None else cls(**parameters)
        return self.run_instance(instance, hook)


class ExecuteBundleOperator(AstraTaskOperator):
    """Execute one bundle planned by :class:`~astra_provider.operators.bundle.BundleTasksOperator`.

    Meant to be mapped, one task instance per bundle::

        bundles = BundleTasksOperator(task_id="continuum_bundles", task_class=..., data_products=...)
        ExecuteBundleOperator.partial(
            task_id="continuum", task_class=..., map_index_template="{{ task.bundle['label'] }}"
        ).expand_kwargs(bundles.output)

    :param bundle: one bundle description (mapped; not templated, to keep big bundles out of the
        rendered-fields table).
    :param max_failure_fraction: the mapped task fails when more than this fraction of its tasks failed
        (default 0.1); the failed tasks are listed in its log.

    Other parameters are those of :class:`AstraTaskOperator`. Without a ``map_index_template`` the mapped
    task instances are labelled with the bundle's label (class, bundled parameters, size).
    """

    template_fields: Sequence[str] = ("force", "max_failure_fraction")

    def __init__(
        self,
        *,
        task_class: str | type,
        bundle: dict[str, Any],
        max_failure_fraction: float | str = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(task_class=task_class, max_failure_fraction=max_failure_fraction, **kwargs)
        self.bundle = bundle

    def execute(self, context: Context) -> dict[str, Any]:
        from astra_provider.bundling import instance_from_bundle

        if context.get("map_index_template") is None:
            context["map_index_template"] = DEFAULT_MAP_INDEX_TEMPLATE
        hook = self.get_hook()
        hook.configure()
        cls = self.load_task_class()
        instance = instance_from_bundle(cls, self.bundle)
        return self.run_instance(instance, hook, label=self.bundle.get("label"))
