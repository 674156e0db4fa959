"""Airflow DAG built from astra_test_chain.yaml by the astra DAG factory."""

from astra_provider.dag_factory import dag_from_spec

dag = dag_from_spec(__file__)
