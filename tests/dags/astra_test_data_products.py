"""Test DAGs of the data-product sensor and asset watcher (``tests/test_sensors.py``, ``test_assets.py``).

* ``astra_test_sensor_deferrable`` / ``astra_test_sensor_poke``: ``deliver`` copies the files of
  ``params.source`` under ``params.root`` (fresh mtimes, so they are not ready yet), then the sensor waits
  until they are ready and registers them.
* ``astra_test_on_reduced``: scheduled on a watched asset whose root is ``$ASTRA_TEST_WATCH_ROOT`` at parse
  time; its only task registers the files of every triggering event.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param, task

from astra_provider.assets import reduced_spectra_asset, register_asset_event_data_products
from astra_provider.sensors.data_products import DataProductSensor

START = pendulum.datetime(2025, 1, 1, tz="UTC")
PARAMS = {
    "source": Param("", type="string", description="directory whose files are delivered"),
    "root": Param("", type="string", description="data root the sensor watches"),
}


@task
def deliver(params=None) -> int:
    """Copy ``params.source`` to ``params.root`` like a reduction pipeline would (new mtimes)."""
    import shutil
    from pathlib import Path

    source, root = Path(params["source"]), Path(params["root"])
    copied = 0
    for path in sorted(source.rglob("*.fits")):
        target = root / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied += 1
    return copied


for dag_id, sensor_kwargs in {
    "astra_test_sensor_deferrable": {"deferrable": True},
    "astra_test_sensor_poke": {"deferrable": False, "mode": "poke"},
}.items():
    with DAG(dag_id, schedule=None, start_date=START, catchup=False, params=PARAMS, tags=["astra-test"]):
        deliver() >> DataProductSensor(
            task_id="wait_for_data_products",
            root="{{ params.root }}",
            filetypes=["apStar", "apVisit"],
            min_age_seconds=2.0,  # the delivered files are not ready when the sensor starts
            poke_interval=0.25,
            timeout=120,
            **sensor_kwargs,
        )


reduced = reduced_spectra_asset(
    "astra_test_reduced",
    root=os.environ.get("ASTRA_TEST_WATCH_ROOT", "/tmp/astra-test-watch"),
    filetypes=["apStar", "apVisit"],
    uri="astra-test://reduced",  # the same asset whatever the root of a test
    min_age_seconds=1.0,
    poll_interval=0.25,
    max_files_per_event=4,
)

with DAG(
    "astra_test_on_reduced",
    schedule=[reduced],
    start_date=START,
    catchup=False,
    is_paused_upon_creation=False,  # watchers only run for unpaused DAGs
    tags=["astra-test"],
):

    @task
    def register(triggering_asset_events=None):
        return register_asset_event_data_products(triggering_asset_events, asset=reduced)

    register()
