"""Task parameters: :class:`Parameter`, :class:`TupleParameter` and :class:`DictParameter`.

A parameter is declared as a class attribute of a :class:`~astra_provider.base.TaskInstance` subclass; reading
it on an instance gives the value (for a bundle, see :meth:`Parameter.__get__`). A parameter may declare the
type of its values (``Parameter(default=3, type=int)``); values of another type are refused when the task
is created, with a ``TypeError`` that names the class, the parameter and the value.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any, ClassVar

from astra_provider.utils import to_python_value

if TYPE_CHECKING:
    from astra_provider.base import TaskInstance

MISSING: Any = object()
"""The default of a required parameter (one declared without ``default``)."""

ValueType = type | tuple[type, ...]
"""What ``Parameter(type=...)`` takes: a class or a tuple of classes, as for ``isinstance``."""


class Parameter:
    """A task parameter, declared as a class attribute.

    :param default: the value used when none is given; without it the parameter is required.
    :param bundled: tasks can only share a bundle if their bundled parameters are equal.
    :param description: shown in documentation and in the Airflow trigger form.
    :param type: the type of the values (a class or a tuple of classes, as for ``isinstance``), checked when a
        task is created. An ``int`` is accepted where ``float`` is declared (JSON has one kind of number),
        but ``True``/``False`` are not ints here. ``None`` is accepted when it is the default.
    """

    splittable: ClassVar[bool] = True

    def __init__(
        self,
        default: Any = MISSING,
        *,
        bundled: bool = False,
        description: str = "",
        type: ValueType | None = None,  # shadows the builtin here only (the natural name, as in argparse)
    ):
        if type is not None and not _is_type_spec(type):
            raise TypeError(f"Parameter(type=...) takes a class or a tuple of classes, got {type!r}")
        self.default = default
        self.bundled = bundled
        self.description = description
        self.type = type
        self.name = ""

    def __set_name__(self, owner: builtins.type, name: str) -> None:
        self.name = name

    def check_default(self, class_name: str) -> None:
        """Refuse a default that is not of the declared type (a bug of the task class itself).

        :raises TypeError: naming the class, the parameter and the default.
        """
        if not self.required and self.type is not None:
            self.check(self.normalize(to_python_value(self.default)), class_name)

    def __get__(self, instance: TaskInstance | None, owner: builtins.type) -> Any:
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

    def check(self, value: Any, class_name: str) -> None:
        """Refuse a (normalized) value that is not of the declared type.

        :raises TypeError: naming the class, the parameter, the value and the expected type.
        """
        if self.type is None or (value is None and self.default is None):
            return
        if not _is_instance(value, self.type):
            self._refuse(value, class_name, _type_name(self.type))

    def _refuse(self, value: Any, class_name: str, expected: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise TypeError(
            f"{class_name}(): parameter {self.name!r} must be {expected}, got {shown} "
            f"({builtins.type(value).__name__})"
        )

    def __repr__(self) -> str:
        default = "required" if self.required else f"default={self.default!r}"
        declared = f", type={_type_name(self.type)}" if self.type is not None else ""
        return f"{builtins.type(self).__name__}({default}, bundled={self.bundled}{declared})"


class TupleParameter(Parameter):
    """A parameter whose value is a tuple; it is never split across the tasks of a bundle.

    A declared ``type`` is the type of each item of the tuple.
    """

    splittable = False

    def normalize(self, value: Any) -> Any:
        return tuple(value) if isinstance(value, list | tuple) else value

    def check(self, value: Any, class_name: str) -> None:
        if self.type is None or (value is None and self.default is None):
            return
        if not (isinstance(value, tuple) and all(_is_instance(item, self.type) for item in value)):
            self._refuse(value, class_name, f"a tuple of {_type_name(self.type)}")


class DictParameter(Parameter):
    """A parameter whose value is a dict; it is never split across the tasks of a bundle.

    A declared ``type`` is the type of each value of the dict.
    """

    splittable = False

    def check(self, value: Any, class_name: str) -> None:
        if self.type is None or (value is None and self.default is None):
            return
        if not (isinstance(value, dict) and all(_is_instance(item, self.type) for item in value.values())):
            self._refuse(value, class_name, f"a dict of {_type_name(self.type)} values")


def _is_type_spec(spec: Any) -> bool:
    if isinstance(spec, tuple):
        return bool(spec) and all(isinstance(item, type) for item in spec)
    return isinstance(spec, type)


def _is_instance(value: Any, spec: ValueType) -> bool:
    """``isinstance``, as JSON numbers go: an int is a float, a bool is not an int."""
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _type_name(spec: ValueType) -> str:
    types = spec if isinstance(spec, tuple) else (spec,)
    return " or ".join("None" if item is type(None) else item.__name__ for item in types)


__all__ = ["MISSING", "DictParameter", "Parameter", "TupleParameter", "ValueType"]
