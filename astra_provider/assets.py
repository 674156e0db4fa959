"""Event-driven scheduling on new reduced data products (Airflow 3 assets and asset watchers).

Declare the asset once and schedule the pipeline DAG on it::

    from airflow.sdk import DAG, task
    from astra_provider.assets import reduced_spectra_asset, register_asset_event_data_products

    apogee = reduced_spectra_asset("apogee_reduced", root="/data/sdss", filetypes=["apStar", "apVisit"])

    with DAG("astra_on_new_spectra", schedule=[apogee], catchup=False):

        @task
        def register(triggering_asset_events=None):
            return register_asset_event_data_products(triggering_asset_events, asset=apogee)

        ...  # downstream tasks take register()'s XCom, like the DataProductSensor's

The watcher (:class:`~astra_provider.triggers.data_products.NewDataProductsEventTrigger`, in the triggerer)
only emits paths; the first task of the run registers them. Several events can be coalesced into one run
(apache/airflow#56050, #56750), so that task reads *every* triggering event; events delivered twice (HA
triggerers, a restart between an event and its watermark) are harmless because registration claims each
file once. Watchers only run while the DAG is unpaused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from airflow.sdk import Asset, AssetWatcher

from astra_provider.triggers.data_products import DEFAULT_FILETYPES


def reduced_spectra_asset(
    name: str,
    root: str | os.PathLike[str],
    filetypes: Iterable[str] | str = DEFAULT_FILETYPES,
    *,
    pattern: str | None = None,
    uri: str | None = None,
    min_age_seconds: float = 60.0,
    poll_interval: float = 60.0,
    max_files_per_event: int = 1000,
    emit_existing: bool = True,
    use_ctime: bool = False,
    group: str = "astra",
    extra: dict[str, Any] | None = None,
    watcher_name: str | None = None,
) -> Asset:
    """An ``Asset`` whose watcher fires when new, completely written data products appear under ``root``.

    Each event carries up to ``max_files_per_event`` paths (see
    :func:`~astra_provider.triggers.data_products.event_payload`); files handed on once never fire again
    (watermark in the asset state store). ``uri`` defaults to ``file://<root>?filetypes=...`` (or
    ``?pattern=...``). The other arguments are those of
    :class:`~astra_provider.triggers.data_products.NewDataProductsEventTrigger`.
    """
    from astra_provider.triggers.data_products import NewDataProductsEventTrigger

    root_text = os.path.abspath(os.fspath(root))
    filetype_list = [filetypes] if isinstance(filetypes, str) else list(filetypes)
    if uri is None:
        query = {"pattern": pattern} if pattern else {"filetypes": ",".join(filetype_list)}
        uri = f"{Path(root_text).as_uri()}?{urlencode(query)}"
    trigger = NewDataProductsEventTrigger(
        root=root_text,
        filetypes=filetype_list,
        pattern=pattern,
        min_age_seconds=min_age_seconds,
        poll_interval=poll_interval,
        max_files_per_event=max_files_per_event,
        emit_existing=emit_existing,
        use_ctime=use_ctime,
        asset_name=name,
    )
    return Asset(
        name=name,
        uri=uri,
        group=group,
        extra=extra or {},
        watchers=[AssetWatcher(name=watcher_name or f"{name}_watcher", trigger=trigger)],
    )


def _events(triggering_asset_events: Mapping[Any, Sequence[Any]] | None, asset: Any) -> list[Any]:
    if not triggering_asset_events:
        return []
    if asset is not None:
        try:
            return list(triggering_asset_events[asset])
        except KeyError:
            return []
    from airflow.sdk import AssetAlias

    events: list[Any] = []
    for key in list(triggering_asset_events):
        if not isinstance(key, AssetAlias):  # an alias lists the events of its assets again
            events.extend(triggering_asset_events[key])
    return events


def asset_event_payloads(
    triggering_asset_events: Mapping[Any, Sequence[Any]] | None, asset: Any = None
) -> list[dict[str, Any]]:
    """The payloads of all data-product watcher events that triggered this run (of ``asset``, or of all),
    in watermark order (the order in which the watcher found the files).

    Use it with the ``triggering_asset_events`` context variable. Events that did not come from
    :class:`~astra_provider.triggers.data_products.NewDataProductsEventTrigger` are skipped.
    """
    from astra_provider.triggers.data_products import PAYLOAD_KIND

    payloads = []
    for event in _events(triggering_asset_events, asset):
        extra = event.extra if hasattr(event, "extra") else event.get("extra", {})
        payload = (extra or {}).get("payload")
        if isinstance(payload, Mapping) and payload.get("kind") == PAYLOAD_KIND:
            payloads.append(dict(payload))
    return sorted(payloads, key=_watermark_order)


def _watermark_order(payload: Mapping[str, Any]) -> tuple[float, str]:
    from astra_provider.triggers.data_products import watermark_from_json

    return watermark_from_json(payload.get("watermark")) or (float("-inf"), "")


def asset_event_paths(
    triggering_asset_events: Mapping[Any, Sequence[Any]] | None, asset: Any = None
) -> list[str]:
    """The absolute paths of every triggering watcher event, in event order, without repeats."""
    from astra_provider.triggers.data_products import payload_paths

    paths: dict[str, None] = {}
    for payload in asset_event_payloads(triggering_asset_events, asset):
        paths.update(dict.fromkeys(payload_paths(payload)))
    return list(paths)


def register_asset_event_data_products(
    triggering_asset_events: Mapping[Any, Sequence[Any]] | None,
    asset: Any = None,
    *,
    astra_conn_id: str | None = "astra_default",
    encode_pks: bool = True,
    skip_if_empty: bool = False,
) -> dict[str, Any]:
    """Register the files of all triggering watcher events and return the rows this call created.

    The first task of a DAG scheduled on a :func:`reduced_spectra_asset` calls this with the
    ``triggering_asset_events`` context variable. It returns the same XCom as
    :class:`~astra_provider.sensors.data_products.DataProductSensor` (``data_product_pks``,
    ``by_filetype``, ``counts``). Files already registered (by an earlier run, a duplicate event, or a
    concurrent run) are not returned. With ``skip_if_empty`` the task is skipped when nothing was new.
    """
    from astra_provider.sensors.data_products import (
        astra_database_url,
        claim_data_products,
        data_products_xcom,
    )

    paths = asset_event_paths(triggering_asset_events, asset)
    created, _ = claim_data_products(paths, database_url=astra_database_url(astra_conn_id))
    if not created and skip_if_empty:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(f"none of the {len(paths)} files of the triggering events is new")
    return data_products_xcom(created, encode=encode_pks)


__all__ = [
    "asset_event_paths",
    "asset_event_payloads",
    "reduced_spectra_asset",
    "register_asset_event_data_products",
]
