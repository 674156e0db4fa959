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

Payloads are not trusted: anyone allowed to post asset events through the REST API can write one. Their
paths are resolved (``..``, symbolic links) and only those under the root that the asset's watcher watches
are registered; the others are refused and logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from airflow.sdk import Asset, AssetWatcher

from astra_provider.triggers.scan import DEFAULT_FILETYPES, DEFAULT_MIN_AGE_SECONDS, DEFAULT_POLL_INTERVAL


def reduced_spectra_asset(
    name: str,
    root: str | os.PathLike[str],
    filetypes: Iterable[str] | str = DEFAULT_FILETYPES,
    *,
    pattern: str | None = None,
    uri: str | None = None,
    min_age_seconds: float = DEFAULT_MIN_AGE_SECONDS,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
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


def watched_root(asset: Any) -> str | None:
    """The root watched by the data-product watcher of ``asset`` (``None`` if it has none)."""
    from astra_provider.triggers.data_products import NewDataProductsEventTrigger

    for watcher in getattr(asset, "watchers", None) or []:
        trigger = getattr(watcher, "trigger", None)
        if isinstance(trigger, NewDataProductsEventTrigger):
            return trigger.root
    return None


def dag_assets(dag: Any) -> list[Any]:
    """The assets a DAG is scheduled on (``schedule=[...]`` or an asset condition), nested ones included."""
    condition = getattr(getattr(dag, "timetable", None), "asset_condition", None)
    assets: list[Any] = []
    stack = [condition] if condition is not None else []
    while stack:
        item = stack.pop()
        if isinstance(item, Asset):
            assets.append(item)
        stack.extend(reversed(getattr(item, "objects", None) or []))
    return assets


def _as_list(asset: Any) -> list[Any]:
    if asset is None:
        return []
    return list(asset) if isinstance(asset, list | tuple) else [asset]


def _event_items(
    triggering_asset_events: Mapping[Any, Sequence[Any]] | None, assets: list[Any]
) -> list[tuple[Any, Any]]:
    """``(key, event)`` for the events of ``assets`` (of every asset if none is given; aliases skipped)."""
    if not triggering_asset_events:
        return []
    if assets:
        items: list[tuple[Any, Any]] = []
        for asset in assets:
            try:
                items.extend((asset, event) for event in triggering_asset_events[asset])
            except KeyError:
                continue
        return items
    from airflow.sdk import AssetAlias

    return [
        (key, event)
        for key in list(triggering_asset_events)
        if not isinstance(key, AssetAlias)  # an alias lists the events of its assets again
        for event in triggering_asset_events[key]
    ]


def _payload(event: Any) -> dict[str, Any] | None:
    from astra_provider.triggers.data_products import PAYLOAD_KIND

    extra = event.extra if hasattr(event, "extra") else event.get("extra", {})
    payload = (extra or {}).get("payload")
    if isinstance(payload, Mapping) and payload.get("kind") == PAYLOAD_KIND:
        return dict(payload)
    return None


def asset_event_payloads(
    triggering_asset_events: Mapping[Any, Sequence[Any]] | None, asset: Any = None
) -> list[dict[str, Any]]:
    """The payloads of all data-product watcher events that triggered this run (of ``asset``, an asset or
    a list of them, or of all), in watermark order (the order in which the watcher found the files).

    Use it with the ``triggering_asset_events`` context variable. Events that did not come from
    :class:`~astra_provider.triggers.data_products.NewDataProductsEventTrigger` are skipped. The payloads
    are as posted: read their paths with :func:`asset_event_paths`, which confines them.
    """
    payloads = [_payload(event) for _, event in _event_items(triggering_asset_events, _as_list(asset))]
    return sorted((p for p in payloads if p is not None), key=_watermark_order)


def _watermark_order(payload: Mapping[str, Any]) -> tuple[float, str]:
    from astra_provider.triggers.scan import watermark_from_json

    try:
        return watermark_from_json(payload.get("watermark")) or (float("-inf"), "")
    except (TypeError, ValueError, KeyError):
        return (float("-inf"), "")


def asset_event_paths(
    triggering_asset_events: Mapping[Any, Sequence[Any]] | None,
    asset: Any = None,
    *,
    root: str | os.PathLike[str] | None = None,
    logger: Any = None,
) -> list[str]:
    """The absolute paths of every triggering watcher event, in event order, without repeats, confined to
    the watched root.

    The watched root is ``root`` when given, else that of the watcher of the event's asset (``asset``: an
    asset or a list of them, as declared with :func:`reduced_spectra_asset`). Paths outside it (after
    resolving ``..`` and links), and the events of an asset whose watched root is unknown, are refused and
    logged.
    """
    from astra_provider.triggers.data_products import payload_paths

    logger = logger or logging.getLogger(__name__)
    assets = _as_list(asset)
    by_name = {a.name: a for a in assets}
    paths: dict[str, None] = {}
    items = _event_items(triggering_asset_events, assets)
    ordered = sorted(
        ((key, payload) for key, event in items if (payload := _payload(event)) is not None),
        key=lambda item: _watermark_order(item[1]),
    )
    for key, payload in ordered:
        name = getattr(key, "name", None)
        watched = root if root is not None else watched_root(by_name.get(name, key))
        if watched is None:
            logger.warning(
                "Refused the %d paths of an event of asset %r: no data-product watcher of that asset is "
                "known here, so neither is its watched root (pass the asset, or root=)",
                len(payload.get("paths") or []),
                name,
            )
            continue
        paths.update(dict.fromkeys(payload_paths(payload, watched, logger=logger)))
    return list(paths)


def register_asset_event_data_products(
    triggering_asset_events: Mapping[Any, Sequence[Any]] | None,
    asset: Any = None,
    *,
    root: str | os.PathLike[str] | None = None,
    astra_conn_id: str | None = "astra_default",
    encode_pks: bool = True,
    skip_if_empty: bool = False,
) -> dict[str, Any]:
    """Register the files of all triggering watcher events and return the rows this call created.

    The first task of a DAG scheduled on a :func:`reduced_spectra_asset` calls this with the
    ``triggering_asset_events`` context variable and the asset (or the list of them). It returns the same
    XCom as :class:`~astra_provider.sensors.data_products.DataProductSensor` (``data_product_pks``,
    ``by_filetype``, ``counts``). Only paths under the watched root are registered (see
    :func:`asset_event_paths`). Files already registered (by an earlier run, a duplicate event, or a
    concurrent run) are not returned. With ``skip_if_empty`` the task is skipped when nothing was new.
    """
    from astra_provider.hooks.astra import AstraHook
    from astra_provider.hooks.data_products import data_products_xcom

    hook = AstraHook(astra_conn_id)
    paths = asset_event_paths(triggering_asset_events, asset, root=root, logger=hook.log)
    created, _ = hook.claim_data_products(paths)
    hook.log.info("Registered %d new data products of %d files in the events", len(created), len(paths))
    if not created and skip_if_empty:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(f"none of the {len(paths)} files of the triggering events is new")
    return data_products_xcom(created, encode=encode_pks)


__all__ = [
    "asset_event_paths",
    "asset_event_payloads",
    "dag_assets",
    "reduced_spectra_asset",
    "register_asset_event_data_products",
    "watched_root",
]
