"""Task classes are imported by dotted path only from allowed modules, checked before anything is imported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import select, update

from astra_provider.base import TaskInstance, import_task_class
from astra_provider.contrib.examples import GreedyPrimes, ScaledSum
from astra_provider.dag_factory import check_task_classes, load_spec
from astra_provider.database import session_scope
from astra_provider.database.astradb import Task
from astra_provider.operators.task import AstraTaskOperator
from astra_provider.task_classes import (
    PREFIXES_VARIABLE,
    TaskClassNotAllowedError,
    is_allowed_module,
    task_module_prefixes,
)

MODULE = "astra_side_effect_tasks"
SOURCE = f'''
"""A module with a side effect on import: it writes a marker file next to itself."""
from pathlib import Path

from astra_provider.base import Parameter, TaskInstance

Path(__file__).with_name("{MODULE}.imported").write_text("imported")


class Marked(TaskInstance):
    n = Parameter(default=1)

    def execute(self):
        return self.n
'''


@pytest.fixture
def side_effect_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module that records being imported; the path of its marker file."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield tmp_path / f"{MODULE}.imported"
    sys.modules.pop(MODULE, None)


def test_the_default_allows_astra_provider_only(monkeypatch):
    monkeypatch.delenv(PREFIXES_VARIABLE)
    assert task_module_prefixes() == ("astra_provider.",)
    assert import_task_class("astra_provider.contrib.examples.ScaledSum") is ScaledSum
    with pytest.raises(TaskClassNotAllowedError) as raised:
        import_task_class("astra_test_tasks.ReadScale")
    message = str(raised.value)
    assert "'astra_test_tasks.ReadScale'" in message and "'astra_provider.'" in message
    assert PREFIXES_VARIABLE in message


def test_a_disallowed_module_is_not_imported(side_effect_module, monkeypatch):
    monkeypatch.delenv(PREFIXES_VARIABLE)
    with pytest.raises(TaskClassNotAllowedError, match=f"'{MODULE}.Marked' is not in an allowed module"):
        import_task_class(f"{MODULE}.Marked")
    assert not side_effect_module.exists() and MODULE not in sys.modules
    for path in ("os.system", "subprocess.Popen", "astra_provider_evil.Task", "astra_providerx.Task"):
        with pytest.raises(TaskClassNotAllowedError, match=repr(path)):
            import_task_class(path)


def test_the_environment_variable_replaces_the_prefixes(side_effect_module, monkeypatch):
    monkeypatch.setenv(PREFIXES_VARIABLE, f" {MODULE}. , mylab.tasks")
    assert task_module_prefixes() == (f"{MODULE}.", "mylab.tasks")
    marked = import_task_class(f"{MODULE}.Marked")
    assert side_effect_module.exists() and marked.__name__ == "Marked" and issubclass(marked, TaskInstance)
    with pytest.raises(TaskClassNotAllowedError, match=r"'astra_provider.contrib.examples.ScaledSum'"):
        import_task_class("astra_provider.contrib.examples.ScaledSum")


def test_the_keyword_option_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(PREFIXES_VARIABLE, "astra_provider.")
    found = import_task_class("astra_test_tasks.ReadScale", allowed_prefixes=["astra_test_tasks"])
    assert found.__name__ == "ReadScale"
    with pytest.raises(TaskClassNotAllowedError, match="under 'astra_provider.sdss'"):
        import_task_class(
            "astra_provider.contrib.examples.GreedyPrimes", allowed_prefixes=["astra_provider.sdss"]
        )


def test_prefixes_are_module_names_not_string_prefixes():
    assert is_allowed_module("astra_provider", ["astra_provider."])
    assert is_allowed_module("astra_provider.contrib.examples", ["astra_provider"])
    assert not is_allowed_module("astra_provider_evil", ["astra_provider."])
    assert not is_allowed_module("mylab.tasks_old", ["mylab.tasks"])
    assert not is_allowed_module("anything", ["", "."])
    assert is_allowed_module("__main__", [])  # the running script: already loaded


@pytest.mark.parametrize(
    "path", ["ScaledSum", "", "astra_provider..ScaledSum", "astra_provider/contrib.X", "a.1b"]
)
def test_a_path_that_is_not_dotted_is_a_clear_error(path):
    with pytest.raises(LookupError, match="expected a dotted path, module.Class"):
        import_task_class(path)


def test_unknown_classes_under_an_allowed_prefix_are_a_lookup_error():
    with pytest.raises(LookupError, match="'astra_provider.contrib.examples.NoSuchTask'.*cannot be imported"):
        import_task_class("astra_provider.contrib.examples.NoSuchTask")
    with pytest.raises(LookupError, match="cannot be imported as a TaskInstance subclass"):
        import_task_class("astra_provider.database.session_scope")


def test_from_task_refuses_a_recorded_class_outside_the_prefixes(astra_db, side_effect_module):
    GreedyPrimes(max_value=5).execute()
    with session_scope() as session:
        session.execute(update(Task).values(task_module=MODULE, task_name="Marked"))
        task = session.scalars(select(Task)).one()
    with pytest.raises(TaskClassNotAllowedError, match=rf"'{MODULE}.Marked' \(task pk={task.pk}\)"):
        TaskInstance.from_task(task)
    assert not side_effect_module.exists()


def test_operators_and_dag_specs_refuse_a_class_outside_the_prefixes(tmp_path, side_effect_module):
    operator = AstraTaskOperator(task_id="t", task_class=f"{MODULE}.Marked")
    with pytest.raises(TaskClassNotAllowedError, match="not in an allowed module"):
        operator.load_task_class()
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(f"dag_id: t\nsteps: [{{id: a, task: {MODULE}.Marked, bundle: false}}]\n")
    problems = check_task_classes(load_spec(spec_path))
    assert any("not in an allowed module" in problem for problem in problems), problems
    assert not side_effect_module.exists()


def test_classes_of_the_running_script_are_found_without_an_import(monkeypatch):
    monkeypatch.delenv(PREFIXES_VARIABLE)

    class InScript(TaskInstance):
        def execute(self):
            return None

    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "InScript", InScript, raising=False)
    assert import_task_class("__main__.InScript") is InScript
    with pytest.raises(LookupError, match="cannot be imported as a TaskInstance subclass"):
        import_task_class("__main__.NoSuchClass")
