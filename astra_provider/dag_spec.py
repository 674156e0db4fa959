"""The YAML pipeline spec of the DAG factory as typed models (pydantic v2), and its JSON Schema.

:class:`PipelineSpec` is one spec: DAG options, run-time ``params`` and ``steps`` (:class:`TaskStep`,
:class:`SensorStep` or :class:`AssetEventsStep`). Each field type gives one clear message when a value is
wrong; :mod:`astra_provider.dag_spec_validation` loads specs, adds the file, step and field to each message,
and checks what one field cannot tell alone. :func:`json_schema` is ``schema/dag-spec.schema.json``, for
editors. Reference: ``docs/airflow.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date, datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, NoReturn, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StringConstraints,
    Tag,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# A step runs when nothing upstream failed and something upstream succeeded: an upstream step skipped for
# lack of data does not stop it, but with every upstream step skipped it is skipped too.
DEFAULT_TRIGGER_RULE = "none_failed_min_one_success"
TRIGGER_RULES = (
    *("all_success", "all_failed", "all_done", "all_done_min_one_success", "all_skipped", "always"),
    *("one_success", "one_failed", "one_done", "none_failed", "none_failed_min_one_success", "none_skipped"),
)
PARAM_TYPES = ("string", "integer", "number", "boolean", "array", "object", "null")
PARAM_KEYWORDS = {  # the JSON-schema keywords of a param besides type, description and default
    *("title", "enum", "values_display", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
    *("multipleOf", "minLength", "maxLength", "pattern", "format", "items", "minItems", "maxItems"),
    *("uniqueItems", "examples", "section", "const"),
}
ERROR_TYPE = "astra_spec"  # the pydantic error type of the messages written here


def fail(message: str) -> NoReturn:
    """Report ``message`` as the problem of the field being validated."""
    raise PydanticCustomError(ERROR_TYPE, message)


def _one_error(message: str | Callable[[Any], str]) -> WrapValidator:
    """Replace every error of the inner type (a union gives one per member) by one ``message, got x``."""

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            fail(message(value) if callable(message) else f"{message}, got {value!r}")

    return WrapValidator(validate)


def _parse_date(value: Any) -> Any:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else value
    except ValueError:
        fail(f"must be a date (YYYY-MM-DD), got {value!r}")


def _or_template(message: str) -> WrapValidator:
    """The message of a number type that may also be a ``{{ template }}`` (rendered when the task runs)."""
    return _one_error(f"{message} or a {{{{ template }}}}")


Template = Annotated[str, StringConstraints(pattern=r"\{\{")]
# The field types, written out as Annotated aliases (not built by functions) so that type checkers see them.
TaskId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,200}$"),
    _one_error("must be letters, digits, '_', '-' or '.'"),
]
DottedPath = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$"),
    _one_error("must be the dotted path of a task class (module.Class)"),
]
ParamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_]\w*$"), _one_error("must be an identifier")]
Count = Annotated[Annotated[StrictInt, Field(ge=1)] | Template, _or_template("must be an integer >= 1")]
Seconds = Annotated[Annotated[float, Field(ge=0)] | Template, _or_template("must be a number >= 0")]
Fraction = Annotated[
    Annotated[float, Field(ge=0, le=1)] | Template, _or_template("must be a number between 0 and 1")
]
PositiveInt = Annotated[StrictInt, Field(ge=1), _one_error("must be an integer >= 1")]
NonNegativeInt = Annotated[StrictInt, Field(ge=0), _one_error("must be an integer >= 0")]
Flag = Annotated[StrictBool | Template, _or_template("must be true, false")]
Bool = Annotated[StrictBool, _one_error("must be true or false")]
TriggerRule = Annotated[
    Literal[TRIGGER_RULES],  # type: ignore[valid-type]
    _one_error(lambda value: f"unknown trigger rule {value!r} (one of {', '.join(sorted(TRIGGER_RULES))})"),
]
ParamType = Literal[PARAM_TYPES]  # type: ignore[valid-type]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ParamSpec(_Model):
    """A run-time parameter: a JSON-schema mapping that becomes an ``airflow.sdk.Param``."""

    model_config = ConfigDict(extra="allow")  # the JSON-schema keywords of PARAM_KEYWORDS
    type: Annotated[
        ParamType | list[ParamType],
        _one_error(f"must be one of {', '.join(PARAM_TYPES)} (or a list of them)"),
    ] = Field(description="The JSON-schema type, or a list of types (e.g. [string, 'null']).")
    description: Annotated[str, StringConstraints(pattern=r"\S"), _one_error("must be a non-empty text")] = (
        Field(description="Shown in the trigger form.")
    )
    default: Any = Field(None, description="Without a default, the trigger form requires a value.")

    @property
    def has_default(self) -> bool:
        return "default" in self.model_fields_set

    def to_param(self) -> Any:
        """The ``airflow.sdk.Param`` of this parameter."""
        from airflow.sdk import Param

        arguments: dict[str, Any] = {"description": self.description}
        arguments |= self.model_dump(exclude_unset=True, exclude={"description", "default"})
        if self.has_default:
            arguments["default"] = self.default
        return Param(**arguments)

    @model_validator(mode="after")
    def _default_is_valid(self) -> ParamSpec:
        if unknown := sorted(set(self.model_extra or {}) - PARAM_KEYWORDS):
            fail(f"unknown keyword(s) {', '.join(unknown)} (allowed: {', '.join(sorted(PARAM_KEYWORDS))})")
        if self.has_default:
            try:
                self.to_param().resolve(suppress_exception=False)
            except Exception as error:  # jsonschema's message names the failing constraint
                fail(f"the default {self.default!r} is invalid: {str(error).strip().splitlines()[0]}")
        return self


class AssetWatcher(_Model):
    """The arguments of ``astra_provider.assets.reduced_spectra_asset`` (others are checked against it)."""

    model_config = ConfigDict(extra="allow")
    name: Annotated[str, StringConstraints(min_length=1)] = Field(description="The asset's name.")
    root: Annotated[str, StringConstraints(min_length=1)] = Field(description="The data root to watch.")
    filetypes: list[str] | None = None
    min_age_seconds: Seconds | None = None
    poll_interval: Seconds | None = None


class AssetSchedule(_Model):
    """``schedule: {asset: {...}}``: a run starts when the asset's watcher sees new files."""

    tag: ClassVar[str] = "on_asset"
    asset: AssetWatcher


CRON = "must be null, a cron expression or preset (e.g. '@daily'), or {asset: {...watcher settings...}}"
Schedule = Annotated[
    Union[Annotated[str, _one_error(CRON), Tag("cron")], Annotated[AssetSchedule, Tag(AssetSchedule.tag)]],  # noqa: UP007
    Discriminator(lambda value: AssetSchedule.tag if isinstance(value, Mapping | AssetSchedule) else "cron"),
]


class DefaultArgs(_Model):
    owner: str | None = None
    retries: NonNegativeInt | None = None
    retry_delay: Seconds | None = Field(None, description="Seconds.")
    retry_exponential_backoff: Bool | None = None
    execution_timeout: Seconds | None = Field(None, description="Seconds.")
    pool: str | None = None


class OperatorArgs(DefaultArgs):
    queue: str | None = None
    priority_weight: NonNegativeInt | None = None
    max_active_tis_per_dagrun: NonNegativeInt | None = None
    max_active_tis_per_dag: NonNegativeInt | None = None


class Inputs(_Model):
    """Where a task step's tasks come from: exactly one of ``step``, ``data_products``, ``items``."""

    step: TaskId | None = Field(None, description="A step above: its data products, or its tasks' outputs.")
    data_products: Any = Field(None, description="Pks, paths or glob patterns (usually a template).")
    items: Any = Field(None, description="One mapping of keyword arguments per task (usually a template).")
    filetypes: list[str] | None = Field(None, description="Keep only data products of these file types.")

    @model_validator(mode="after")
    def _one_source(self) -> Inputs:
        sources = [name for name in ("step", "data_products", "items") if name in self.model_fields_set]
        if len(sources) != 1:
            fail(
                "give only one of step, data_products, items"
                + (f" (got {', '.join(sources)})" if sources else "")
            )
        return self


class _Step(_Model):
    kind: ClassVar[str]  # the key that makes a mapping this kind of step
    tag: ClassVar[str]  # its tag in the union of steps (an element of error locations)
    id: TaskId = Field(description="The step's task id: letters, digits, '_', '-' or '.'.")
    doc: str | None = Field(None, description="Shown on the task in the UI.")
    after: Annotated[list[TaskId], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = Field(
        [], description="Steps defined above that must finish first."
    )


class TaskStep(_Step):
    """A step that runs a task class: in bundles (a planner, then a mapped task) or as one task."""

    kind: ClassVar[str] = "task"
    tag: ClassVar[str] = "task_step"
    task: DottedPath = Field(description="The dotted path of the task class (module.Class).")
    bundle: Bool = Field(
        True, description="true: a <id>_bundles planner, then one mapped task instance per bundle."
    )
    parameters: dict[str, Any] = Field({}, description="Parameter values of every task (may be templates).")
    inputs: Annotated[Inputs | None, BeforeValidator(lambda v: {"step": v} if isinstance(v, str) else v)] = (
        Field(
            None, validate_default=True, description="Where the tasks come from; a step id means {step: id}."
        )
    )
    bundle_size: Count | None = Field(None, description="Tasks per bundle (default 500).")
    max_bundles: Count | None = Field(None, description="At most this many bundles (default 100).")
    max_failure_fraction: Fraction | None = Field(
        None, description="The Airflow task fails past this fraction of failed tasks (0.1 bundled, else 0)."
    )
    force: Flag = Field(False, description="Run even if identical tasks completed.")
    enabled: Flag = Field(
        True,
        description="false (usually a template of params) skips the step, and the steps that need it, in a "
        "run; the run can still succeed.",
    )
    trigger_rule: TriggerRule = Field(DEFAULT_TRIGGER_RULE, description="The trigger rule of the step.")
    operator_args: OperatorArgs = Field(
        OperatorArgs(), description="Arguments of the task that runs the tasks."
    )

    @field_validator("inputs")
    @classmethod
    def _bundles_need_inputs(cls, inputs: Inputs | None, info: ValidationInfo) -> Inputs | None:
        if inputs is None and info.data.get("bundle", True):
            fail("a bundled step needs inputs (or set bundle: false to run one task)")
        return inputs

    @field_validator("bundle_size", "max_bundles")
    @classmethod
    def _bundled_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("bundle") is False:
            fail("only applies to bundled steps (bundle: true)")
        return value


class SensorConfig(_Model):
    """The arguments of a ``DataProductSensor`` (others are checked against its signature)."""

    model_config = ConfigDict(extra="allow")
    root: str = Field(description="The data root to watch (may be a template).")
    filetypes: list[str] | None = None
    pattern: str | None = None
    min_age_seconds: Seconds | None = None
    include_registered: Flag | None = None
    deferrable: Bool | None = Field(None, description="Default true: wait in the triggerer.")
    poke_interval: Seconds | None = None
    timeout: Seconds | None = None
    mode: Literal["poke", "reschedule"] | None = None

    @field_validator("mode")
    @classmethod
    def _safe_reschedule(cls, mode: str | None, info: ValidationInfo) -> str | None:
        interval = info.data.get("poke_interval")
        if mode == "reschedule" and isinstance(interval, float) and interval < 60:
            fail(
                "reschedule mode with a poke_interval under 60 s is unsafe on Airflow 3.3 (the scheduler can "
                "mark the sensor failed, apache/airflow#71172); use deferrable: true"
            )
        return mode


class SensorStep(_Step):
    """Wait for new data products under a data root and register them (``DataProductSensor``)."""

    kind: ClassVar[str] = "sensor"
    tag: ClassVar[str] = "sensor_step"
    sensor: SensorConfig


class AssetEvents(_Model):
    skip_when_empty: Bool | None = None


class AssetEventsStep(_Step):
    """Register the files of the asset events that triggered the run (needs ``schedule: {asset: ...}``)."""

    kind: ClassVar[str] = "asset_events"
    tag: ClassVar[str] = "asset_events_step"
    asset_events: AssetEvents | None = None


class ExportConfig(_Model):
    """The arguments of an ``ExportCatalogueOperator``: which catalogues, where."""

    output_dir: str | None = Field(
        None,
        description="Directory of the catalogue files (may be a template); empty: $ASTRA_HOME/catalogues.",
    )
    pipelines: (
        Annotated[list[str] | Template, _one_error("must be a list of result tables or a {{ template }}")]
        | None
    ) = Field(
        None, description="Result tables to export (doppler, thecannon...); default: every one with results."
    )
    kinds: (
        Annotated[
            list[Literal["star", "visit"]] | Template,
            _one_error("must be a list of star, visit or a {{ template }}"),
        ]
        | None
    ) = Field(None, description="star and/or visit (default both): one file per pipeline and kind.")
    format: (
        Annotated[
            Literal["fits", "csv", "parquet"] | Template,
            _one_error("must be fits, csv, parquet or a {{ template }}"),
        ]
        | None
    ) = Field(None, description="Default fits.")


class ExportStep(_Step):
    """Write the summary catalogues (``ExportCatalogueOperator``); without ``after``, at the end: after the
    steps above that no other step follows."""

    kind: ClassVar[str] = "export"
    tag: ClassVar[str] = "export_step"
    export: ExportConfig = Field(description="Its settings; {} for the defaults.")
    trigger_rule: TriggerRule = Field(
        "all_done",
        description="Default all_done: once the steps before it finished, failed or skipped (a failed bundle "
        "does not stop the catalogue of what succeeded; the run still fails).",
    )
    operator_args: OperatorArgs = Field(OperatorArgs(), description="Arguments of the export task.")


STEP_KINDS = {model.kind: model for model in (TaskStep, SensorStep, AssetEventsStep, ExportStep)}


def _step_tag(value: Any) -> str | None:
    """The union tag of a step: which one of the keys task, sensor, asset_events it has."""
    if isinstance(value, _Step):
        return value.tag
    kinds = [kind for kind in STEP_KINDS if isinstance(value, Mapping) and kind in value]
    return STEP_KINDS[kinds[0]].tag if len(kinds) == 1 else None


if TYPE_CHECKING:  # the union that the discriminated type below validates, as type checkers see it
    Step = Union[TaskStep, SensorStep, AssetEventsStep, ExportStep]  # noqa: UP007
else:
    Step = Annotated[
        Union[tuple(Annotated[model, Tag(model.tag)] for model in STEP_KINDS.values())],  # noqa: UP007
        Discriminator(
            _step_tag,
            custom_error_type=ERROR_TYPE,
            custom_error_message=f"a step needs exactly one of {', '.join(STEP_KINDS)}",
        ),
    ]


def _not_empty(steps: list[Any]) -> list[Any]:
    return steps or fail("must be a non-empty list of steps")


class PipelineSpec(_Model):
    """A pipeline: one Airflow DAG."""

    dag_id: TaskId = Field("", description="Default: the spec's file name.")
    description: str | None = None
    doc_md: str | None = None
    schedule: Schedule | None = None
    start_date: Annotated[date, BeforeValidator(_parse_date)] = date(2025, 1, 1)
    catchup: Bool = False
    max_active_runs: PositiveInt = 1
    max_active_tasks: PositiveInt | None = None
    tags: list[str] = ["astra"]
    default_args: DefaultArgs = DefaultArgs()
    astra_conn_id: str = Field("astra_default", description="The astra database connection of every step.")
    params: dict[ParamName, ParamSpec] = Field({}, description="Run-time parameters (the trigger form).")
    steps: Annotated[list[Step], AfterValidator(_not_empty)]
    _path: str = PrivateAttr("")

    @property
    def path(self) -> str:
        """The spec's file."""
        return self._path

    @property
    def scheduled_on_asset(self) -> bool:
        return isinstance(self.schedule, AssetSchedule)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec (``schema/dag-spec.schema.json``), for editors."""
    schema = PipelineSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "astra pipeline spec (astra_provider.dag_factory); see docs/airflow.md"
    return schema
