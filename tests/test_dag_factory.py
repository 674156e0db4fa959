"""The YAML DAG factory: building DAGs, validating specs, isolating broken specs, checking task classes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from airflow_helpers import TEST_DAGS, environment

from astra_provider.dag_factory import (
    SpecError,
    check_task_classes,
    dag_from_spec,
    load_spec,
    main,
)

DAG_FILE = '"""Airflow DAG built by the astra DAG factory."""\n\nfrom astra_provider.dag_factory import dag_from_spec\n\ndag = dag_from_spec(__file__)\n'  # noqa: E501

GOOD = """
dag_id: {dag_id}
description: A test pipeline.
params:
  values:
    type: array
    default: []
    description: One item per task.
  offset:
    type: number
    default: 1.5
    description: Bundled offset.
  bundle_size:
    type: integer
    default: 3
    minimum: 1
    description: Tasks per bundle.
steps:
  - id: fit
    task: astra_provider.contrib.examples.ScaledSum
    inputs: {{items: "{{{{ params.values }}}}"}}
    parameters: {{offset: "{{{{ params.offset }}}}"}}
    bundle_size: "{{{{ params.bundle_size }}}}"
    max_bundles: 4
    max_failure_fraction: 0.2
  - id: primes
    task: astra_provider.contrib.examples.GreedyPrimes
    bundle: false
    after: fit
    parameters: {{max_value: 30}}
    operator_args: {{retries: 2, retry_delay: 30, execution_timeout: 600}}
"""


def write_spec(folder: Path, name: str, text: str) -> Path:
    """Write ``name.yaml`` and its two-line DAG file ``name.py``; return the DAG file."""
    (folder / f"{name}.yaml").write_text(textwrap.dedent(text))
    dag_file = folder / f"{name}.py"
    dag_file.write_text(DAG_FILE)
    return dag_file


def test_a_spec_builds_a_dag(tmp_path):
    from airflow.sdk import BaseOperator

    dag = dag_from_spec(write_spec(tmp_path, "good", GOOD.format(dag_id="astra_good")))
    assert dag.dag_id == "astra_good"
    assert dag.fileloc == str(tmp_path / "good.py")
    assert dag.render_template_as_native_obj  # "{{ params.n }}" renders to the param's type
    assert set(dag.task_dict) == {"fit_bundles", "fit", "primes"}
    assert dag.task_dict["fit_bundles"].downstream_task_ids == {"fit"}
    assert dag.task_dict["fit"].downstream_task_ids == {"primes"}
    assert (
        "- `fit`: `ScaledSum`, in bundles\n- `primes`: `GreedyPrimes`, one task (after `fit`)" in dag.doc_md
    )

    bundles = dag.task_dict["fit_bundles"]
    assert bundles.items == "{{ params.values }}"
    assert bundles.bundle_size == "{{ params.bundle_size }}" and bundles.max_bundles == 4
    assert bundles.trigger_rule == "none_failed_min_one_success"
    fit = dag.task_dict["fit"]
    assert not isinstance(fit, BaseOperator)  # a mapped operator
    assert fit.map_index_template == "{{ task.bundle['label'] }}"
    assert fit.partial_kwargs["max_failure_fraction"] == 0.2
    primes = dag.task_dict["primes"]
    assert primes.parameters == {"max_value": 30}
    assert primes.retries == 2 and primes.retry_delay.total_seconds() == 30
    assert primes.execution_timeout.total_seconds() == 600

    params = dag.params
    assert params.get_param("offset").schema == {"type": "number"}
    assert params.get_param("offset").description == "Bundled offset."
    assert params["bundle_size"] == 3


SPEC_ERRORS = [
    # (spec text, expected fragments of one error line)
    ("steps: []", ["field 'steps'", "non-empty list"]),
    ("steps: [{id: fit}]", ["step 'fit'", "exactly one of task, sensor, asset_events"]),
    (
        "steps: [{id: fit, task: a.B, inputs: {items: []}, bundle_size: -1}]",
        ["step 'fit'", "field 'bundle_size'", "must be an integer >= 1"],
    ),
    (
        "steps: [{id: fit, task: a.B, inputs: {items: []}, bundel_size: 2}]",
        ["step 'fit'", "field 'bundel_size'", "unknown field"],
    ),
    ("steps: [{id: fit, task: ScaledSum, bundle: false}]", ["step 'fit'", "field 'task'", "dotted path"]),
    (
        "steps: [{id: fit, task: a.B, inputs: {step: nope}}]",
        ["step 'fit'", "field 'inputs.step'", "unknown step 'nope'"],
    ),
    ("steps: [{id: fit, task: a.B}]", ["step 'fit'", "field 'inputs'", "bundled step needs inputs"]),
    (
        "steps: [{id: fit, task: a.B, bundle: false, max_failure_fraction: 2}]",
        ["step 'fit'", "field 'max_failure_fraction'", "between 0 and 1"],
    ),
    (
        "steps: [{id: fit, task: a.B, bundle: false, trigger_rule: sometimes}]",
        ["step 'fit'", "field 'trigger_rule'", "unknown trigger rule 'sometimes'"],
    ),
    (
        "params: {n: {type: integer, default: 1}}\nsteps: [{id: fit, task: a.B, bundle: false}]",
        ["field 'params.n.description'", "is required (shown in the trigger form)"],
    ),
    (
        "params: {n: {type: integer, default: 1, minimun: 1, description: N}}\n"
        "steps: [{id: fit, task: a.B, bundle: false}]",
        ["field 'params.n'", "unknown keyword(s) minimun (allowed: ", "minimum"],
    ),
    (
        "params: {n: {type: integer, default: -1, minimum: 1, description: N}}\n"
        "steps: [{id: fit, task: a.B, bundle: false}]",
        ["field 'params.n'", "the default -1 is invalid"],
    ),
    (
        "steps: [{id: fit, task: a.B, bundle: false, parameters: {day: '{{ ds }}'}}]",
        ["step 'fit'", "field 'parameters.day'", "logical-date variable"],
    ),
    (
        "steps: [{id: fit, task: a.B, bundle: false, parameters: {x: '{{ params.missing }}'}}]",
        ["step 'fit'", "field 'parameters.x'", "undefined param 'missing'"],
    ),
    (
        "steps: [{id: wait, sensor: {root: /data, mode: reschedule, poke_interval: 5, deferrable: false}}]",
        ["step 'wait'", "field 'sensor.mode'", "apache/airflow#71172"],
    ),
    (
        "steps: [{id: wait, sensor: {filetypes: [apStar]}}]",
        ["step 'wait'", "field 'sensor.root'", "required"],
    ),
    (
        "steps: [{id: wait, sensor: {root: /data, include_registered: maybe}}]",
        ["step 'wait'", "field 'sensor.include_registered'", "'maybe'"],
    ),
    (
        "steps: [{id: wait, sensor: {root: /data, min_age_seconds: -5}}]",
        ["step 'wait'", "field 'sensor.min_age_seconds'", "-5"],
    ),
    ("steps: [{id: new, asset_events: {}}]", ["step 'new'", "needs the DAG to be scheduled on an asset"]),
    (
        "schedule: '@daily'\nparams: {n: {type: integer, description: N}}\n"
        "steps: [{id: fit, task: a.B, bundle: false}]",
        ["field 'params.n'", "needs a 'default'"],
    ),
    (
        "schedule: {asset: {root: /data}}\nsteps: [{id: new, asset_events: {}}]",
        ["field 'schedule.asset.name'"],
    ),
    (
        "steps: [{id: fit, task: a.B, bundle: false, parameters: {p: '${ASTRA_TEST_UNSET_VARIABLE}'}}]",
        ["field 'steps[0].parameters.p'", "environment variable ASTRA_TEST_UNSET_VARIABLE is not set"],
    ),
    ("steps: [{id: fit, task: a.B, bundle: false, after: [later]}]", ["step 'fit'", "field 'after'"]),
    (
        "steps: [{id: a, task: a.B, bundle: false}, {id: a, task: a.B, bundle: false}]",
        ["step 'a'", "duplicate"],
    ),
    ("steps: [{id: 'bad id', task: a.B}]", ["field 'id'", "'bad id'"]),
    ("dag_id: x\nsteps: {", ["invalid YAML"]),
    ("start_date: soon\nsteps: [{id: a, task: a.B, bundle: false}]", ["field 'start_date'", "'soon'"]),
    ("- just a list", ["must be a YAML mapping"]),
    ("steps: [{id: export, export: {kinds: [galaxy]}}]", ["step 'export'", "field 'export.kinds"]),
    ("steps: [{id: export, export: {folder: /tmp}}]", ["step 'export'", "field 'export.folder'"]),
    ("steps: [{id: export, export: {format: xls}}]", ["step 'export'", "field 'export.format'"]),
    (
        "steps: [{id: export, export: {output_dir: '{{ params.nowhere }}'}}]",
        ["step 'export'", "field 'export.output_dir'", "undefined param 'nowhere'"],
    ),
]


def test_an_export_step_runs_at_the_end_of_the_pipeline(tmp_path):
    """Without ``after``, after the steps no other step follows; with it, where it says."""
    text = GOOD.format(dag_id="astra_export") + (
        "  - {id: side, task: astra_provider.contrib.examples.GreedyPrimes, bundle: false,"
        " parameters: {max_value: 10}}\n"
        "  - id: export\n"
        "    export: {output_dir: /catalogues, pipelines: [doppler], kinds: [visit], format: csv}\n"
        "  - {id: early_export, export: {}, after: [fit], trigger_rule: none_failed}\n"
    )
    dag = dag_from_spec(write_spec(tmp_path, "astra_export", text))
    export = dag.task_dict["export"]
    assert export.upstream_task_ids == {"primes", "side"} and export.trigger_rule == "all_done"
    assert (export.output_dir, export.pipelines, export.kinds, export.format) == (
        "/catalogues",
        ["doppler"],
        ["visit"],
        "csv",
    )
    early = dag.task_dict["early_export"]
    assert early.upstream_task_ids == {"fit"} and early.trigger_rule == "none_failed"
    assert (early.output_dir, early.pipelines, early.kinds, early.format) == (
        None,
        None,
        ("star", "visit"),
        "fits",
    )
    # an export step that runs after a failure would hide it: the run's failure watcher is added
    assert dag.task_dict["any_step_failed"].upstream_task_ids == set(dag.task_dict) - {"any_step_failed"}
    assert "- `export`: write the summary catalogues" in dag.doc_md


@pytest.mark.parametrize(
    ("text", "fragments"), SPEC_ERRORS, ids=[f"error{i}" for i in range(len(SPEC_ERRORS))]
)
def test_invalid_specs_name_the_file_step_and_field(tmp_path, text, fragments):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with environment(ASTRA_TEST_UNSET_VARIABLE=None), pytest.raises(SpecError) as raised:
        load_spec(path)
    error = raised.value
    assert error.path == str(path)
    matching = [line for line in error.errors if all(fragment in line for fragment in fragments)]
    assert matching, f"no error line has {fragments}: {error.errors}"
    assert all(line.startswith(str(path)) for line in error.errors)
    assert str(path) in str(error)


def test_all_problems_of_a_spec_are_reported_at_once(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("catchup: maybe\nsteps: [{id: a, task: x}, {id: b, sensor: {root: /d, timeout: -1}}]\n")
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    text = str(raised.value)
    assert "field 'catchup'" in text and "step 'a': field 'task'" in text
    assert "step 'b': field 'sensor.timeout'" in text


def test_environment_variables_are_expanded_at_parse_time(tmp_path):
    parameters = "{p: '${ASTRA_TEST_ROOT:-/x}/m', q: '${ASTRA_TEST_Q}'}"
    text = f"steps: [{{id: fit, task: a.B, bundle: false, parameters: {parameters}}}]"
    path = tmp_path / "env.yaml"
    path.write_text(text)
    with environment(ASTRA_TEST_ROOT=None, ASTRA_TEST_Q="set"):
        assert load_spec(path).steps[0].parameters == {"p": "/x/m", "q": "set"}
    with environment(ASTRA_TEST_ROOT="/data", ASTRA_TEST_Q="set"):
        assert load_spec(path).steps[0].parameters["p"] == "/data/m"


def test_a_dag_file_without_its_spec_is_an_error(tmp_path):
    dag_file = tmp_path / "lonely.py"
    dag_file.write_text(DAG_FILE)
    with pytest.raises(SpecError, match="no spec lonely.yaml next to this DAG file"):
        dag_from_spec(dag_file)


def test_a_broken_spec_is_an_import_error_of_its_own_file_only(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    write_spec(tmp_path, "good", GOOD.format(dag_id="astra_good"))
    broken = GOOD.format(dag_id="astra_broken").replace(
        'bundle_size: "{{ params.bundle_size }}"', "bundle_size: 0"
    )
    bad_file = write_spec(tmp_path, "broken", broken)
    bag = DagBag(dag_folder=str(tmp_path))
    assert set(bag.dags) == {"astra_good"}
    assert list(bag.import_errors) == [str(bad_file)]
    message = bag.import_errors[str(bad_file)]
    assert "broken.yaml: step 'fit': field 'bundle_size': must be an integer >= 1" in message


def test_task_classes_and_parameter_names_are_checked(tmp_path, capsys):
    spec = load_spec(
        write_spec(
            tmp_path,
            "classes",
            """
            steps:
              - {id: typo, task: astra_provider.contrib.examples.GreedyPrimes, bundle: false,
                 parameters: {max_valu: 3}}
              - {id: missing, task: astra_provider.contrib.examples.NoSuchTask, bundle: false}
            """,
        ).with_suffix(".yaml")
    )
    problems = check_task_classes(spec)
    assert any(
        "step 'typo': field 'parameters.max_valu': GreedyPrimes has no parameter" in p for p in problems
    )
    assert any(
        "step 'typo': field 'parameters': GreedyPrimes requires parameter 'max_value'" in p for p in problems
    )
    assert any("step 'missing': field 'task': unknown task class" in p for p in problems)

    assert check_task_classes(load_spec(TEST_DAGS / "astra_test_chain.yaml")) == []
    assert main([str(TEST_DAGS)]) == 0
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"ok   {TEST_DAGS / 'astra_test_chain.yaml'}" in out and "FAIL" in out


def test_sensor_settings_can_be_run_time_params(tmp_path):
    """A sensor step's ``min_age_seconds`` and ``include_registered`` can be templates (run-time params)."""
    text = """
    params:
      root: {type: string, default: /data, description: Data root.}
      age: {type: integer, default: 60, minimum: 0, description: Minimum file age.}
      again: {type: boolean, default: false, description: Take registered files too.}
    steps:
      - id: wait
        sensor:
          root: "{{ params.root }}"
          min_age_seconds: "{{ params.age }}"
          include_registered: "{{ params.again }}"
    """
    dag = dag_from_spec(write_spec(tmp_path, "astra_sensor_params", text))
    sensor = dag.task_dict["wait"]
    assert (sensor.min_age_seconds, sensor.include_registered) == ("{{ params.age }}", "{{ params.again }}")
    assert {"min_age_seconds", "include_registered"} <= set(sensor.template_fields)
    sensor.min_age_seconds, sensor.include_registered = 0, "False"  # as rendered
    sensor._settings()
    assert (sensor.min_age_seconds, sensor.include_registered) == (0.0, False)

    plain = write_spec(
        tmp_path,
        "astra_sensor_plain",
        text.replace('"{{ params.age }}"', "30").replace('"{{ params.again }}"', "true"),
    )
    sensor = dag_from_spec(plain).task_dict["wait"]
    assert (sensor.min_age_seconds, sensor.include_registered) == (30.0, True)


@pytest.mark.parametrize(
    ("name", "allow", "refused"),
    [
        ("HOME", None, True),  # not ASTRA_*: would copy any variable (a secret) into the DAG
        ("HOME", "USER, HOME", False),  # listed in ASTRA_DAG_ENV_ALLOW
        ("ASTRA_DATABASE_URL", None, True),  # ASTRA_*, but may hold a password
        ("AIRFLOW_CONN_ASTRA_DEFAULT", "AIRFLOW_CONN_ASTRA_DEFAULT", True),  # a secret even when listed
        ("ASTRA_TEST_ROOT", None, False),
    ],
)
def test_only_allowed_environment_variables_are_expanded(tmp_path, name, allow, refused):
    path = tmp_path / "env.yaml"
    path.write_text(f"description: 'from ${{{name}}}'\nsteps: [{{id: fit, task: a.B, bundle: false}}]\n")
    with environment(**{name: "s3cret", "ASTRA_DAG_ENV_ALLOW": allow}):
        if not refused:
            assert load_spec(path).description == "from s3cret"
            return
        with pytest.raises(SpecError) as raised:
            load_spec(path)
    assert raised.value.errors == [
        f"{path}: field 'description': environment variable {name} may not be used (only ASTRA_* names and "
        "those in $ASTRA_DAG_ENV_ALLOW; no secrets)"
    ]
    assert "s3cret" not in str(raised.value)


def test_arguments_passed_to_sensors_and_watchers_are_checked_against_their_signatures(tmp_path):
    path = tmp_path / "extra.yaml"
    path.write_text(
        "schedule: {asset: {name: n, root: /r, max_files_per_event: 10, poll_intervall: 5}}\n"
        "steps: [{id: new, asset_events: {}}, {id: wait, sensor: {root: /r, max_files: 3, soft_fail: true, "
        "poke_intervall: 5}}]\n"
    )
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    [asset, sensor] = raised.value.errors
    assert asset.startswith(f"{path}: field 'schedule.asset.poll_intervall': unknown field (allowed: ")
    assert "poll_interval" in asset
    assert sensor.startswith(f"{path}: step 'wait': field 'sensor.poke_intervall': unknown field (allowed: ")
    assert "poke_interval" in sensor and "task_id" not in sensor


def test_the_json_schema_file_is_generated_from_the_models(capsys):
    import json

    from astra_provider.dag_spec import json_schema

    schema_file = Path(__file__).resolve().parent.parent / "schema" / "dag-spec.schema.json"
    assert main(["--schema"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == json_schema()
    assert schema_file.read_text() == printed, (
        "regenerate with: python -m astra_provider.dag_factory --schema > schema/dag-spec.schema.json"
    )


def test_the_json_schema_accepts_the_shipped_specs_and_rejects_a_broken_one():
    """What an editor checks with the schema: the shipped specs pass, a misspelt field does not."""
    import json

    import jsonschema
    import yaml
    from airflow_helpers import DAGS

    from astra_provider.dag_spec import json_schema

    validator = jsonschema.Draft202012Validator(json.loads(json.dumps(json_schema())))
    for spec in [*DAGS.glob("*.yaml"), *TEST_DAGS.glob("*.yaml")]:
        data = yaml.safe_load(spec.read_text())
        assert not list(validator.iter_errors(json.loads(json.dumps(data, default=str)))), spec
    broken = {"steps": [{"id": "fit", "task": "a.B", "bundel_size": 3}]}
    assert any("bundel_size" in error.message for error in validator.iter_errors(broken))
