"""astra-provider: stellar-spectroscopy analysis tasks with provenance, for Apache Airflow 3.

Importing this package (or :mod:`astra_provider.base`) never imports Airflow; the Airflow pieces live in
:mod:`astra_provider.hooks`, :mod:`astra_provider.operators`, :mod:`astra_provider.sensors` and
:mod:`astra_provider.triggers`.
"""

from astra_provider._version import __version__

__all__ = ["__version__"]
