"""Airflow DAG built from astra_thepayne_train.yaml by astra_provider.dag_factory."""

from astra_provider.dag_factory import dag_from_spec

dag = dag_from_spec(__file__)
