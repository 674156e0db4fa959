"""The ``export`` step alone: write the summary catalogues of the astra database (tests/test_catalogue.py)."""

import pendulum
from airflow.sdk import DAG, Param

from astra_provider.operators.export import ExportCatalogueOperator

with DAG(
    dag_id="astra_test_export",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    params={"output_dir": Param("", type="string", description="Where to write the catalogues.")},
):
    ExportCatalogueOperator(task_id="export", output_dir="{{ params.output_dir }}", pipelines=["doppler"])
