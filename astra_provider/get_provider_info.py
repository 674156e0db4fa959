"""Provider metadata read by Airflow's ``ProvidersManager`` (entry point ``apache_airflow_provider``).

``package-name`` must equal the distribution name (``astra-provider``) exactly, or every provider-related
Airflow command fails. Keep this module free of imports: Airflow loads it in every process.
"""

from __future__ import annotations

from typing import Any

_INTEGRATION = "Astra"


def get_provider_info() -> dict[str, Any]:
    """The provider description: hooks, connection type, operators, sensors and triggers."""
    return {
        "package-name": "astra-provider",
        "name": "Astra",
        "description": (
            "Stellar-spectroscopy analysis tasks (SDSS-V Astra) with full provenance: operators that run "
            "task classes in bundles over dynamic task mapping, data-product sensors and asset watchers, "
            "and a YAML DAG factory."
        ),
        "integrations": [
            {
                "integration-name": _INTEGRATION,
                "external-doc-url": "https://github.com/astra-provider/astra-provider/tree/main/docs",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": [
                    "astra_provider.operators.task",
                    "astra_provider.operators.bundle",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": ["astra_provider.sensors.data_products"],
            }
        ],
        "triggers": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": ["astra_provider.triggers.data_products"],
            }
        ],
        "hooks": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": ["astra_provider.hooks.astra"],
            }
        ],
        "connection-types": [
            {
                "connection-type": "astra",
                "hook-class-name": "astra_provider.hooks.astra.AstraHook",
                "hook-name": "Astra database",
                "ui-field-behaviour": {
                    "hidden-fields": [],
                    "relabeling": {"schema": "Database"},
                    "placeholders": {
                        "host": "localhost",
                        "schema": "astra",
                        "port": "5432",
                        "extra": '{"driver": "psycopg2", "sslmode": "require"}',
                    },
                },
            }
        ],
    }
