"""An Airflow DAG written with the astra operators directly (the example of docs/airflow.md)."""

import pendulum
from airflow.sdk import DAG, Param, task

from astra_provider.operators.bundle import BundleTasksOperator
from astra_provider.operators.task import AstraTaskOperator, ExecuteBundleOperator

with DAG(
    dag_id="astra_example_operators",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    render_template_as_native_obj=True,  # "{{ params.n * 10 }}" renders to an int, not a string
    params={"n": Param(10, type="integer", minimum=1, description="Number of tasks.")},
):

    @task
    def make_items(params=None) -> list[dict]:
        """One dict of keyword arguments per task; two offsets, so two groups of bundles."""
        return [{"value": i, "offset": float(i % 2)} for i in range(params["n"])]

    bundles = BundleTasksOperator(
        task_id="plan_bundles",
        task_class="astra_provider.contrib.examples.ScaledSum",
        items=make_items(),
        parameters={"scale": 2},
        bundle_size=4,
        max_bundles=10,
    )
    scaled_sum = ExecuteBundleOperator.partial(
        task_id="scaled_sum",
        task_class="astra_provider.contrib.examples.ScaledSum",
        max_failure_fraction=0.1,
        map_index_template="{{ task.bundle['label'] }}",
    ).expand_kwargs(bundles.output)

    primes = AstraTaskOperator(
        task_id="primes",
        task_class="astra_provider.contrib.examples.GreedyPrimes",
        parameters={"max_value": "{{ params.n * 10 }}"},
    )

    @task
    def report(summaries) -> dict:
        summaries = summaries[:]  # one request for all mapped XComs
        return {"bundles": len(summaries), "completed": sum(s["completed"] for s in summaries)}

    report(scaled_sum.output) >> primes
