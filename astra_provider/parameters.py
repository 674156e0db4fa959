"""Task parameters: :class:`Parameter`, :class:`TupleParameter` and :class:`DictParameter`.

A parameter is declared as a class attribute of a :class:`~astra_provider.base.TaskInstance` subclass; reading
it on an instance gives the value (for a bundle, see :meth:`Parameter.__get__`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from astra_provider.base import TaskInstance

MISSING: Any = object()
"""The default of a required parameter (one declared without ``default``)."""


class Parameter:
    """A task parameter, declared as a class attribute.

    :param default: the value used when none is given; without it the parameter is required.
    :param bundled: tasks can only share a bundle if their bundled parameters are equal.
    :param description: shown in documentation and in the Airflow trigger form.
    """

    splittable: ClassVar[bool] = True

    def __init__(self, default: Any = MISSING, *, bundled: bool = False, description: str = ""):
        self.default = default
        self.bundled = bundled
        self.description = description
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: TaskInstance | None, owner: type) -> Any:
        """The parameter itself on the class; on an instance, its value.

        In a bundle, the value of a bundled parameter is the bundle's value; for other parameters it is a
        tuple with one value per task.
        """
        if instance is None:
            return self
        return instance._parameter_value(self.name)

    @property
    def required(self) -> bool:
        return self.default is MISSING

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


__all__ = ["MISSING", "DictParameter", "Parameter", "TupleParameter"]
