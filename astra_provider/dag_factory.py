"""Build Airflow DAGs from declarative YAML pipeline specs.

One spec per pipeline, next to a two-line DAG file with the same name (``dags/astra_continuum.yaml`` and
``dags/astra_continuum.py``)::

    \"\"\"Airflow DAG built from astra_continuum.yaml by the astra DAG factory.\"\"\"
    from astra_provider.dag_factory import dag_from_spec

    dag = dag_from_spec(__file__)

A broken spec raises :class:`~astra_provider.dag_spec_validation.SpecError` (naming the file, the step and
the field) while that one DAG file is imported, so Airflow reports it as the import error of that file alone;
the other DAGs are unaffected. The spec's fields are the models of :mod:`astra_provider.dag_spec`
(reference: ``docs/airflow.md``; JSON Schema for editors: ``schema/dag-spec.schema.json``).

DAG files import only this module, the spec's modules and the Task SDK: task classes (and NumPy,
SciPy, astropy) are imported when tasks run. :func:`check_task_classes` imports them, through
:func:`astra_provider.base.import_task_class`, to check parameter names (tests, CI).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from astra_provider.dag_defaults import template_functions
from astra_provider.dag_spec import (
    AssetEventsStep,
    AssetSchedule,
    ExportStep,
    PipelineSpec,
    SensorStep,
    TaskStep,
    json_schema,
)
from astra_provider.dag_spec_validation import SpecError, load_spec, validate_spec

__all__ = ["SpecError", "build_dag", "check_task_classes", "dag_from_spec", "load_spec", "validate_spec"]

#: Trigger rules under which a step does not run after an upstream failure. A DAG with a step that runs
#: anyway gets a last task, ``any_step_failed``, that fails the run when any task failed (Airflow decides a
#: run's state from its last tasks only).
FAILURE_STOPS = {"all_success", "none_failed", "none_failed_min_one_success", "all_skipped"}
SECONDS = ("retry_delay", "execution_timeout")


def _operator_args(args: Any) -> dict[str, Any]:
    values = args.model_dump(exclude_none=True)
    for name in SECONDS:
        if isinstance(values.get(name), int | float):
            values[name] = timedelta(seconds=values[name])
    return values


def _start_date(value: date) -> datetime:
    import pendulum

    if isinstance(value, datetime):
        return pendulum.instance(value, tz="UTC")
    return pendulum.datetime(value.year, value.month, value.day, tz="UTC")


def _describe_step(step: Any) -> str:
    """One short line for the DAG's docs (long lines are cut off in the UI)."""
    if isinstance(step, SensorStep):
        what = f"wait for new {', '.join(step.sensor.filetypes or ['files'])}"
    elif isinstance(step, AssetEventsStep):
        what = "register the files of the triggering asset events"
    elif isinstance(step, ExportStep):
        what = "write the summary catalogues (one file per pipeline and kind)"
    else:
        what = f"`{step.task.rpartition('.')[2]}`"
        if step.inputs is not None and step.inputs.step:
            source = (
                "outputs of" if step.inputs.filetypes is None else ", ".join(step.inputs.filetypes) + " of"
            )
            what += f" on the {source} `{step.inputs.step}`"
        what += ", in bundles" if step.bundle else ", one task"
        if step.enabled is not True:
            what += ", when enabled"
    after = f" (after {', '.join(f'`{a}`' for a in step.after)})" if step.after else ""
    return f"- `{step.id}`: {what}{after}"


def _doc_md(spec: PipelineSpec) -> str:
    lines = [spec.description or spec.dag_id, "", f"Built from `{Path(spec.path).name}`. Steps:", ""]
    lines += [_describe_step(step) for step in spec.steps]
    return "\n".join(lines + (["", spec.doc_md] if spec.doc_md else []))


def build_dag(spec: PipelineSpec) -> Any:
    """The :class:`airflow.sdk.DAG` of a validated spec."""
    from airflow.sdk import DAG

    schedule: Any = spec.schedule  # a cron string or preset, or the asset it is scheduled on
    if isinstance(spec.schedule, AssetSchedule):
        from astra_provider.assets import reduced_spectra_asset

        schedule = [reduced_spectra_asset(**spec.schedule.asset.model_dump(exclude_none=True))]
    optional: dict[str, Any] = {"max_active_tasks": spec.max_active_tasks} if spec.max_active_tasks else {}
    dag = DAG(
        dag_id=spec.dag_id,
        description=spec.description,
        doc_md=_doc_md(spec),
        schedule=schedule,
        start_date=_start_date(spec.start_date),
        catchup=spec.catchup,
        max_active_runs=spec.max_active_runs,
        tags=spec.tags,
        default_args=_operator_args(spec.default_args),
        params={name: param.to_param() for name, param in spec.params.items()},
        render_template_as_native_obj=True,
        user_defined_macros=template_functions(spec.astra_conn_id),
        **optional,
    )
    tails: dict[str, Any] = {}  # the task whose XCom is each step's output
    with dag:
        for number, step in enumerate(spec.steps):
            head, tails[step.id] = _build_step(step, tails, spec.astra_conn_id)
            if step.doc:
                head.doc_md = step.doc
            for other in _upstream(step, spec.steps[:number]):
                tails[other] >> head
        if any(
            isinstance(s, TaskStep | ExportStep) and s.trigger_rule not in FAILURE_STOPS for s in spec.steps
        ):
            _fail_run_on_failures(dag)
    dag.fileloc = str(Path(spec.path).with_suffix(".py"))
    return dag


def _upstream(step: Any, above: list[Any]) -> list[str]:
    """The steps ``step`` runs after: its ``after``; for an export step without one, the last steps above
    (those no other step runs after or takes inputs from), so that it runs at the end of the pipeline."""
    if not isinstance(step, ExportStep) or step.after:
        return step.after
    followed = {s.inputs.step for s in above if isinstance(s, TaskStep) and s.inputs and s.inputs.step}
    followed |= {other for s in above for other in _upstream(s, [])}
    return [s.id for s in above if s.id not in followed]


def _build_step(step: Any, tails: dict[str, Any], conn_id: str) -> tuple[Any, Any]:
    """The first task of a step, and the task whose XCom is its output."""
    if isinstance(step, SensorStep):
        from astra_provider.sensors.data_products import DataProductSensor

        kwargs = {"astra_conn_id": conn_id, **step.sensor.model_dump(exclude_none=True)}
        sensor = DataProductSensor(task_id=step.id, **kwargs)
        return sensor, sensor
    if isinstance(step, AssetEventsStep):
        from astra_provider.operators.asset_events import AssetEventDataProductsOperator

        options = step.asset_events.model_dump(exclude_none=True) if step.asset_events else {}
        events = AssetEventDataProductsOperator(task_id=step.id, astra_conn_id=conn_id, **options)
        return events, events
    if isinstance(step, ExportStep):
        from astra_provider.operators.export import ExportCatalogueOperator

        export = ExportCatalogueOperator(
            task_id=step.id,
            trigger_rule=step.trigger_rule,
            astra_conn_id=conn_id,
            **step.export.model_dump(exclude_none=True),
            **_operator_args(step.operator_args),
        )
        return export, export

    from astra_provider.operators.bundle import BundleTasksOperator
    from astra_provider.operators.task import (
        DEFAULT_MAP_INDEX_TEMPLATE,
        AstraTaskOperator,
        ExecuteBundleOperator,
    )

    inputs = step.inputs
    data_products = None
    if inputs is not None:
        data_products = tails[inputs.step].output if inputs.step else inputs.data_products
    # when the step's first operator (the task operator, or the bundle planner) runs, and on what
    first: dict[str, Any] = {
        "trigger_rule": step.trigger_rule,
        "parameters": step.parameters,
        "input_filetypes": inputs.filetypes if inputs else None,
        "enabled": step.enabled,
    }
    # what the operators that run the tasks take
    running: dict[str, Any] = {"task_class": step.task, "force": step.force, "astra_conn_id": conn_id}
    if step.max_failure_fraction is not None:
        running["max_failure_fraction"] = step.max_failure_fraction
    if not step.bundle:
        operator = AstraTaskOperator(
            task_id=step.id,
            input_data_products=data_products,
            **first,
            **running,
            **_operator_args(step.operator_args),
        )
        return operator, operator
    bundles = BundleTasksOperator(
        task_id=f"{step.id}_bundles",
        task_class=step.task,
        items=inputs.items,
        data_products=data_products,
        bundle_size=500 if step.bundle_size is None else step.bundle_size,
        max_bundles=100 if step.max_bundles is None else step.max_bundles,
        astra_conn_id=conn_id,
        **first,
    )
    run = ExecuteBundleOperator.partial(
        task_id=step.id,
        map_index_template=DEFAULT_MAP_INDEX_TEMPLATE,
        **running,
        **_operator_args(step.operator_args),
    ).expand_kwargs(bundles.output)
    return bundles, run


def _raise_step_failed(**context: Any) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    failed: list[str] = []
    with contextlib.suppress(Exception):  # the names of the failed task instances, if Airflow gives them
        states = context["ti"].get_task_states(dag_id=context["dag"].dag_id, run_ids=[context["run_id"]])
        failed = sorted(t for t, s in states[context["run_id"]].items() if s in ("failed", "upstream_failed"))
    names = f": {', '.join(failed)}" if failed else ""
    raise AirflowFailException(f"a step of this run failed{names}; the steps after it ran on what succeeded")


def _fail_run_on_failures(dag: Any) -> None:
    from airflow.providers.standard.operators.python import PythonOperator

    watcher = PythonOperator(
        task_id="any_step_failed",
        python_callable=_raise_step_failed,
        trigger_rule="one_failed",
        retries=0,
        doc_md="Skipped when every step succeeded; fails the run when a task failed, even if the steps "
        "after it ran (their trigger rules allow it).",
    )
    for task in dag.tasks:
        if task is not watcher:
            task >> watcher


def dag_from_spec(path: str | Path) -> Any:
    """Load, validate and build the DAG of a spec; ``path`` may be the DAG file (``x.py`` reads ``x.yaml``).

    Raises :class:`SpecError` for an invalid spec: call it at the top level of a DAG file so that Airflow
    records the error as that file's import error.
    """
    path = Path(path)
    if path.suffix == ".py":
        path = next((p for p in (path.with_suffix(".yaml"), path.with_suffix(".yml")) if p.exists()), path)
        if path.suffix == ".py":
            raise SpecError(path, [f"{path}: no spec {path.with_suffix('.yaml').name} next to this DAG file"])
    return build_dag(load_spec(path))


# --- Deeper checks (import task classes) -------------------------------------------------------------------


def check_task_classes(spec: PipelineSpec) -> list[str]:
    """Import each step's task class and check its parameter names; returns the problems (empty if none).

    Classes are imported only through :func:`astra_provider.base.import_task_class` (which decides what may
    be imported). Parameters missing from the spec are allowed when the step's inputs may provide them per
    task (``inputs.items``); otherwise a required parameter must be given.
    """
    from astra_provider.base import import_task_class

    problems = []
    for step in spec.steps:
        if not isinstance(step, TaskStep):
            continue
        where = f"{spec.path}: step {step.id!r}: field"
        try:
            cls = import_task_class(step.task)
        except LookupError as error:
            problems.append(f"{where} 'task': {error}")
            continue
        definitions = cls.parameter_definitions()
        for name in sorted(set(step.parameters) - set(definitions)):
            known = ", ".join(sorted(definitions))
            message = f"{cls.__name__} has no parameter {name!r} (parameters: {known})"
            problems.append(f"{where} 'parameters.{name}': {message}")
        if step.inputs is None or "items" not in step.inputs.model_fields_set:
            for name in sorted(n for n, p in definitions.items() if p.required and n not in step.parameters):
                problems.append(f"{where} 'parameters': {cls.__name__} requires parameter {name!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m astra_provider.dag_factory [--schema] SPEC_OR_DIR ...``: check specs, or print a schema."""
    parser = argparse.ArgumentParser(
        prog="python -m astra_provider.dag_factory",
        description="Check pipeline specs and their task classes.",
    )
    parser.add_argument("paths", nargs="*", type=Path, help="specs, or folders of *.yaml specs, to check")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of a spec and exit")
    args = parser.parse_args(argv)
    if args.schema:
        sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
        return 0
    paths = [
        p for target in args.paths for p in (sorted(target.glob("*.yaml")) if target.is_dir() else [target])
    ]
    failed = 0
    for path in paths:
        try:
            problems = check_task_classes(load_spec(path))
        except SpecError as error:
            problems = error.errors
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {path}")
        for problem in problems:
            print(f"     {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
