"""Turning upstream XCom values into the input data products of tasks (shared by the operators)."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from astra_provider.bundling import check_pk_count, decode_pks

if TYPE_CHECKING:
    from astra_provider.hooks.astra import AstraHook


_RANGE = re.compile(r"\d+(-\d+)?")


def materialize(value: Any) -> Any:
    """A mapped task's XCom (a lazy sequence) as a list; other values unchanged."""
    if isinstance(value, Sequence) and not isinstance(value, list | tuple | str | bytes):
        return list(value[:])  # one request; list(lazy) ends on a logged 404
    return value


def skip_unless_enabled(enabled: Any, source: Any, task_id: str) -> None:
    """Skip the Airflow task (and, through trigger rules, the steps that need it) when ``enabled`` is false.

    :param enabled: the rendered value of the operator's ``enabled`` field.
    :param source: that field before rendering (the template), to say why in the log.
    :raises AirflowSkipException: if ``enabled`` is false.
    """
    from astra_provider.utils import as_bool

    if as_bool(enabled, "enabled"):
        return
    from airflow.sdk.exceptions import AirflowSkipException

    why = f" ({source} is {enabled!r})" if isinstance(source, str) and source != str(enabled) else ""
    raise AirflowSkipException(f"step {task_id} is not enabled in this run{why}: skipped, with what needs it")


def is_summary(value: Any) -> bool:
    """Whether ``value`` is the XCom of an astra operator (a summary of executed tasks)."""
    return isinstance(value, Mapping) and "task_pks" in value


def is_discovery(value: Any) -> bool:
    """Whether ``value`` is the XCom of the data product sensor or asset-event reader."""
    return isinstance(value, Mapping) and "data_product_pks" in value


def completed_task_pks(summary: Mapping[str, Any]) -> list[int]:
    """The tasks of a summary that completed now or earlier (not the failed ones)."""
    failed = set(decode_pks(summary.get("failed_task_pks")))
    return [pk for pk in decode_pks(summary["task_pks"]) if pk not in failed]


def _from_discovery(value: Mapping[str, Any], filetypes: Sequence[str] | None, hook: AstraHook) -> list[int]:
    pks = decode_pks(value.get("data_product_pks"))
    if not filetypes or not pks:
        return pks
    by_filetype = value.get("by_filetype")
    if not isinstance(by_filetype, Mapping):
        return hook.data_product_pks_by_filetype(pks, filetypes)
    keep = {pk for filetype in filetypes for pk in decode_pks(by_filetype.get(filetype))}
    if "full" in by_filetype and "full" not in filetypes:  # plain files: classified by their path
        keep.update(hook.data_product_pks_by_filetype(decode_pks(by_filetype["full"]), filetypes))
    return [pk for pk in pks if pk in keep]


def _from_summaries(summaries: list[Mapping[str, Any]], hook: AstraHook) -> list[Any]:
    task_pks = [pk for summary in summaries for pk in completed_task_pks(summary)]
    outputs = hook.output_data_product_pks(task_pks)
    inputs: list[Any] = []
    for pk in task_pks:
        products = outputs.get(pk, [])
        if len(products) == 1:
            inputs.append(products[0])
        elif products:
            inputs.append(products)
    return inputs


def resolve_data_products(value: Any, hook: AstraHook, filetypes: Sequence[str] | None = None) -> list[Any]:
    """One entry per task (a data product pk, a path, or a list of those) from an upstream value.

    Accepted values: ``None``; a path or a pk; a list of pks (``[first, last]`` pairs and
    ``"first-last"`` strings are ranges, digit strings are pks), paths and glob patterns; the sensor's
    XCom ``{"data_product_pks": ..., "by_filetype": {...}}``; the summary XCom of an astra operator, or a
    list of them (a mapped task), meaning *the output data products of its completed tasks*.
    ``filetypes`` keeps only data products of those filetypes (pks only).
    """
    value = materialize(value)
    if value is None:
        return []
    if isinstance(value, str | int) and not isinstance(value, bool):
        value = [value]
    if is_discovery(value):
        return _from_discovery(value, filetypes, hook)
    if is_summary(value):
        value = [value]
    if not isinstance(value, list | tuple):
        raise TypeError(
            f"cannot take input data products from a {type(value).__name__}: expected pks, paths, the "
            "data product sensor's XCom or an astra operator's XCom"
        )
    value = [entry for entry in value if entry is not None]
    if value and all(is_summary(entry) or is_discovery(entry) for entry in value):
        summaries = [entry for entry in value if is_summary(entry)]
        inputs = _from_summaries(summaries, hook) if summaries else []
        for entry in value:
            if is_discovery(entry):
                inputs.extend(_from_discovery(entry, filetypes, hook))
        if filetypes and summaries:
            keep = set(
                hook.data_product_pks_by_filetype([p for p in inputs if isinstance(p, int)], filetypes)
            )
            inputs = [p for p in inputs if not isinstance(p, int) or p in keep]
        return inputs
    return _from_list(value, hook, filetypes)


def _from_list(value: Sequence[Any], hook: AstraHook, filetypes: Sequence[str] | None) -> list[Any]:
    # pks and ranges (e.g. "100-250" typed in a trigger form) are counted before any range is expanded
    check_pk_count(entry for entry in value if not _is_path(entry))
    entries: list[Any] = []
    for entry in value:
        if _is_path(entry):
            if glob.has_magic(entry):
                matches = sorted(glob.glob(os.path.expanduser(entry), recursive=True))
                if not matches:
                    raise FileNotFoundError(f"no file matches {entry!r}")
                entries.extend(matches)
            else:
                entries.append(entry)
        else:
            entries.extend(decode_pks([entry]))
    if filetypes:
        pks = [entry for entry in entries if isinstance(entry, int)]
        keep = set(hook.data_product_pks_by_filetype(pks, filetypes)) if pks else set()
        entries = [entry for entry in entries if not isinstance(entry, int) or entry in keep]
    return entries


def _is_path(entry: Any) -> bool:
    """Whether a list entry is a path or glob pattern (not a pk, a digit string or a range)."""
    return isinstance(entry, str) and not _RANGE.fullmatch(entry.strip())
