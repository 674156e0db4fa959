"""Register the data products announced by the asset events that triggered a run.

A DAG scheduled on :func:`astra_provider.assets.reduced_spectra_asset` starts when its watcher finds new
files. Several events can coalesce into one run, so this operator reads *every* triggering event (through
:func:`astra_provider.assets.register_asset_event_data_products`), registers the files as data products
(each file is claimed by one run only) and returns the same XCom as the data product sensor. Only files
under the root watched by the watcher of the event's asset are registered: the assets are those the DAG is
scheduled on (or ``assets``), and paths elsewhere are refused and logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context


class AssetEventDataProductsOperator(BaseOperator):
    """Register the files of all triggering asset events; XCom ``{"data_product_pks", "by_filetype", ...}``.

    :param skip_when_empty: skip this task (and so the downstream steps) when no file is new, e.g. for a
        manual run of an asset-scheduled DAG, which has no triggering events.
    :param astra_conn_id: the Airflow connection of the astra database.
    :param assets: the watched assets whose events to register (default: those the DAG is scheduled on).
    """

    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        skip_when_empty: bool = True,
        astra_conn_id: str = "astra_default",
        assets: list[Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.skip_when_empty = skip_when_empty
        self.astra_conn_id = astra_conn_id
        self.assets = assets

    def execute(self, context: Context) -> dict[str, Any]:
        from astra_provider.assets import dag_assets, register_asset_event_data_products

        events = context.get("triggering_asset_events")
        assets = self.assets if self.assets is not None else dag_assets(self.dag)
        self.log.info("%d triggering asset event(s)", sum(len(v) for v in (events or {}).values()))
        return register_asset_event_data_products(
            events, assets, astra_conn_id=self.astra_conn_id, skip_if_empty=self.skip_when_empty
        )
