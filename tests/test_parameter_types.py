"""Declared parameter types (``Parameter(type=int)``) are checked when a task is created."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from astra_provider.base import DictParameter, Parameter, TaskInstance, TupleParameter
from astra_provider.bundling import plan_bundles
from astra_provider.contrib.continuum import SinusoidalContinuum
from astra_provider.contrib.thecannon import TrainTheCannon
from astra_provider.contrib.thepayne import TrainThePayne


class Typed(TaskInstance):
    order = Parameter(default=2, type=int)
    width = Parameter(default=1.5, type=float)
    label = Parameter(default=None, type=str)
    either = Parameter(default=0, type=(int, str))
    names = TupleParameter(default=("a",), type=str)
    weights = DictParameter(default={}, type=float)
    anything = Parameter(default=None)

    def execute(self):
        return None


def test_well_typed_values_are_accepted(tmp_path):
    task = Typed(
        order=np.int64(3),  # numpy scalars are converted first
        width=2,  # JSON has one kind of number: an int is a float
        label=tmp_path,  # paths become strings
        either="x",
        names=["b", "c"],
        weights={"a": 1, "b": float("inf")},
        anything=object.__name__,
    )
    assert (task.order, task.width, task.label, task.names) == (3, 2, str(tmp_path), ("b", "c"))
    assert Typed(label=None).label is None  # None is accepted where it is the default


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"order": 2.5}, "Typed(): parameter 'order' must be int, got 2.5 (float)"),
        ({"order": True}, "Typed(): parameter 'order' must be int, got True (bool)"),
        ({"order": None}, "Typed(): parameter 'order' must be int, got None (NoneType)"),
        ({"width": "1.5"}, "Typed(): parameter 'width' must be float, got '1.5' (str)"),
        ({"label": 7}, "Typed(): parameter 'label' must be str, got 7 (int)"),
        ({"either": 1.0}, "Typed(): parameter 'either' must be int or str, got 1.0 (float)"),
        ({"names": ("a", 1)}, "Typed(): parameter 'names' must be a tuple of str, got ('a', 1) (tuple)"),
        ({"names": "ab"}, "Typed(): parameter 'names' must be a tuple of str, got 'ab' (str)"),
        (
            {"weights": {"a": "x"}},
            "Typed(): parameter 'weights' must be a dict of float values, got {'a': 'x'}",
        ),
    ],
)
def test_a_value_of_another_type_names_the_class_the_parameter_and_the_value(kwargs, message):
    with pytest.raises(TypeError) as raised:
        Typed(**kwargs)
    assert str(raised.value).startswith(message)


def test_a_per_task_value_of_another_type_refuses_the_bundle_naming_it():
    with pytest.raises(TypeError, match=r"Typed\(\): parameter 'order' must be int, got 2.5 \(float\)"):
        Typed(order=(1, 2, 2.5))


def test_long_values_are_shortened_in_the_message():
    with pytest.raises(TypeError) as raised:
        Typed(order="x" * 1000)
    assert len(str(raised.value)) < 200 and "..." in str(raised.value)


def test_the_shipped_tasks_declare_their_types(tmp_path):
    with pytest.raises(TypeError, match=r"SinusoidalContinuum\(\): parameter 'deg' must be int, got 2.5"):
        SinusoidalContinuum(deg=2.5)
    with pytest.raises(TypeError, match=r"SinusoidalContinuum\(\): parameter 'output_dir' must be str"):
        SinusoidalContinuum(output_dir=3)
    assert SinusoidalContinuum(deg=4, length_scale=1000, output_dir=Path(tmp_path)).length_scale == 1000
    with pytest.raises(
        TypeError, match=r"TrainTheCannon\(\): parameter 'label_names' must be a tuple of str"
    ):
        TrainTheCannon(label_names=("teff", 2))
    with pytest.raises(TypeError, match=r"TrainTheCannon\(\): parameter 'regularization' must be float"):
        TrainTheCannon(regularization="0.1")
    with pytest.raises(
        TypeError, match=r"TrainTheCannon\(\): parameter 'continuum_pixel_tolerance' must be float"
    ):
        TrainTheCannon(continuum_pixel_tolerance="0.01")
    with pytest.raises(TypeError, match=r"TrainThePayne\(\): parameter 'max_iterations' must be int"):
        TrainThePayne(max_iterations=2.5)


def test_planning_bundles_refuses_a_badly_typed_parameter():
    with pytest.raises(TypeError, match=r"SinusoidalContinuum\(\): parameter 'deg' must be int, got 2.5"):
        plan_bundles(SinusoidalContinuum, [{"input_data_products": 1}], parameters={"deg": 2.5})


def test_a_default_of_another_type_is_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"Broken\(\): parameter 'order' must be int, got 2.5 \(float\)"):

        class Broken(TaskInstance):
            order = Parameter(default=2.5, type=int)


def test_the_declared_type_must_be_a_class():
    with pytest.raises(
        TypeError, match=r"Parameter\(type=...\) takes a class or a tuple of classes, got 'int'"
    ):
        Parameter(type="int")
    assert "type=int" in repr(Typed.parameter_definitions()["order"])
