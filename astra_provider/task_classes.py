"""Finding a task class by its dotted path (``module.Class``), as recorded in the database and in DAGs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from astra_provider.base import TaskInstance


def import_task_class(path: str, task_pk: int | None = None) -> type[TaskInstance]:
    """The ``TaskInstance`` subclass at dotted ``path`` (``module.Class``); ``LookupError`` if none.

    :param path: ``module.Class``, or ``module.Outer.Inner`` for a nested class.
    :param task_pk: the task whose class this is, named in the error message.
    :raises LookupError: when ``path`` cannot be imported as a ``TaskInstance`` subclass.
    """
    from astra_provider.base import TaskInstance

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


__all__ = ["import_task_class"]
