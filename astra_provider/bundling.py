"""Bundling: group tasks into bundles in process, plan bundles for Airflow, and rebuild them.

This module has no Airflow imports; the operators in :mod:`astra_provider.operators` call it.

* :func:`plan_bundles` takes one dict of keyword arguments per task (for example ``{"input_data_products":
  12}``), groups them by the task class's *bundled* parameters (the semantics of :func:`bundle_key`),
  chunks each group to ``bundle_size`` and caps the number of bundles at ``max_bundles`` by growing the
  bundle size. It returns compact, JSON-safe bundle descriptions.
* :func:`instance_from_bundle` rebuilds the :class:`~astra_provider.base.TaskInstance` of one bundle.
* :func:`encode_pks` / :func:`decode_pks` write long lists of primary keys as ranges (small XComs).
* :func:`bundler` groups task instances that share their class and bundled parameters (:func:`bundle_key`)
  into bundles, in process.

A bundle description (the value of ``bundle`` in ``{"bundle": ...}``)::

    {
        "label": "ScaledSum offset=1.0 (250 tasks, 1/4)",   # used as the mapped task's label
        "key": {"offset": 1.0},                          # the bundled parameters
        "size": 250,
        "shared": {"offset": 1.0, "scale": 2},           # parameters equal for every task of the bundle
        "columns": {"value": [...]},                     # per-task values of the other parameters
        "data_product_pks": [[101, 350]],                # one input data product per task, range-encoded
        # or "input_data_products": [...]                # per-task inputs when they are not single pks
    }
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from astra_provider.utils import canonical_json, to_json_value

if TYPE_CHECKING:
    from astra_provider.base import TaskInstance

INPUTS = "input_data_products"
_RANGE = re.compile(r"\d+(-\d+)?")


# Primary keys as ranges ------------------------------------------------------------------------------


def encode_pks(pks: Iterable[int]) -> list[int | list[int]]:
    """Write ``pks`` (order kept) as ints, ``[first, last]`` runs of consecutive pks and
    ``[first, last, step]`` arithmetic runs (at least three pks each).

    ``encode_pks([1, 2, 3, 4, 7, 9, 10, 11, 20, 30, 40]) == [[1, 4], 7, [9, 11], [20, 40, 10]]``.
    """
    values = [int(pk) for pk in pks]
    encoded: list[int | list[int]] = []
    start, n = 0, len(values)
    while start < n:
        stop = start + 1
        if stop < n and values[stop] > values[start]:
            step = values[stop] - values[start]
            while stop + 1 < n and values[stop + 1] - values[stop] == step:
                stop += 1
            if stop - start >= 2:
                first, last = values[start], values[stop]
                encoded.append([first, last] if step == 1 else [first, last, step])
                start = stop + 1
                continue
        encoded.append(values[start])
        start += 1
    return encoded


MAX_DECODED_PKS = 5_000_000
"""The most primary keys that :func:`decode_pks` expands from one value, ranges included.

A range is expanded into a list (about 40 bytes a key): without a bound, a range typed in a trigger form,
such as ``"1-5000000000"``, would take the worker's memory. Five million is more than the spectra of an
SDSS data release; for more, trigger several runs.
"""


def decode_pks(value: Any, *, max_pks: int = MAX_DECODED_PKS) -> list[int]:
    """The pks written by :func:`encode_pks` (plain lists of ints and ``"first-last"`` strings work too).

    :param max_pks: the most pks to expand (see :data:`MAX_DECODED_PKS`).
    :raises ValueError: for a malformed range, or for more than ``max_pks`` pks in all (naming the entry
        that goes over), before anything is expanded.
    """
    if value is None:
        return []
    if isinstance(value, int | str):
        value = [value]
    check_pk_count(value, max_pks=max_pks)
    pks: list[int] = []
    for entry in value:
        if isinstance(entry, int):
            pks.append(entry)
        else:
            first, last, step = _pk_range(entry)
            pks.extend(range(first, last + 1, step))
    return pks


def check_pk_count(entries: Iterable[Any], *, max_pks: int = MAX_DECODED_PKS) -> int:
    """The number of pks that ``entries`` (pks and ranges, as for :func:`decode_pks`) expand to.

    :raises ValueError: when that is more than ``max_pks``, naming the entry that goes over.
    """
    total = 0
    for entry in entries:
        if isinstance(entry, int) and not isinstance(entry, bool):
            total += 1
        else:
            first, last, step = _pk_range(entry)
            total += (last - first) // step + 1
        if total > max_pks:
            raise ValueError(
                f"primary keys {entry!r}: {total:,} in all, more than the {max_pks:,} that can be given at "
                "once (astra_provider.bundling.MAX_DECODED_PKS); give fewer or smaller ranges"
            )
    return total


def _pk_range(entry: Any) -> tuple[int, int, int]:
    """``(first, last, step)`` of a ``[first, last(, step)]`` list or a ``"first-last"`` string."""
    if isinstance(entry, bool):
        raise TypeError(f"{entry!r} is not a primary key")
    if isinstance(entry, list | tuple) and len(entry) in (2, 3):
        first, last, step = int(entry[0]), int(entry[1]), int(entry[2]) if len(entry) == 3 else 1
        if step < 1 or last < first or (last - first) % step:
            raise ValueError(f"{list(entry)!r} is not a [first, last(, step)] range of primary keys")
        return first, last, step
    if isinstance(entry, str) and _RANGE.fullmatch(entry.strip()):
        first_text, _, last_text = entry.strip().partition("-")
        if int(last_text or first_text) < int(first_text):
            raise ValueError(f"{entry!r} is not a first-last range of primary keys (last < first)")
        return int(first_text), int(last_text or first_text), 1
    raise TypeError(f"{entry!r} is not a primary key or a [first, last] range of primary keys")


# Grouping and chunking -------------------------------------------------------------------------------

_SCALARS = (str, int, bool, type(None))


def _plain(value: Any) -> Any:
    """``value`` as JSON types that survive an XCom exactly (cheap for the common scalars).

    ``inf``, ``nan`` and ``-0.0`` become ``{"$float": ...}`` objects
    (:func:`~astra_provider.utils.to_json_value`), which task instances read back as those floats.
    """
    if type(value) in _SCALARS:
        return value
    return to_json_value(value)


def _fingerprint(value: Any) -> Any:
    """A hashable stand-in for a JSON value: equal fingerprints mean equal canonical JSON."""
    if type(value) in _SCALARS or type(value) is float:
        return (type(value), value)
    return canonical_json(value)


def choose_bundle_size(group_sizes: Sequence[int], bundle_size: int, max_bundles: int | None) -> int:
    """The smallest size >= ``bundle_size`` that splits the groups into at most ``max_bundles`` bundles."""
    if bundle_size < 1:
        raise ValueError(f"bundle_size must be at least 1, got {bundle_size}")
    if not group_sizes or max_bundles is None:
        return bundle_size
    if max_bundles < 1:
        raise ValueError(f"max_bundles must be at least 1, got {max_bundles}")
    if len(group_sizes) > max_bundles:
        raise ValueError(
            f"the tasks fall into {len(group_sizes)} groups of distinct bundled parameter values, more than "
            f"max_bundles={max_bundles}; every group needs its own bundle: raise max_bundles"
        )

    def n_bundles(size: int) -> int:
        return sum(math.ceil(n / size) for n in group_sizes)

    low, high = bundle_size, max(bundle_size, max(group_sizes))
    while low < high:  # n_bundles() decreases with size: find the smallest size that fits
        middle = (low + high) // 2
        if n_bundles(middle) <= max_bundles:
            high = middle
        else:
            low = middle + 1
    return low


def _split_evenly(n: int, n_chunks: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, n_chunks)
    bounds, start = [], 0
    for index in range(n_chunks):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _short(value: Any, width: int = 24, path_width: int = 40) -> str:
    """A value for a label: a path by its base name, anything else cut at ``width`` characters."""
    text = value if isinstance(value, str) else canonical_json(value)
    if isinstance(value, str) and os.sep in value:
        text, width = os.path.basename(value.rstrip(os.sep)) or value, path_width
    return text if len(text) <= width else text[: width - 1] + "…"


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. arrays: not the same for a label
        return False


def bundle_label(
    class_name: str,
    key: Mapping[str, Any],
    size: int,
    index: int,
    n_chunks: int,
    *,
    defaults: Mapping[str, Any] | None = None,
    varying: Iterable[str] = (),
) -> str:
    """A short name for one bundle (the mapped task's label): ``"ScaledSum offset=1.0 (250 tasks, 1/4)"``.

    Shows the class, the bundled parameters whose value differs from its default (in ``defaults``) or
    between the bundles of the plan (``varying``), paths by their base name, long values cut short, and
    ``None`` values never; then the number of tasks and, for a group split in chunks, ``i/n``.
    """
    defaults = defaults or {}
    varying = set(varying)
    parts = [class_name]
    for name, value in key.items():
        if value is None or (name not in varying and name in defaults and _same(value, defaults[name])):
            continue
        parts.append(f"{name}={_short(value)}")
    chunk = f", {index + 1}/{n_chunks}" if n_chunks > 1 else ""
    return f"{' '.join(parts)} ({size} task{'s' if size != 1 else ''}{chunk})"


def _label_context(cls: type[TaskInstance], keys: list[dict[str, Any]]) -> dict[str, Any]:
    """``defaults`` and ``varying`` of :func:`bundle_label` for the bundles with these bundled values."""
    definitions = cls.parameter_definitions()
    defaults = {
        name: _plain(definitions[name].normalize(definitions[name].default))
        for name in cls.bundled_parameter_names()
        if not definitions[name].required
    }
    varying = {name for name in (keys[0] if keys else {}) if len({_fingerprint(k[name]) for k in keys}) > 1}
    return {"defaults": defaults, "varying": varying}


def _check_names(cls: type[TaskInstance], names: frozenset[str], where: str) -> None:
    definitions = cls.parameter_definitions()
    unknown = sorted(names - set(definitions) - {INPUTS})
    if unknown:
        raise TypeError(
            f"{cls.__name__}: {where} has unknown parameter(s) {', '.join(map(repr, unknown))} "
            f"(known parameters: {', '.join(sorted(definitions)) or 'none'})"
        )
    missing = sorted(n for n, p in definitions.items() if p.required and n not in names)
    if missing:
        raise TypeError(
            f"{cls.__name__}: {where} misses required parameter(s) {', '.join(map(repr, missing))}"
        )


def plan_bundles(
    task_class: type[TaskInstance],
    items: Iterable[Mapping[str, Any]],
    *,
    parameters: Mapping[str, Any] | None = None,
    bundle_size: int = 500,
    max_bundles: int | None = 100,
) -> list[dict[str, Any]]:
    """Group per-task keyword arguments into bundle descriptions (see the module docstring).

    :param task_class: the task class; its bundled parameters decide which tasks may share a bundle.
    :param items: one mapping per task: parameter values and, optionally, ``input_data_products`` (a data
        product pk, a path, or a list of those for a task with several inputs).
    :param parameters: values for every task (an item's own values take precedence).
    :param bundle_size: the preferred number of tasks per bundle.
    :param max_bundles: the maximum number of bundles; the bundle size grows to respect it.
    :returns: bundle descriptions, in a stable order (by bundled values, then by position).
    """
    cls = task_class
    definitions = cls.parameter_definitions()
    bundled = cls.bundled_parameter_names()
    common = dict(parameters or {})
    checked: set[frozenset[str]] = set()
    groups: dict[tuple[Any, ...], tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for position, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TypeError(f"task {position}: expected a mapping of keyword arguments, got {item!r}")
        kwargs = {**common, **item}
        names = frozenset(kwargs)
        if names not in checked:
            _check_names(cls, names, f"task {position} ({sorted(names)})")
            checked.add(names)
        values = [_plain(kwargs.get(name, definitions[name].default)) for name in bundled]
        fingerprint = tuple(_fingerprint(value) for value in values)
        group = groups.get(fingerprint)
        if group is None:
            key = {
                name: _plain(definitions[name].normalize(v)) for name, v in zip(bundled, values, strict=True)
            }
            group = groups[fingerprint] = (key, [])
        group[1].append(kwargs)

    size = choose_bundle_size([len(members) for _, members in groups.values()], bundle_size, max_bundles)
    labels = _label_context(cls, [key for key, _ in groups.values()])
    bundles = []
    for key, members in sorted(groups.values(), key=lambda group: canonical_json(group[0])):
        instance_from_kwargs(cls, members[0])  # fail here, naming the problem, rather than in every bundle
        n_chunks = math.ceil(len(members) / size)
        for index, (start, stop) in enumerate(_split_evenly(len(members), n_chunks)):
            description = _describe(cls, key, members[start:stop], index, n_chunks)
            description["label"] = bundle_label(cls.__name__, key, stop - start, index, n_chunks, **labels)
            bundles.append(description)
    return bundles


def _describe(
    cls: type[TaskInstance], key: dict[str, Any], members: list[dict[str, Any]], index: int, n_chunks: int
) -> dict[str, Any]:
    names = sorted({name for kwargs in members for name in kwargs} - {INPUTS})
    shared: dict[str, Any] = {}
    columns: dict[str, list[Any]] = {}
    definitions = cls.parameter_definitions()
    for name in names:
        values = [_plain(kwargs.get(name, definitions[name].default)) for kwargs in members]
        first = _fingerprint(values[0])
        if all(_fingerprint(value) == first for value in values[1:]):
            shared[name] = values[0]
        else:
            columns[name] = values
    description: dict[str, Any] = {
        "label": "",  # set by plan_bundles(), which knows every bundle of the plan
        "key": key,
        "size": len(members),
        "shared": shared,
        "columns": columns,
    }
    inputs = [kwargs.get(INPUTS) for kwargs in members]
    pks = [value for value in inputs if isinstance(value, int) and not isinstance(value, bool)]
    if len(pks) == len(inputs):
        description["data_product_pks"] = encode_pks(pks)
    elif any(value is not None for value in inputs):
        description[INPUTS] = [_plain(value) for value in inputs]
    return description


# Bundling task instances -----------------------------------------------------------------------------


def bundle_key(instance: TaskInstance) -> str:
    """What tasks must share to be bundled: their class and bundled parameter values."""
    return canonical_json([type(instance).task_path(), instance._bundled])


def bundler(tasks: Iterable[TaskInstance], max_size: int | None = None) -> list[TaskInstance]:
    """Group task instances that share their class and bundled parameters into bundles.

    :param tasks: task instances (each may already hold several tasks).
    :param max_size: split groups into bundles of at most this many tasks.
    :returns: one instance per bundle, in the order the groups first appear.
    """
    groups: dict[str, list[TaskInstance]] = {}
    for instance in tasks:
        groups.setdefault(bundle_key(instance), []).append(instance)
    bundles = []
    for instances in groups.values():
        items = [item for instance in instances for item in instance._items]
        size = max_size or len(items)
        for start in range(0, len(items), size):
            bundles.append(type(instances[0])._from_items(items[start : start + size]))
    return bundles


# Rebuilding instances --------------------------------------------------------------------------------


def bundle_items(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-task keyword arguments of a bundle description."""
    size = int(bundle["size"])
    if "data_product_pks" in bundle:
        inputs: list[Any] = decode_pks(bundle["data_product_pks"])
    else:
        inputs = list(bundle.get(INPUTS) or [None] * size)
    if len(inputs) != size:
        raise ValueError(f"bundle {bundle.get('label')!r}: {len(inputs)} inputs for {size} tasks")
    items = []
    for index in range(size):
        kwargs = dict(bundle.get("shared") or {})
        kwargs.update({name: values[index] for name, values in (bundle.get("columns") or {}).items()})
        if inputs[index] is not None:
            kwargs[INPUTS] = inputs[index]
        items.append(kwargs)
    return items


def instance_from_kwargs(cls: type[TaskInstance], kwargs: Mapping[str, Any]) -> TaskInstance:
    """One task of ``cls`` from its keyword arguments (``input_data_products`` is one task's inputs)."""
    kwargs = dict(kwargs)
    inputs = kwargs.pop(INPUTS, None)
    if inputs is None:
        return cls(**kwargs)
    return cls(input_data_products=[inputs], **kwargs)


def instance_from_bundle(cls: type[TaskInstance], bundle: Mapping[str, Any]) -> TaskInstance:
    """The one :class:`~astra_provider.base.TaskInstance` (a bundle) that runs every task of ``bundle``."""
    definitions = cls.parameter_definitions()
    shared = dict(bundle.get("shared") or {})
    columns = dict(bundle.get("columns") or {})
    size = int(bundle["size"])
    # Fast path: one instance built from columns, when the base class would read them the same way.
    if (
        "data_product_pks" in bundle
        and all(definitions[name].splittable for name in columns)
        and not any(
            definitions[name].splittable and isinstance(v, list | tuple) for name, v in shared.items()
        )
    ):
        pks = decode_pks(bundle["data_product_pks"])
        if len(pks) != size:
            raise ValueError(f"bundle {bundle.get('label')!r}: {len(pks)} data products for {size} tasks")
        return cls(
            input_data_products=pks,
            **shared,
            **{name: tuple(values) for name, values in columns.items()},
        )
    instances = bundler(instance_from_kwargs(cls, kwargs) for kwargs in bundle_items(bundle))
    if len(instances) != 1:
        raise ValueError(
            f"bundle {bundle.get('label')!r} holds tasks with different bundled parameters; "
            "it was not made by plan_bundles()"
        )
    return instances[0]


__all__ = [
    "MAX_DECODED_PKS",
    "bundle_items",
    "bundle_key",
    "bundle_label",
    "bundler",
    "check_pk_count",
    "choose_bundle_size",
    "decode_pks",
    "encode_pks",
    "instance_from_bundle",
    "instance_from_kwargs",
    "plan_bundles",
]
