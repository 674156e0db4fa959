"""Finding a task class by its dotted path (``module.Class``), as recorded in the database and in DAGs.

A dotted path can come from outside the code: a task row of the database (``TaskInstance.from_task``,
``astra rerun``), a DAG's YAML specification, an operator's ``task_class`` argument. Importing a module runs
its code, so a task class is only looked up in modules under an allowed prefix, and the path is checked
*before anything is imported*.

The allowed prefixes are ``astra_provider.`` by default. The environment variable
``ASTRA_TASK_MODULE_PREFIXES`` replaces them: a comma-separated list of package or module names, for example
``ASTRA_TASK_MODULE_PREFIXES=astra_provider.,mylab.tasks.``. An entry allows that module and every module
under it (``mylab.tasks`` and ``mylab.tasks.`` are the same entry; ``mylab.tasks`` does not allow
``mylab.tasks_old``).

Classes of the running script or notebook (module ``__main__``) are found too: that module is already
loaded, so finding them imports nothing.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from astra_provider.base import TaskInstance

PREFIXES_VARIABLE = "ASTRA_TASK_MODULE_PREFIXES"
"""The environment variable that sets the allowed module prefixes (comma-separated)."""

DEFAULT_PREFIXES = ("astra_provider.",)
"""The allowed module prefixes when ``ASTRA_TASK_MODULE_PREFIXES`` is not set."""


class TaskClassNotAllowedError(LookupError):
    """A task class path outside the allowed module prefixes (nothing was imported)."""


def task_module_prefixes() -> tuple[str, ...]:
    """The module prefixes task classes may be imported from: ``$ASTRA_TASK_MODULE_PREFIXES``, else
    :data:`DEFAULT_PREFIXES`."""
    text = os.environ.get(PREFIXES_VARIABLE, "")
    prefixes = tuple(entry.strip() for entry in text.split(",") if entry.strip())
    return prefixes or DEFAULT_PREFIXES


def is_allowed_module(module_name: str, prefixes: Sequence[str]) -> bool:
    """Whether ``module_name`` is ``__main__``, one of ``prefixes`` (package or module names) or under one."""
    if module_name == "__main__":  # the running script: already loaded, nothing to import
        return True
    for prefix in prefixes:
        name = prefix.rstrip(".")
        if name and (module_name == name or module_name.startswith(name + ".")):
            return True
    return False


def import_task_class(
    path: str, task_pk: int | None = None, *, allowed_prefixes: Sequence[str] | None = None
) -> type[TaskInstance]:
    """The ``TaskInstance`` subclass at dotted ``path`` (``module.Class``); ``LookupError`` if none.

    :param path: ``module.Class``, or ``module.Outer.Inner`` for a nested class.
    :param task_pk: the task whose class this is, named in the error message.
    :param allowed_prefixes: the modules to look in (default: :func:`task_module_prefixes`).
    :raises TaskClassNotAllowedError: (a ``LookupError``) when ``path`` is not under an allowed prefix;
        nothing is imported then.
    :raises LookupError: when ``path`` is not a dotted path or cannot be imported as a ``TaskInstance``
        subclass.
    """
    from astra_provider.base import TaskInstance

    where = f" (task pk={task_pk})" if task_pk is not None else ""
    parts = path.split(".") if isinstance(path, str) else []
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise LookupError(f"unknown task class {path!r}{where}: expected a dotted path, module.Class")
    prefixes = tuple(allowed_prefixes) if allowed_prefixes is not None else task_module_prefixes()
    splits = [(".".join(parts[:n]), ".".join(parts[n:])) for n in range(len(parts) - 1, 0, -1)]
    candidates = [(module, qualname) for module, qualname in splits if is_allowed_module(module, prefixes)]
    if not candidates:
        raise TaskClassNotAllowedError(
            f"task class {path!r}{where} is not in an allowed module: task classes are imported only from "
            f"modules under {', '.join(map(repr, prefixes))} (set {PREFIXES_VARIABLE}, comma-separated, to "
            "allow other packages)"
        )
    for module_name, qualname in candidates:  # module.Class first, then module.Outer.Inner
        try:
            module = (
                sys.modules["__main__"] if module_name == "__main__" else importlib.import_module(module_name)
            )
        except ImportError:
            continue
        obj: Any = module
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and issubclass(obj, TaskInstance):
            return obj
    raise LookupError(f"unknown task class {path!r}{where}: it cannot be imported as a TaskInstance subclass")


__all__ = [
    "DEFAULT_PREFIXES",
    "PREFIXES_VARIABLE",
    "TaskClassNotAllowedError",
    "import_task_class",
    "is_allowed_module",
    "task_module_prefixes",
]
