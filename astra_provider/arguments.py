"""The arguments of a task instance: parameter values and input data products, split into tasks.

``TaskClass(input_data_products=..., **parameters)`` describes one task or a bundle of them: the number of
tasks is the length of ``input_data_products`` when it is a list (a nested list gives several products to
one task), or the length of the tuples given for non-bundled, splittable parameters; a scalar value is
used by every task. :func:`split_arguments` checks the arguments and returns one
:class:`~astra_provider.database.items.TaskItem` per task.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from astra_provider.database.astradb import DataProduct
from astra_provider.database.items import TaskItem
from astra_provider.database.recording import DataProductSpec
from astra_provider.utils import to_python_value

if TYPE_CHECKING:
    from astra_provider.base import TaskInstance

InputDataProduct = DataProductSpec | DataProduct | int
"""An input data product before it is resolved to its row: a spec (from a path), a row, or a pk."""


def split_arguments(
    cls: type[TaskInstance], input_data_products: Any, parameters: Mapping[str, Any]
) -> list[TaskItem]:
    """One task per element of the per-task arguments, with all its parameters (defaults included).

    :param cls: the task class (its parameter definitions).
    :param input_data_products: a path, a ``DataProduct``, a pk, or a (nested) list of those.
    :param parameters: the parameter values given by keyword.
    :raises TypeError: for an unknown or missing parameter, a list for a bundled parameter, a value that
        is not JSON serializable, or a value that is not of its parameter's declared type.
    :raises ValueError: when the per-task values do not agree on the number of tasks, or there are none.
    """
    definitions = cls.parameter_definitions()
    _check_names(cls.__name__, definitions, parameters)
    values = {name: parameters.get(name, p.default) for name, p in definitions.items()}
    inputs = parse_input_data_products(input_data_products)

    lengths: dict[str, int] = {}
    if isinstance(input_data_products, list | tuple):
        lengths["input_data_products"] = len(inputs)
    for name, p in definitions.items():
        value = values[name]
        if not (p.splittable and isinstance(value, list | tuple)):
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

    typed = [(name, p) for name, p in definitions.items() if p.type is not None]
    items: list[TaskItem] = []
    for index in range(n_tasks):
        item_parameters = {}
        for name, p in definitions.items():
            value = values[name]
            if name in lengths:
                value = value[index]
            try:
                item_parameters[name] = p.normalize(to_python_value(value))
            except TypeError as error:
                raise TypeError(
                    f"{cls.__name__}(): parameter {name!r} is not JSON serializable: {error}"
                ) from None
            except ValueError as error:
                raise ValueError(f"{cls.__name__}(): parameter {name!r}: {error}") from None
        for name, p in typed:
            p.check(item_parameters[name], cls.__name__)
        items.append(TaskItem(parameters=item_parameters, inputs=list(inputs[index])))
    return items


def _check_names(class_name: str, definitions: Mapping[str, Any], parameters: Mapping[str, Any]) -> None:
    """Refuse unknown parameters and missing required ones, naming them."""
    unknown = sorted(set(parameters) - set(definitions))
    if unknown:
        known = ", ".join(sorted(definitions)) or "none"
        raise TypeError(
            f"{class_name}() got unexpected parameter(s): {', '.join(map(repr, unknown))} "
            f"(known parameters: {known})"
        )
    missing = [n for n, p in definitions.items() if p.required and n not in parameters]
    if missing:
        raise TypeError(f"{class_name}() missing required parameter(s): {', '.join(map(repr, missing))}")


def parse_input_data_products(value: Any) -> list[list[InputDataProduct]]:
    """Per-task lists of data products from a path, a DataProduct, a pk, or a (nested) list of those."""

    def one(x: Any) -> InputDataProduct:
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


__all__ = ["InputDataProduct", "parse_input_data_products", "split_arguments"]
