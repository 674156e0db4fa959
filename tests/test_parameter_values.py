"""Parameter values that JSON numbers cannot carry (inf, -inf, nan, -0.0) round-trip exactly and keep their
own task identity, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sqlalchemy import select, text

from astra_provider.base import Parameter, TaskInstance, bundle_key
from astra_provider.bundling import instance_from_bundle, plan_bundles
from astra_provider.database import session_scope
from astra_provider.database.astradb import Bundle, Task
from astra_provider.database.astradb import Parameter as ParameterRow
from astra_provider.utils import canonical_json, parse_json, to_json_value

SPECIAL = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "-0.0": -0.0}


class Echo(TaskInstance):
    value = Parameter()

    def execute(self):
        return [None for _ in self.iterable()]


class Shifted(TaskInstance):
    offset = Parameter(bundled=True)
    value = Parameter()

    def execute(self):
        return [task.parameters["value"] for task, _ in self.iterable()]


def same_float(a: object, b: object) -> bool:
    """Equal as values: the same float bits up to NaN payloads (all NaNs are one value), sign of zero kept."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b and type(a) is type(b)


def strict_json(encoded: str) -> object:
    """Parse ``encoded`` as standard JSON (no NaN/Infinity tokens)."""

    def refuse(token: str) -> None:
        raise ValueError(f"not standard JSON: {token}")

    return json.loads(encoded, parse_constant=refuse)


@pytest.mark.parametrize("name", SPECIAL)
def test_canonical_json_is_valid_json_and_round_trips(name):
    value = SPECIAL[name]
    encoded = canonical_json(value)
    assert strict_json(encoded) == {"$float": name}
    assert same_float(parse_json(encoded), value)
    nested = {"a": [value, 1.5], "b": None}
    decoded = parse_json(canonical_json(nested))
    assert same_float(decoded["a"][0], value) and decoded["a"][1] == 1.5 and decoded["b"] is None


def test_special_floats_are_distinct_from_none_from_strings_and_from_each_other():
    encodings = [canonical_json(v) for v in [*SPECIAL.values(), None, 0.0, "inf", "nan", "-0.0"]]
    assert len(set(encodings)) == len(encodings)


def test_every_special_float_is_its_own_task_and_round_trips(astra_db):
    instances = {name: Echo(value=value) for name, value in SPECIAL.items()}
    for instance in instances.values():
        instance.execute()
    none = Echo(value=None)
    none.execute()
    assert none.summary()["completed"] == 1, "Echo(value=None) must not be the twin of a special float"
    zero = Echo(value=0.0)
    zero.execute()
    assert zero.summary()["completed"] == 1, "0.0 and -0.0 are different values"
    task_ids = [i.tasks[0].task_id for i in [*instances.values(), none, zero]]
    assert len(set(task_ids)) == len(task_ids)

    for name, instance in instances.items():
        again = Echo(value=SPECIAL[name])
        again.execute()
        assert again.summary()["skipped"] == 1, f"{name}: the same value is the same task"
        stored = Task.get_by_id(instance.tasks[0].pk)  # parameters read from the database
        assert same_float(stored.parameters["value"], SPECIAL[name]), name
        rebuilt = TaskInstance.from_task(stored)
        assert same_float(rebuilt.value, SPECIAL[name]), name
        rebuilt.execute()
        assert rebuilt.summary()["skipped"] == 1 and rebuilt.tasks[0].pk == stored.pk
    with session_scope() as session:
        stored_values = set(session.scalars(select(ParameterRow.parameter_value)))
    for name in SPECIAL:
        assert json.dumps({"$float": name}, separators=(",", ":")) in stored_values
    assert all(strict_json(value) is not ... for value in stored_values)  # all standard JSON


def test_numpy_and_nested_special_floats(astra_db):
    instance = Echo(value=np.array([np.inf, -0.0, 2.5]))
    instance.execute()
    stored = Task.get_by_id(instance.tasks[0].pk).parameters["value"]
    assert [same_float(a, b) for a, b in zip(stored, [math.inf, -0.0, 2.5], strict=True)] == [True] * 3


def test_a_bundled_special_float_is_recorded_with_its_bundle(astra_db):
    bundle = Shifted(offset=-math.inf, value=(1, 2, 3))
    bundle.execute()
    with session_scope() as session:
        recorded = session.scalars(select(Bundle)).one()
    assert recorded.bundled_parameters == {"offset": {"$float": "-inf"}}  # JSON(B) keeps the tagged form
    assert bundle_key(Shifted(offset=-math.inf, value=1)) != bundle_key(Shifted(offset=None, value=1))
    assert bundle_key(Shifted(offset=-0.0, value=1)) != bundle_key(Shifted(offset=0.0, value=1))


def test_planned_bundles_carry_special_floats_through_json(astra_db):
    items = [{"value": v} for v in (math.nan, -0.0, 0.0, None)]
    bundles = plan_bundles(Shifted, items, parameters={"offset": math.inf})
    assert len(bundles) == 1
    transported = strict_json(json.dumps(bundles[0], allow_nan=False))  # what an XCom keeps
    instance = instance_from_bundle(Shifted, transported)
    assert same_float(instance.offset, math.inf)
    assert [same_float(a, b) for a, b in zip(instance.value, [math.nan, -0.0, 0.0, None], strict=True)] == [
        True
    ] * 4
    split = plan_bundles(Shifted, [{"value": 1, "offset": -0.0}, {"value": 1, "offset": 0.0}])
    assert len(split) == 2, "bundled -0.0 and 0.0 are different bundles"


def test_a_bad_float_tag_names_the_parameter():
    with pytest.raises(ValueError, match=r"Echo\(\): parameter 'value': .*'\$float'.*'infinity'"):
        Echo(value={"$float": "infinity"})


def test_postgresql_jsonb_drops_the_sign_of_zero_but_keeps_the_tag(postgres_db):
    """Why -0.0 is tagged too: JSON readers such as jsonb read the number -0.0 as 0."""
    with session_scope() as session:
        plain, tagged = session.execute(
            text("SELECT CAST('-0.0' AS JSONB)::text, CAST(:tagged AS JSONB)::text"),
            {"tagged": canonical_json(-0.0)},
        ).one()
    assert plain in ("0.0", "0")
    assert same_float(parse_json(tagged), -0.0)
    assert to_json_value({"x": -0.0}) == {"x": {"$float": "-0.0"}}
