"""Primary key ranges are bounded: a range typed in a trigger form cannot expand without limit."""

from __future__ import annotations

import pytest
from airflow_helpers import environment

from astra_provider.bundling import MAX_DECODED_PKS, check_pk_count, decode_pks
from astra_provider.contrib.examples import ScaledSum
from astra_provider.hooks.astra import AstraHook, connection_from_url
from astra_provider.operators._inputs import resolve_data_products
from astra_provider.operators.bundle import BundleTasksOperator


@pytest.fixture
def astra_conn(astra_db):
    """The astra database of the test, reachable as the ``astra_default`` Airflow connection."""
    with environment(AIRFLOW_CONN_ASTRA_DEFAULT=connection_from_url(astra_db)):
        yield astra_db


@pytest.mark.parametrize(
    ("value", "shown", "total"),
    [
        ("1-5000000000", "'1-5000000000'", "5,000,000,000"),
        ([[1, 5_000_000_000]], "[1, 5000000000]", "5,000,000,000"),
        ([[0, 10**12, 2]], "[0, 1000000000000, 2]", "500,000,000,001"),
        ([[1, 3_000_000], "3000001-6000000"], "'3000001-6000000'", "6,000,000"),  # the total counts
    ],
)
def test_a_range_beyond_the_maximum_is_refused_naming_it(value, shown, total):
    with pytest.raises(ValueError) as raised:
        decode_pks(value)
    message = str(raised.value)
    assert message.startswith(f"primary keys {shown}: {total} in all, more than the 5,000,000")
    assert "MAX_DECODED_PKS" in message


def test_ranges_up_to_the_maximum_are_expanded():
    assert MAX_DECODED_PKS == 5_000_000
    assert check_pk_count(["1-4999999", 5_000_000]) == MAX_DECODED_PKS
    assert decode_pks(["10-12", [20, 24, 2], 7]) == [10, 11, 12, 20, 22, 24, 7]
    assert decode_pks("1-3", max_pks=3) == [1, 2, 3]
    with pytest.raises(ValueError, match=r"primary keys '1-4': 4 in all, more than the 3"):
        decode_pks("1-4", max_pks=3)


def test_a_reversed_string_range_is_an_error():
    with pytest.raises(ValueError, match=r"'9-3' is not a first-last range"):
        decode_pks(["9-3"])


def test_the_trigger_form_path_refuses_a_huge_range_before_expanding_it(astra_conn, tmp_path):
    hook = AstraHook()
    with pytest.raises(ValueError, match=r"primary keys '1-5000000000': 5,000,000,001 in all"):
        resolve_data_products(["3", "1-5000000000"], hook)  # 3, then five billion
    # many ranges, each under the bound, are counted together
    with pytest.raises(ValueError, match=r"primary keys '4000001-8000000': 8,000,000 in all"):
        resolve_data_products(["1-4000000", str(tmp_path / "a.fits"), "4000001-8000000"], hook)
    operator = BundleTasksOperator(
        task_id="plan", task_class=ScaledSum, data_products="1-5000000000", parameters={"offset": 1}
    )
    with pytest.raises(ValueError, match=r"primary keys '1-5000000000'"):
        operator.execute(context={})
