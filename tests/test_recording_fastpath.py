"""The bulk recording fast paths give exactly what the generic code would (suggested for tests/)."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
from sqlalchemy import text

from astra_provider.base import Parameter, TaskInstance
from astra_provider.database import session_scope
from astra_provider.database.astradb import Continuum
from astra_provider.database.recorder import encode_parameter_value, task_id
from astra_provider.database.recording import canonical_json_fast, get_or_create_parameters, pg_array
from astra_provider.utils import canonical_json, gc_paused, stable_hash

VALUES = [
    "",
    'a"b\\c',
    "é☃\n\t{},NULL",
    0,
    -7,
    2**70,
    0.0,
    -0.0,
    1.5,
    1e-300,
    float("nan"),
    float("inf"),
    None,
    True,
    False,
    (1, "a"),
    [1.5, None],
    {"b": 1, "a": "x"},
    {"k": [1, 2]},
    {1: "int key"},
    {"n": float("nan")},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_canonical_json_fast_is_canonical_json(value):
    assert canonical_json_fast(value) == canonical_json(value)


class Identity(TaskInstance):
    a = Parameter()
    b = Parameter(default=1)

    def execute(self):
        return None


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_task_id_is_the_stable_hash_of_the_task(value):
    parameters = {"a": value, "b": -0.0}
    identities = ["/full/abc", "dr19/apVisit/é"]
    hashed = stable_hash([Identity.__module__, Identity.__qualname__, parameters, identities])
    expected = "test_recording_fastpath.Identity_" + hashed  # the module is the namespace
    encoded = {k: encode_parameter_value(v) for k, v in parameters.items()}
    assert task_id(Identity, encoded, identities) == expected


def test_pg_array_round_trips(postgres_db):
    strings = ["", 'a"b\\c', "NULL", None, " x ", "é☃\n\t{},"]
    floats = [1.5, -0.0, float("inf"), float("-inf"), None, 5e-324]
    integers = [0, -(2**63), 2**63 - 1, None]
    with session_scope() as session:
        row = session.execute(
            text("SELECT CAST(:s AS TEXT[]), CAST(:f AS FLOAT8[]), CAST(:i AS BIGINT[])"),
            {"s": pg_array(strings), "f": pg_array(floats), "i": pg_array(integers)},
        ).one()
    assert row[0] == strings and row[2] == integers
    assert [None if x is None else math.copysign(1, x) * abs(x) for x in row[1]] == floats


class MixedResults(TaskInstance):
    x = Parameter()

    def execute(self):
        for task, data_products in self.iterable():
            x = task.parameters["x"]
            if x == 2:
                self.add_result(task, Continuum, snr=2.0, row_index=7)  # a column the others leave out
            else:
                self.add_result(task, Continuum, data_product=data_products[0] if x else None, snr=float(x))


def test_result_rows_may_set_different_columns(astra_db, data_files):
    MixedResults(input_data_products=[str(p) for p in data_files[:3]], x=(0, 1, 2)).execute()
    with session_scope() as session:
        rows = session.execute(
            text(
                "select data_product_pk is not null, snr, row_index, bitmask_flag "
                "from astra.continuum order by output_pk"
            )
        ).all()
    assert [tuple(r) for r in rows] == [(False, 0.0, 0, 0), (True, 1.0, 0, 0), (False, 2.0, 7, 0)]


class ResultPerTask(TaskInstance):
    model = Parameter(bundled=True)
    x = Parameter()

    def execute(self):
        for task, data_products in self.iterable():
            self.add_result(task, Continuum, data_product=data_products[0], snr=float(task.parameters["x"]))
        return [task.parameters["x"] for task, _ in self.iterable()]


def _statements_to_record(tmp_path, n: int, offset: int) -> list[str]:
    from sqlalchemy import event

    from astra_provider.database import get_engine

    paths = []
    for i in range(n):
        path = tmp_path / f"spec-{offset + i:05d}.fits"
        path.touch()
        paths.append(str(path))
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement.split(None, 3)[:3])

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", record)
    try:
        instance = ResultPerTask(input_data_products=paths, model="m", x=tuple(range(offset, offset + n)))
        instance.execute()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert instance.summary()["completed"] == n
    return statements


def test_recording_a_bundle_takes_the_same_statements_whatever_its_size(astra_db, tmp_path):
    """Tasks, parameters, data products, result rows and the final statuses and timings are written
    with a fixed number of statements: 500 tasks take no more than 5 (each task is updated once)."""
    _statements_to_record(tmp_path, 2, 5000)  # the first execution of the process also creates its lease
    small = _statements_to_record(tmp_path, 5, 0)
    large = _statements_to_record(tmp_path, 500, 1000)
    assert len(large) == len(small) and len(large) < 40
    with session_scope() as session:
        counts = session.execute(
            text(
                "select (select count(*) from astra.task where status_code = 2 and output_pk is not null "
                "and bundle_pk is not null), (select count(*) from astra.continuum), "
                "(select count(*) from astra.output_interface), (select count(*) from astra.task_parameter)"
            )
        ).one()
    assert tuple(counts) == (507, 507, 507, 507 * 4)  # the view: x, model and the two version parameters
    updates = [s for s in large if s[0].upper() == "UPDATE" and "task" in " ".join(s[1:]).lower()]
    assert len(updates) == 1  # one UPDATE of astra.task: status, timings, result and output_pk together


def test_get_or_create_inserts_only_what_is_missing_and_takes_no_key_for_the_rest(astra_db):
    """Existing rows are found, not inserted again: the new ones get the next keys (PostgreSQL's one
    statement leaves the existing keys out before the sequence is asked)."""
    first = [("x", '"a"'), ("x", '"b"'), ("y", "1")]
    with session_scope() as session:
        known = get_or_create_parameters(session, first)
    with session_scope() as session:
        again = get_or_create_parameters(session, [("z", "null"), *first, ("x", '"c"')])
        count = session.execute(text("select count(*) from astra.parameter")).scalar_one()
    assert {pair: again[pair] for pair in first} == known
    new = sorted(again[pair] for pair in [("z", "null"), ("x", '"c"')])
    assert new == [max(known.values()) + 1, max(known.values()) + 2]
    assert count == len(known) + 2


def test_gc_paused_hands_survivors_to_the_collector():
    """After a paused block the collector is as before, nothing stays frozen, and cyclic garbage made inside
    is still collected; objects frozen by someone else (Airflow before a fork) stay frozen."""

    class Node:
        pass

    def cycle() -> weakref.ref:
        node = Node()
        node.self = node
        return weakref.ref(node)

    assert gc.isenabled() and gc.get_freeze_count() == 0
    with gc_paused():
        assert not gc.isenabled()
        garbage = cycle()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.collect()
    assert garbage() is None

    kept = cycle()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with gc_paused():
            cycle()
        assert gc.get_freeze_count() == frozen and gc.isenabled()
        gc.collect()
        assert kept() is not None  # still frozen: not collected
    finally:
        gc.unfreeze()
    gc.collect()
    assert kept() is None
