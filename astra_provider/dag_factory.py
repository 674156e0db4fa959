"""Build Airflow DAGs from declarative YAML pipeline specs.

One spec per pipeline, next to a two-line DAG file with the same name (``dags/astra_continuum.yaml`` and
``dags/astra_continuum.py``)::

    \"\"\"Airflow DAG built from astra_continuum.yaml by the astra DAG factory.\"\"\"
    from astra_provider.dag_factory import dag_from_spec

    dag = dag_from_spec(__file__)

A broken spec raises :class:`SpecError` (naming the file, the step and the field) while that one DAG file is
imported, so Airflow reports it as the import error of that file alone; the other DAGs are unaffected.

Spec format (see ``docs/airflow.md`` for the full reference)::

    dag_id: astra_continuum                 # default: the file name
    description: Continuum-normalise APOGEE spectra.
    schedule: null                          # null, a cron expression or preset, or {asset: {...watcher...}}
    tags: [astra]
    params:                                 # run-time parameters: typed, described, shown in the trigger form
      data_products:
        type: array
        default: []
        description: Data product pks, paths or glob patterns to process.
    steps:
      - id: continuum
        task: astra_provider.contrib.continuum.SinusoidalContinuum
        inputs: {data_products: "{{ params.data_products }}"}
        parameters: {deg: 3, output_dir: "{{ params.output_dir }}"}
        bundle_size: 500
        max_bundles: 100

DAG files import only this module, PyYAML and the Task SDK: task classes (and NumPy, SciPy, astropy) are
imported when tasks run. :func:`check_task_classes` imports them to check parameter names (tests, CI).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

# --- Spec schema ---------------------------------------------------------------------------------------

DAG_FIELDS = {
    "dag_id",
    "description",
    "doc_md",
    "schedule",
    "start_date",
    "catchup",
    "max_active_runs",
    "max_active_tasks",
    "tags",
    "default_args",
    "astra_conn_id",
    "params",
    "steps",
}
DEFAULT_ARGS = {"owner", "retries", "retry_delay", "retry_exponential_backoff", "execution_timeout", "pool"}
STEP_FIELDS = {"id", "doc", "after", "task", "sensor", "asset_events"}
TASK_STEP_FIELDS = {
    "parameters",
    "inputs",
    "bundle",
    "bundle_size",
    "max_bundles",
    "max_failure_fraction",
    "force",
    "trigger_rule",
    "operator_args",
}
INPUT_FIELDS = {"step", "data_products", "items", "filetypes"}
OPERATOR_ARGS = {
    "retries",
    "retry_delay",
    "execution_timeout",
    "pool",
    "queue",
    "priority_weight",
    "max_active_tis_per_dagrun",
    "max_active_tis_per_dag",
}
SENSOR_FIELDS = {
    "root",
    "filetypes",
    "pattern",
    "min_age_seconds",
    "max_files",
    "deferrable",
    "mode",
    "poke_interval",
    "timeout",
    "soft_fail",
    "exponential_backoff",
    "max_wait",
    "use_ctime",
    "include_registered",
}
SECONDS_FIELDS = {"retry_delay", "execution_timeout"}
PARAM_FIELDS = {
    "type",
    "default",
    "description",
    "title",
    "enum",
    "values_display",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "examples",
    "section",
    "const",
}
PARAM_TYPES = {"string", "integer", "number", "boolean", "array", "object", "null"}
TRIGGER_RULES = {
    "all_success",
    "all_failed",
    "all_done",
    "all_done_min_one_success",
    "all_skipped",
    "one_success",
    "one_failed",
    "one_done",
    "none_failed",
    "none_failed_min_one_success",
    "none_skipped",
    "always",
}
# A step runs when nothing upstream failed and something upstream succeeded: an upstream step skipped for
# lack of data does not stop it, but with every upstream step skipped it is skipped too.
DEFAULT_TRIGGER_RULE = "none_failed_min_one_success"
DEFAULT_START_DATE = datetime(2025, 1, 1)
TASK_ID = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
DOTTED_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# Template variables that only exist when a run has a logical date (UI, REST and asset runs have none).
LOGICAL_DATE_VARIABLES = re.compile(
    r"{{[^}]*\b(ds|ds_nodash|ts|ts_nodash|ts_nodash_with_tz|logical_date|execution_date|data_interval_start|"
    r"data_interval_end|prev_ds|next_ds|prev_data_interval_start_success|prev_data_interval_end_success)\b"
)
ENV_REFERENCE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
PARAM_REFERENCE = re.compile(r"\bparams(?:\.(\w+)|\[\s*['\"](\w+)['\"]\s*\])")


class SpecError(ValueError):
    """A pipeline spec is invalid; ``errors`` lists every problem as ``"file: step 'x': field 'y': ..."``."""

    def __init__(self, path: str | Path, errors: list[str]):
        self.path = str(path)
        self.errors = errors
        lines = "\n".join(f"  - {error}" for error in errors)
        super().__init__(f"invalid astra pipeline spec {self.path} ({len(errors)} problem(s)):\n{lines}")


@dataclass
class StepSpec:
    """One validated step of a pipeline spec."""

    id: str
    kind: str  # "task", "sensor" or "asset_events"
    config: dict[str, Any]
    after: list[str] = field(default_factory=list)
    doc: str | None = None


@dataclass
class PipelineSpec:
    """A validated pipeline spec."""

    path: str
    dag_id: str
    steps: list[StepSpec]
    params: dict[str, dict[str, Any]]
    options: dict[str, Any]


class _Checker:
    """Collects problems, each prefixed with the file, step and field concerned."""

    def __init__(self, path: str):
        self.path = path
        self.errors: list[str] = []

    def error(self, message: str, step: str | None = None, field_name: str | None = None) -> None:
        where = [self.path]
        if step is not None:
            where.append(f"step {step!r}")
        if field_name is not None:
            where.append(f"field {field_name!r}")
        self.errors.append(f"{': '.join(where)}: {message}")

    def unknown(
        self, mapping: Mapping[str, Any], allowed: set[str], step: str | None, prefix: str = ""
    ) -> None:
        for key in sorted(set(mapping) - allowed, key=str):
            self.error(f"unknown field (allowed: {', '.join(sorted(allowed))})", step, f"{prefix}{key}")


def _expand_env(value: Any, checker: _Checker, location: str = "") -> Any:
    """``${NAME}`` and ``${NAME:-default}`` in strings replaced by environment variables (at parse time)."""
    import os

    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            checker.error(
                f"environment variable {name} is not set (write ${{{name}:-default}})", None, location
            )
            return match.group(0)

        return ENV_REFERENCE.sub(replace, value)
    if isinstance(value, Mapping):
        return {
            k: _expand_env(v, checker, f"{location}.{k}" if location else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand_env(v, checker, f"{location}[{i}]") for i, v in enumerate(value)]
    return value


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def _strings(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every string in a nested value, with its location."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, Mapping):
        return [
            item for key, v in value.items() for item in _strings(v, f"{path}.{key}" if path else str(key))
        ]
    if isinstance(value, list | tuple):
        return [item for i, v in enumerate(value) for item in _strings(v, f"{path}[{i}]")]
    return []


def _check_number(
    checker: _Checker,
    value: Any,
    step: str | None,
    name: str,
    *,
    integer: bool,
    minimum: float | None = None,
    maximum: float | None = None,
) -> None:
    if _is_template(value):
        return
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        what = "an integer" if integer else "a number"
        bounds = ""
        if minimum is not None and maximum is not None:
            bounds = f" between {minimum:g} and {maximum:g}"
        elif minimum is not None:
            bounds = f" >= {minimum:g}"
        checker.error(f"must be {what}{bounds} or a {{{{ template }}}}, got {value!r}", step, name)


def _check_params(checker: _Checker, params: Any, scheduled: bool) -> dict[str, dict[str, Any]]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        checker.error(
            "must be a mapping of parameter name to {type, default, description, ...}", None, "params"
        )
        return {}
    checked: dict[str, dict[str, Any]] = {}
    for name, schema in params.items():
        where = f"params.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*", name):
            checker.error("parameter names must be identifiers", None, where)
            continue
        if not isinstance(schema, Mapping):
            checker.error("must be a mapping with at least 'type' and 'description'", None, where)
            continue
        checker.unknown(schema, PARAM_FIELDS, None, f"{where}.")
        types = schema.get("type")
        type_list = types if isinstance(types, list) else [types]
        if types is None or not all(t in PARAM_TYPES for t in type_list):
            checker.error(f"'type' must be one of {', '.join(sorted(PARAM_TYPES))} (or a list)", None, where)
        if not isinstance(schema.get("description"), str) or not schema["description"].strip():
            checker.error("'description' is required (it is shown in the trigger form)", None, where)
        if "default" not in schema and scheduled:
            checker.error("needs a 'default': scheduled runs have no trigger form", None, where)
        if "default" in schema and types is not None:
            try:
                _param(schema).resolve(suppress_exception=False)
            except Exception as error:  # jsonschema's message names the failing constraint
                checker.error(f"the default {schema['default']!r} is invalid: {error}", None, where)
        checked[name] = dict(schema)
    return checked


def _param(schema: Mapping[str, Any]) -> Any:
    from airflow.sdk import Param

    schema = dict(schema)
    description = schema.pop("description", None)
    if "default" in schema:
        default = schema.pop("default")
        return Param(default, description=description, **schema)
    return Param(description=description, **schema)


def _check_inputs(checker: _Checker, inputs: Any, step: str, known: dict[str, str]) -> None:
    if inputs is None:
        return
    if isinstance(inputs, str):
        inputs = {"step": inputs}
    if not isinstance(inputs, Mapping):
        checker.error(
            "must be a mapping: {step: <id>} or {data_products: ...} or {items: ...}", step, "inputs"
        )
        return
    checker.unknown(inputs, INPUT_FIELDS, step, "inputs.")
    sources = [key for key in ("step", "data_products", "items") if key in inputs]
    if len(sources) > 1:
        checker.error(
            f"give only one of step, data_products, items (got {', '.join(sources)})", step, "inputs"
        )
    if not sources:
        checker.error("give one of step, data_products, items", step, "inputs")
    if "step" in inputs:
        source = inputs["step"]
        if source == step:
            checker.error("a step cannot take its own outputs as inputs", step, "inputs.step")
        elif source not in known:
            checker.error(
                f"unknown step {source!r} (inputs must come from a step defined above: "
                f"{', '.join(known) or 'none'})",
                step,
                "inputs.step",
            )
    filetypes = inputs.get("filetypes")
    if filetypes is not None and not (
        isinstance(filetypes, list) and all(isinstance(f, str) for f in filetypes)
    ):
        checker.error("must be a list of filetype names", step, "inputs.filetypes")


def _check_task_step(checker: _Checker, step: Mapping[str, Any], sid: str, known: dict[str, str]) -> None:
    path = step["task"]
    if not isinstance(path, str) or not DOTTED_PATH.fullmatch(path):
        checker.error(f"must be the dotted path of a task class (module.Class), got {path!r}", sid, "task")
    parameters = step.get("parameters", {})
    if not isinstance(parameters, Mapping):
        checker.error("must be a mapping of parameter name to value", sid, "parameters")
    _check_inputs(checker, step.get("inputs"), sid, known)
    bundle = step.get("bundle", True)
    if not isinstance(bundle, bool):
        checker.error(f"must be true or false, got {bundle!r}", sid, "bundle")
    if bundle and step.get("inputs") is None:
        checker.error("a bundled step needs inputs (or set bundle: false to run one task)", sid, "inputs")
    if not bundle:
        for name in ("bundle_size", "max_bundles"):
            if name in step:
                checker.error("only applies to bundled steps (bundle: true)", sid, name)
    if "bundle_size" in step:
        _check_number(checker, step["bundle_size"], sid, "bundle_size", integer=True, minimum=1)
    if "max_bundles" in step:
        _check_number(checker, step["max_bundles"], sid, "max_bundles", integer=True, minimum=1)
    if "max_failure_fraction" in step:
        _check_number(
            checker,
            step["max_failure_fraction"],
            sid,
            "max_failure_fraction",
            integer=False,
            minimum=0,
            maximum=1,
        )
    force = step.get("force", False)
    if not isinstance(force, bool) and not _is_template(force):
        checker.error(f"must be true, false or a {{{{ template }}}}, got {force!r}", sid, "force")
    _check_operator_args(checker, step.get("operator_args"), sid)
    if "trigger_rule" in step and step["trigger_rule"] not in TRIGGER_RULES:
        checker.error(
            f"unknown trigger rule {step['trigger_rule']!r} (one of {', '.join(sorted(TRIGGER_RULES))})",
            sid,
            "trigger_rule",
        )


def _check_operator_args(checker: _Checker, args: Any, sid: str) -> None:
    if args is None:
        return
    if not isinstance(args, Mapping):
        checker.error("must be a mapping", sid, "operator_args")
        return
    checker.unknown(args, OPERATOR_ARGS, sid, "operator_args.")
    for name in SECONDS_FIELDS & set(args):
        _check_number(checker, args[name], sid, f"operator_args.{name}", integer=False, minimum=0)
    for name in {"retries", "priority_weight", "max_active_tis_per_dagrun", "max_active_tis_per_dag"} & set(
        args
    ):
        _check_number(checker, args[name], sid, f"operator_args.{name}", integer=True, minimum=0)


def _check_sensor_step(checker: _Checker, config: Any, sid: str) -> None:
    if not isinstance(config, Mapping):
        checker.error(
            "must be a mapping of DataProductSensor arguments (root, filetypes, ...)", sid, "sensor"
        )
        return
    if "root" not in config:
        checker.error("the data root to watch is required", sid, "sensor.root")
    filetypes = config.get("filetypes")
    if filetypes is not None and not (
        isinstance(filetypes, list) and all(isinstance(f, str) for f in filetypes)
    ):
        checker.error("must be a list of filetype names", sid, "sensor.filetypes")
    for name in ("poke_interval", "timeout", "min_age_seconds"):
        if name in config:
            _check_number(checker, config[name], sid, f"sensor.{name}", integer=False, minimum=0)
    mode = config.get("mode", "poke")
    if mode not in ("poke", "reschedule"):
        checker.error(f"must be 'poke' or 'reschedule', got {mode!r}", sid, "sensor.mode")
    poke_interval = config.get("poke_interval", 60)
    if mode == "reschedule" and isinstance(poke_interval, int | float) and poke_interval < 60:
        checker.error(
            "reschedule mode with a poke_interval under 60 s is unsafe on Airflow 3.3 (the scheduler can "
            "mark the sensor failed, apache/airflow#71172); use deferrable: true",
            sid,
            "sensor.mode",
        )
    deferrable = config.get("deferrable", True)
    if not isinstance(deferrable, bool):
        checker.error(f"must be true or false, got {deferrable!r}", sid, "sensor.deferrable")
    include_registered = config.get("include_registered", False)
    if not isinstance(include_registered, bool) and not _is_template(include_registered):
        checker.error(
            f"must be true, false or a {{{{ template }}}}, got {include_registered!r}",
            sid,
            "sensor.include_registered",
        )


def _check_schedule(checker: _Checker, schedule: Any) -> None:
    if schedule is None or isinstance(schedule, str):
        return
    if isinstance(schedule, Mapping) and set(schedule) == {"asset"}:
        asset = schedule["asset"]
        if not isinstance(asset, Mapping):
            checker.error("must be a mapping of reduced_spectra_asset() arguments", None, "schedule.asset")
            return
        for name in ("name", "root"):
            if not isinstance(asset.get(name), str) or not asset[name]:
                checker.error("is required (a string)", None, f"schedule.asset.{name}")
        for name in ("min_age_seconds", "poll_interval"):
            if name in asset:
                _check_number(checker, asset[name], None, f"schedule.asset.{name}", integer=False, minimum=0)
        return
    checker.error(
        "must be null, a cron expression or preset (e.g. '@daily'), or {asset: {...watcher settings...}}",
        None,
        "schedule",
    )


def validate_spec(data: Any, path: str | Path) -> PipelineSpec:
    """Check a parsed spec; return a :class:`PipelineSpec` or raise :class:`SpecError` listing problems."""
    path = str(path)
    checker = _Checker(path)
    if not isinstance(data, Mapping):
        raise SpecError(path, [f"{path}: the spec must be a YAML mapping, got {type(data).__name__}"])
    data = _expand_env(data, checker)
    checker.unknown(data, DAG_FIELDS, None)
    dag_id = data.get("dag_id", Path(path).stem)
    if not isinstance(dag_id, str) or not TASK_ID.fullmatch(dag_id):
        checker.error(f"must be letters, digits, '_', '-' or '.', got {dag_id!r}", None, "dag_id")
    schedule = data.get("schedule")
    _check_schedule(checker, schedule)
    for name in ("max_active_runs", "max_active_tasks"):
        if name in data:
            _check_number(checker, data[name], None, name, integer=True, minimum=1)
    if "catchup" in data and not isinstance(data["catchup"], bool):
        checker.error("must be true or false", None, "catchup")
    start_date = data.get("start_date")
    if start_date is not None and not isinstance(start_date, date):
        try:
            datetime.fromisoformat(str(start_date))
        except ValueError:
            checker.error(f"must be a date (YYYY-MM-DD), got {start_date!r}", None, "start_date")
    tags = data.get("tags", [])
    if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        checker.error("must be a list of strings", None, "tags")
    default_args = data.get("default_args", {})
    if not isinstance(default_args, Mapping):
        checker.error("must be a mapping", None, "default_args")
    else:
        checker.unknown(default_args, DEFAULT_ARGS, None, "default_args.")
        for name in SECONDS_FIELDS & set(default_args):
            _check_number(checker, default_args[name], None, f"default_args.{name}", integer=False, minimum=0)
    params = _check_params(checker, data.get("params"), scheduled=schedule is not None)

    steps_data = data.get("steps")
    steps: list[StepSpec] = []
    known: dict[str, str] = {}
    if not isinstance(steps_data, list) or not steps_data:
        checker.error("must be a non-empty list of steps", None, "steps")
        steps_data = []
    for index, step in enumerate(steps_data):
        if not isinstance(step, Mapping):
            checker.error(f"step #{index + 1} must be a mapping", None, "steps")
            continue
        sid = step.get("id")
        if not isinstance(sid, str) or not TASK_ID.fullmatch(sid):
            checker.error(
                f"step #{index + 1}: must be letters, digits, '_', '-' or '.', got {sid!r}", None, "id"
            )
            continue
        if sid in known:
            checker.error("duplicate step id", sid, "id")
            continue
        kinds = [kind for kind in ("task", "sensor", "asset_events") if kind in step]
        if len(kinds) != 1:
            checker.error("a step needs exactly one of task, sensor, asset_events", sid)
            continue
        kind = kinds[0]
        allowed = STEP_FIELDS | (TASK_STEP_FIELDS if kind == "task" else set())
        checker.unknown(step, allowed, sid)
        if kind == "task":
            _check_task_step(checker, step, sid, known)
        elif kind == "sensor":
            _check_sensor_step(checker, step["sensor"], sid)
        elif step["asset_events"] is not None and not (
            isinstance(step["asset_events"], Mapping) and set(step["asset_events"]) <= {"skip_when_empty"}
        ):
            checker.error("must be empty or {skip_when_empty: true|false}", sid, "asset_events")
        elif not (isinstance(schedule, Mapping) and "asset" in schedule):
            checker.error(
                "asset_events needs the DAG to be scheduled on an asset (schedule: {asset: ...})", sid
            )
        after = step.get("after", [])
        after = [after] if isinstance(after, str) else after
        if not isinstance(after, list):
            checker.error("must be a step id or a list of step ids", sid, "after")
            after = []
        for other in after:
            if other not in known:
                checker.error(f"unknown step {other!r} (must be defined above)", sid, "after")
        config = {k: v for k, v in step.items() if k not in ("id", "after", "doc")}
        steps.append(StepSpec(id=sid, kind=kind, config=config, after=list(after), doc=step.get("doc")))
        known[sid] = kind

    step_ids = {s.id for s in steps}
    for location, text in _strings(data):
        step_name = _step_of(location, steps_data)
        field_name = location.split(".", 1)[1] if step_name in step_ids and "." in location else location
        if LOGICAL_DATE_VARIABLES.search(text):
            checker.error(
                f"{text!r} uses a logical-date variable, undefined for runs triggered from the UI, the REST "
                "API or an asset; use {{ run_id }}, {{ dag_run.run_after }} or a param",
                step_name,
                field_name,
            )
        for match in PARAM_REFERENCE.finditer(text):
            name = match.group(1) or match.group(2)
            if "{{" in text and name not in params:
                checker.error(
                    f"uses undefined param {name!r} (define it under params)", step_name, field_name
                )
    if checker.errors:
        raise SpecError(path, checker.errors)
    options = {k: v for k, v in data.items() if k not in ("dag_id", "params", "steps")}
    return PipelineSpec(path=path, dag_id=dag_id, steps=steps, params=params, options=options)


def _step_of(location: str, steps_data: list[Any]) -> str | None:
    match = re.match(r"steps\[(\d+)\]", location)
    if not match:
        return None
    step = steps_data[int(match.group(1))]
    return step.get("id") if isinstance(step, Mapping) else None


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML pipeline spec."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(path, [f"{path}: cannot read the spec: {error}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(path, [f"{path}: invalid YAML: {error}"]) from None
    return validate_spec(data, path)


# --- Building DAGs ---------------------------------------------------------------------------------------


def _seconds(value: Any) -> Any:
    return timedelta(seconds=value) if isinstance(value, int | float) else value


def _start_date(value: Any) -> datetime:
    import pendulum

    if value is None:
        value = DEFAULT_START_DATE
    if isinstance(value, str):
        return pendulum.parse(value, tz="UTC")
    if isinstance(value, datetime):
        return pendulum.instance(value, tz="UTC")
    return pendulum.datetime(value.year, value.month, value.day, tz="UTC")


def _schedule(value: Any) -> Any:
    if isinstance(value, Mapping):
        from astra_provider.assets import reduced_spectra_asset

        return [reduced_spectra_asset(**value["asset"])]
    return value


def _doc_md(spec: PipelineSpec) -> str:
    lines = [spec.options.get("description") or spec.dag_id, "", f"Built from `{Path(spec.path).name}`.", ""]
    lines += ["| step | what |", "|---|---|"]
    for step in spec.steps:
        what = {
            "task": f"`{step.config.get('task')}`",
            "sensor": "data product sensor",
            "asset_events": "data products of the triggering asset events",
        }[step.kind]
        lines.append(f"| `{step.id}` | {what} |")
    if spec.options.get("doc_md"):
        lines += ["", spec.options["doc_md"]]
    return "\n".join(lines)


def build_dag(spec: PipelineSpec) -> Any:
    """The :class:`airflow.sdk.DAG` of a validated spec."""
    from airflow.sdk import DAG

    options = spec.options
    default_args = {
        k: _seconds(v) if k in SECONDS_FIELDS else v for k, v in options.get("default_args", {}).items()
    }
    dag = DAG(
        dag_id=spec.dag_id,
        description=options.get("description"),
        doc_md=_doc_md(spec),
        schedule=_schedule(options.get("schedule")),
        start_date=_start_date(options.get("start_date")),
        catchup=options.get("catchup", False),
        max_active_runs=options.get("max_active_runs", 1),
        tags=options.get("tags", ["astra"]),
        default_args=default_args,
        params={name: _param(schema) for name, schema in spec.params.items()},
        render_template_as_native_obj=True,
        **({"max_active_tasks": options["max_active_tasks"]} if "max_active_tasks" in options else {}),
    )
    conn_id = options.get("astra_conn_id", "astra_default")
    tails: dict[str, Any] = {}  # the task whose XCom is each step's output
    with dag:
        for step in spec.steps:
            head, tails[step.id] = _build_step(step, tails, conn_id)
            if step.doc:
                head.doc_md = step.doc
            for other in step.after:
                tails[other] >> head
    dag.fileloc = str(Path(spec.path).with_suffix(".py"))
    return dag


def _build_step(step: StepSpec, tails: dict[str, Any], conn_id: str) -> tuple[Any, Any]:
    config = step.config
    if step.kind == "sensor":
        from astra_provider.sensors.data_products import DataProductSensor

        kwargs = {"astra_conn_id": conn_id, **config["sensor"]}
        for name in ("timeout", "poke_interval"):
            if name in kwargs and isinstance(kwargs[name], int | float):
                kwargs[name] = float(kwargs[name])
        sensor = DataProductSensor(task_id=step.id, **kwargs)
        return sensor, sensor
    if step.kind == "asset_events":
        from astra_provider.operators.asset_events import AssetEventDataProductsOperator

        operator = AssetEventDataProductsOperator(
            task_id=step.id, astra_conn_id=conn_id, **(config.get("asset_events") or {})
        )
        return operator, operator

    from astra_provider.operators.bundle import BundleTasksOperator
    from astra_provider.operators.task import (
        DEFAULT_MAP_INDEX_TEMPLATE,
        AstraTaskOperator,
        ExecuteBundleOperator,
    )

    inputs = config.get("inputs")
    if isinstance(inputs, str):
        inputs = {"step": inputs}
    inputs = dict(inputs or {})
    data_products = tails[inputs["step"]].output if "step" in inputs else inputs.get("data_products")
    operator_args = {
        k: _seconds(v) if k in SECONDS_FIELDS else v for k, v in (config.get("operator_args") or {}).items()
    }
    common = {
        "task_class": config["task"],
        "force": config.get("force", False),
        "astra_conn_id": conn_id,
    }
    if "max_failure_fraction" in config:
        common["max_failure_fraction"] = config["max_failure_fraction"]
    trigger_rule = config.get("trigger_rule", DEFAULT_TRIGGER_RULE)
    if not config.get("bundle", True):
        operator = AstraTaskOperator(
            task_id=step.id,
            trigger_rule=trigger_rule,
            parameters=config.get("parameters") or {},
            input_data_products=data_products,
            input_filetypes=inputs.get("filetypes"),
            **common,
            **operator_args,
        )
        return operator, operator
    bundles = BundleTasksOperator(
        task_id=f"{step.id}_bundles",
        trigger_rule=trigger_rule,
        task_class=config["task"],
        items=inputs.get("items"),
        data_products=data_products,
        input_filetypes=inputs.get("filetypes"),
        parameters=config.get("parameters") or {},
        bundle_size=config.get("bundle_size", 500),
        max_bundles=config.get("max_bundles", 100),
        astra_conn_id=conn_id,
    )
    run = ExecuteBundleOperator.partial(
        task_id=step.id, map_index_template=DEFAULT_MAP_INDEX_TEMPLATE, **common, **operator_args
    ).expand_kwargs(bundles.output)
    return bundles, run


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

    Parameters that are missing from the spec are allowed when the step's inputs may provide them per task
    (``inputs.items``); otherwise a required parameter must be given.
    """
    from astra_provider.base import import_task_class

    checker = _Checker(spec.path)
    for step in spec.steps:
        if step.kind != "task":
            continue
        try:
            cls = import_task_class(step.config["task"])
        except LookupError as error:
            checker.error(str(error), step.id, "task")
            continue
        definitions = cls.parameter_definitions()
        given = set(step.config.get("parameters") or {})
        for name in sorted(given - set(definitions)):
            checker.error(
                f"{cls.__name__} has no parameter {name!r} (parameters: {', '.join(sorted(definitions))})",
                step.id,
                f"parameters.{name}",
            )
        inputs = step.config.get("inputs")
        if not (isinstance(inputs, Mapping) and "items" in inputs):
            for name in sorted(n for n, p in definitions.items() if p.required and n not in given):
                checker.error(f"{cls.__name__} requires parameter {name!r}", step.id, "parameters")
    return checker.errors


def main(argv: list[str] | None = None) -> int:
    """``python -m astra_provider.dag_factory SPEC_OR_DIR ...``: validate specs and their task classes."""
    import sys

    paths: list[Path] = []
    for argument in argv if argv is not None else sys.argv[1:]:
        target = Path(argument)
        paths.extend(sorted(target.glob("*.yaml")) if target.is_dir() else [target])
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
