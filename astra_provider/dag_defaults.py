"""Defaults of DAG parameters that are found when a task runs: template functions of every factory-built DAG.

A spec uses them for parameters that are left empty, e.g. ``"{{ params.model_path or latest_output(
'astra_provider.contrib.thecannon.TrainTheCannon') }}"``. They are called while a task's templates are
rendered (in the worker, never while the DAG file is parsed), so they may read the astra database and the
file system. On a machine where ``astra demo`` ran, they find its model, surveys and training table:

* :func:`latest_output`: the output file of the latest completed task of a class in the astra database (the
  model trained last by ``astra_thecannon_train``);
* :func:`default_data_root`: ``$ASTRA_DATA_ROOT``, else the newest survey (a folder with apVisit files) under
  ``$ASTRA_HOME/data``, where ``astra demo`` writes its surveys;
* :func:`default_training_table`: the newest ``$ASTRA_HOME/data/*/training.csv``;
* :func:`default_templates`: Doppler's templates: the grids installed by ``astra templates install``
  (``$ASTRA_HOME/templates``), else the Cannon model trained last.

Each raises :class:`MissingDefaultError`, saying what to pass instead, when there is nothing to find.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class MissingDefaultError(LookupError):
    """A parameter was left empty and there is no default to find."""


def astra_home() -> str:
    """``$ASTRA_HOME`` (default ``~/.astra``), as an absolute path."""
    from astra_provider.database import astra_home as home

    return str(home().resolve())


def latest_output(task_class: str, *, astra_conn_id: str = "astra_default") -> str:
    """The path of the output data product of the latest completed ``task_class`` task (dotted path).

    :raises MissingDefaultError: if the astra database has no such task.
    """
    from sqlalchemy import select

    from astra_provider.database import redact
    from astra_provider.database.astradb import DataProduct, Status, Task, TaskOutputDataProduct
    from astra_provider.hooks.astra import AstraHook

    module, _, name = task_class.rpartition(".")
    hook = AstraHook(astra_conn_id=astra_conn_id)
    query = (
        select(DataProduct.path)
        .join(TaskOutputDataProduct, TaskOutputDataProduct.data_product_pk == DataProduct.pk)
        .join(Task, Task.pk == TaskOutputDataProduct.task_pk)
        .where(Task.task_module == module, Task.task_name == name, Task.status_code == Status.COMPLETED)
        .order_by(Task.pk.desc())
        .limit(1)
    )
    with hook.session_scope() as session:
        path = session.scalar(query)
    if path is None:
        raise MissingDefaultError(
            f"no completed {name} task in the astra database {redact(hook.get_database_url())}: "
            f"run the DAG that makes one, or give the parameter"
        )
    return path


def _newest_in_data(pattern: str, missing: str) -> Path:
    """The most recently modified match of ``pattern`` under ``$ASTRA_HOME/data``.

    :raises MissingDefaultError: with the message ``missing`` (``{data}`` becomes that folder) if none.
    """
    data = Path(astra_home()) / "data"
    newest = max(data.glob(pattern), key=lambda path: path.stat().st_mtime, default=None)
    if newest is None:
        raise MissingDefaultError(missing.format(data=data))
    return newest


def default_data_root() -> str:
    """``$ASTRA_DATA_ROOT``, else the newest folder under ``$ASTRA_HOME/data`` with apVisit files.

    :raises MissingDefaultError: if there is neither.
    """
    if os.environ.get("ASTRA_DATA_ROOT"):
        return os.environ["ASTRA_DATA_ROOT"]
    visits = _newest_in_data(
        "*/apogee/*/visit",
        "data_root is empty, ASTRA_DATA_ROOT is not set, and {data} holds no survey with apVisit files "
        "(astra demo writes one there): give data_root",
    )
    return str(visits.parents[2])


def default_training_table() -> str:
    """The newest ``$ASTRA_HOME/data/*/training.csv``.

    :raises MissingDefaultError: if there is none.
    """
    table = _newest_in_data(
        "*/training.csv",
        "training_table is empty and there is no {data}/*/training.csv (astra demo writes one): "
        "give training_table",
    )
    return str(table)


def default_templates(*, astra_conn_id: str = "astra_default") -> str:
    """Doppler's default ``model_path``: ``$ASTRA_HOME/templates`` when ``astra templates install`` put
    template grids there (real APOGEE and BOSS spectra), else the Cannon model trained last.

    :raises MissingDefaultError: if there is neither.
    """
    from astra_provider.templates.importer import templates_dir

    installed = templates_dir()
    if any(installed.glob("*.npz")):
        return str(installed.resolve())
    try:
        return latest_output("astra_provider.contrib.thecannon.TrainTheCannon", astra_conn_id=astra_conn_id)
    except MissingDefaultError as error:
        raise MissingDefaultError(
            f"no template grids in {installed} (astra templates install puts them there) and {error}"
        ) from None


def template_functions(astra_conn_id: str) -> dict[str, Callable[..., Any]]:
    """The functions above, by name, for a DAG's ``user_defined_macros``."""
    return {
        "astra_home": astra_home,
        "latest_output": functools.partial(latest_output, astra_conn_id=astra_conn_id),
        "default_data_root": default_data_root,
        "default_training_table": default_training_table,
        "default_templates": functools.partial(default_templates, astra_conn_id=astra_conn_id),
    }
