"""Loading a pipeline spec: ``${ASTRA_...}`` references, validation into a
:class:`~astra_provider.dag_spec.PipelineSpec`, checks across fields, and every problem reported at once by
:class:`SpecError` as ``file: step 'x': field 'y': message``.

``${NAME}`` and ``${NAME:-default}`` are replaced when the spec is loaded, for ``ASTRA_*`` names and those
listed in ``$ASTRA_DAG_ENV_ALLOW`` only, never for a name that may hold a secret: the values end up in the UI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from astra_provider.dag_spec import (
    ERROR_TYPE,
    AssetEventsStep,
    AssetSchedule,
    PipelineSpec,
    SensorStep,
    TaskStep,
)

# Template variables that only exist when a run has a logical date (UI, REST and asset runs have none).
LOGICAL_DATE_VARIABLES = re.compile(
    r"{{[^}]*\b(ds|ds_nodash|ts|ts_nodash|ts_nodash_with_tz|logical_date|execution_date|data_interval_start|"
    r"data_interval_end|prev_ds|next_ds|prev_data_interval_start_success|prev_data_interval_end_success)\b"
)
PARAM_REFERENCE = re.compile(r"\bparams(?:\.(\w+)|\[\s*['\"](\w+)['\"]\s*\])")
ENV_REFERENCE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
#: Environment variables a spec may use besides ``ASTRA_*`` ones: a comma-separated list of names.
ENV_ALLOW_VARIABLE = "ASTRA_DAG_ENV_ALLOW"
#: Names refused even when allowed, because they may hold a secret.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE|_KEY$|DATABASE_URL|_CONN", re.I)


class SpecError(ValueError):
    """A pipeline spec is invalid; ``errors`` lists every problem as ``"file: step 'x': field 'y': ..."``."""

    def __init__(self, path: str | Path, errors: list[str]):
        self.path = str(path)
        self.errors = errors
        lines = "\n".join(f"  - {error}" for error in errors)
        super().__init__(f"invalid astra pipeline spec {self.path} ({len(errors)} problem(s)):\n{lines}")


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML pipeline spec; raise :class:`SpecError` listing every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SpecError(path, [f"{path}: cannot read the spec: {error}"]) from None
    except yaml.YAMLError as error:
        raise SpecError(path, [f"{path}: invalid YAML: {error}"]) from None
    return validate_spec(data, path)


def validate_spec(data: Any, path: str | Path) -> PipelineSpec:
    """Validate a parsed spec: a :class:`PipelineSpec`, or :class:`SpecError` listing every problem."""
    path = str(path)
    if not isinstance(data, Mapping):
        raise SpecError(path, [f"{path}: the spec must be a YAML mapping, got {type(data).__name__}"])
    errors: list[str] = []
    data = _expand_env({"dag_id": Path(path).stem, **data}, errors, path)
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(path, errors + [_describe(e, data, path) for e in error.errors()]) from None
    errors += [_line(path, step, field, message) for step, field, message in _cross_checks(spec)]
    if errors:
        raise SpecError(path, errors)
    spec._path = path
    return spec


def env_allowed(name: str) -> bool:
    """Whether a spec may use the environment variable ``name`` (``ASTRA_*`` or listed in
    ``$ASTRA_DAG_ENV_ALLOW``, and not a name that may hold a secret)."""
    listed = {n.strip() for n in os.environ.get(ENV_ALLOW_VARIABLE, "").split(",")}
    return (name.startswith("ASTRA_") or name in listed) and not SECRET_NAME.search(name)


def _expand_env(value: Any, errors: list[str], path: str, location: str = "") -> Any:
    """``${NAME}`` and ``${NAME:-default}`` in strings replaced by allowed environment variables."""
    if isinstance(value, Mapping):
        return {k: _expand_env(v, errors, path, f"{location}.{k}".lstrip(".")) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, errors, path, f"{location}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if not env_allowed(name):
            problem = f"may not be used (only ASTRA_* names and those in ${ENV_ALLOW_VARIABLE}; no secrets)"
        elif name in os.environ or default is not None:
            return os.environ.get(name, default)
        else:
            problem = f"is not set (write ${{{name}:-default}})"
        errors.append(_line(path, None, location, f"environment variable {name} {problem}"))
        return match.group(0)

    return ENV_REFERENCE.sub(replace, value)


def _line(path: str, step: str | None, field: str | None, message: str) -> str:
    where = [path] + ([f"step {step!r}"] if step else []) + ([f"field {field!r}"] if field else [])
    return f"{': '.join(where)}: {message}"


def _describe(error: Any, data: Mapping[str, Any], path: str) -> str:
    """One pydantic error as ``file: step 'x': field 'y': message``."""
    loc = list(error["loc"])
    step = None
    if loc[:1] == ["steps"] and len(loc) > 1 and isinstance(loc[1], int):
        raw = data["steps"][loc[1]]
        step = (
            raw.get("id") if isinstance(raw, Mapping) and isinstance(raw.get("id"), str) else f"#{loc[1] + 1}"
        )
        loc = loc[3:]  # the list, the index, the union's tag
    elif loc[:1] == ["schedule"]:
        loc = ["schedule", *loc[2:]]  # without the union's tag
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p != "[key]").lstrip(".")
    kind, models, name = error["type"], _models_holding(error["loc"]), error["loc"][-1]
    if kind == "extra_forbidden":
        message = f"unknown field (allowed: {', '.join(sorted({n for m in models for n in m.model_fields}))})"
    elif kind == "missing":
        about = next((m.model_fields[name].description for m in models if name in m.model_fields), None)
        message = f"is required ({about[0].lower()}{about[1:].rstrip('.')})" if about else "is required"
    else:  # written for this field (ERROR_TYPE), or pydantic's own
        message = error["msg"] if kind == ERROR_TYPE else f"{error['msg'].lower()}, got {error['input']!r}"
    return _line(path, step, field or None, message)


def _leaves(annotation: Any) -> Iterator[Any]:
    """The members of a (possibly annotated) union."""
    origin = get_origin(annotation)
    if origin is Annotated:
        yield from _leaves(get_args(annotation)[0])
    elif origin is Union or type(annotation).__name__ == "UnionType":
        for member in get_args(annotation):
            yield from _leaves(member)
    else:
        yield annotation


def _models_holding(loc: tuple[Any, ...]) -> list[type[BaseModel]]:
    """The models that may hold the last element of an error location."""
    node: Any = PipelineSpec
    for part in loc[:-1]:
        leaves = list(_leaves(node))
        models = [leaf for leaf in leaves if isinstance(leaf, type) and issubclass(leaf, BaseModel)]
        tagged = [m for m in models if part == getattr(m, "tag", None)]
        fields = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        items = [get_args(leaf)[-1] for leaf in leaves if get_origin(leaf) in (list, dict)]
        node = (tagged or fields or items or [None])[0]
    return [leaf for leaf in _leaves(node) if isinstance(leaf, type) and issubclass(leaf, BaseModel)]


def _strings(value: Any, location: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a nested value, with its location."""
    if isinstance(value, str):
        yield location, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{location}.{key}".lstrip("."))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _strings(item, f"{location}[{index}]")


def _unknown_arguments(target: Any, given: Mapping[str, Any], where: str) -> Iterator[tuple[str, str]]:
    """The keyword arguments in ``given`` that the class or function ``target`` does not take."""
    import inspect

    accepted: set[str] = set()
    for owner in getattr(target, "__mro__", [target]):
        if owner.__name__ == "BaseOperator":  # a sensor's own arguments, not those of every operator
            break
        function = owner.__init__ if isinstance(owner, type) else owner  # type: ignore[misc]  # a class here
        parameters = inspect.signature(function).parameters.values()
        accepted |= {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    for name in sorted(set(given) - accepted):
        yield f"{where}.{name}", f"unknown field (allowed: {', '.join(sorted(accepted - {'self'}))})"


def _cross_checks(spec: PipelineSpec) -> Iterator[tuple[str | None, str | None, str]]:
    """``(step, field, message)`` for problems across fields: references to steps and params, schedules."""
    if isinstance(spec.schedule, AssetSchedule):
        from astra_provider.assets import reduced_spectra_asset

        extra = spec.schedule.asset.model_extra or {}
        yield from (
            (None, f, m) for f, m in _unknown_arguments(reduced_spectra_asset, extra, "schedule.asset")
        )
    for name, param in spec.params.items():
        if spec.schedule is not None and not param.has_default:
            yield None, f"params.{name}", "needs a 'default': scheduled runs have no trigger form"
    for location, text in _strings(spec.model_dump(exclude={"steps"}, exclude_unset=True)):
        yield from _template_problems(spec, None, location, text)
    known: list[str] = []
    for step in spec.steps:
        if step.id in known:
            yield step.id, "id", "duplicate step id"
            continue
        for other in step.after:
            if other not in known:
                yield step.id, "after", f"unknown step {other!r} (must be defined above)"
        source = step.inputs.step if isinstance(step, TaskStep) and step.inputs else None
        if source == step.id:
            yield step.id, "inputs.step", "a step cannot take its own outputs as inputs"
        elif source is not None and source not in known:
            where = f"inputs must come from a step defined above: {', '.join(known) or 'none'}"
            yield step.id, "inputs.step", f"unknown step {source!r} ({where})"
        if isinstance(step, SensorStep):
            from astra_provider.sensors.data_products import DataProductSensor

            extra = step.sensor.model_extra or {}
            yield from ((step.id, f, m) for f, m in _unknown_arguments(DataProductSensor, extra, "sensor"))
        if isinstance(step, AssetEventsStep) and not spec.scheduled_on_asset:
            yield (
                step.id,
                None,
                "asset_events needs the DAG to be scheduled on an asset (schedule: {asset: ...})",
            )
        for location, text in _strings(step.model_dump(exclude_unset=True, exclude={"id"})):
            yield from _template_problems(spec, step.id, location, text)
        known.append(step.id)


def _template_problems(spec: PipelineSpec, step: str | None, location: str, text: str) -> Iterator[tuple]:
    if LOGICAL_DATE_VARIABLES.search(text):
        yield (
            step,
            location,
            f"{text!r} uses a logical-date variable, undefined for runs triggered from the UI, the REST API "
            "or an asset; use {{ run_id }}, {{ dag_run.run_after }} or a param",
        )
    for match in PARAM_REFERENCE.finditer(text) if "{{" in text else ():
        if (match.group(1) or match.group(2)) not in spec.params:
            name = match.group(1) or match.group(2)
            yield step, location, f"uses undefined param {name!r} (define it under params)"
