"""Triggers that watch a data root for new, completely written data products.

* :class:`NewDataProductsEventTrigger` drives an ``AssetWatcher``: it keeps a watermark in the asset state
  store and emits one ``TriggerEvent`` per batch of new files, forever.
* :class:`NewDataProductsTrigger` backs the deferrable
  :class:`~astra_provider.sensors.data_products.DataProductSensor`: it fires once, when at least one new
  file is ready, or when the data root cannot be read, or at its deadline.

Both scan with :func:`~astra_provider.triggers.scan.scan_data_products` (the rules for *new* and *ready*
are there) in a worker thread, and log what they see: every file seen but not taken, once, with the
reason; a status line when the counts change and every ``status_interval`` seconds.

Triggers do not touch the astra database: payloads carry paths, and the sensor (or the first task of the
DAG scheduled on the asset) registers them with
:meth:`~astra_provider.hooks.astra.AstraHook.claim_data_products`, whose atomic claim gives every file to
exactly one run even when events are delivered twice. Whoever reads a payload confines its paths to the
watched root (:func:`payload_paths`): an asset event can also be posted through the REST API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, TypedDict, Unpack

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent

from astra_provider.hooks.data_products import DataRootError, check_data_root, confine_paths, log_refused
from astra_provider.triggers.scan import (
    DEFAULT_FILETYPES,
    DEFAULT_MIN_AGE_SECONDS,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_STATUS_INTERVAL,
    OTHER_FILETYPE,
    FoundFile,
    ScanReporter,
    ScanResult,
    Watermark,
    describe_scan,
    find_misplaced,
    scan_data_products,
    scan_patterns,
    take_batch,
    watermark_from_json,
    watermark_to_json,
)

#: Key of the watermark in the asset state store.
WATERMARK_KEY = "data_products_watermark"
#: ``payload["kind"]`` of the events these triggers emit.
PAYLOAD_KIND = "astra.new_data_products"
#: Seconds between two layout checks (:func:`~astra_provider.triggers.scan.find_misplaced`) of a watcher.
LAYOUT_CHECK_INTERVAL = 600.0

log = logging.getLogger(__name__)


def event_payload(
    root: str,
    files: Sequence[FoundFile],
    watermark: Watermark | None,
    *,
    after: Watermark | None = None,
    remaining: int = 0,
    pending: int = 0,
) -> dict[str, Any]:
    """The JSON payload of one batch of files.

    ``{"kind": PAYLOAD_KIND, "root": root, "paths": [paths relative to root], "counts": {filetype: n},
    "after": previous watermark, "watermark": watermark after this batch, "remaining": ready files left
    for later events, "pending": files not ready yet}``; watermarks are ``{"mtime", "path"}`` or ``None``.
    """
    prefix = os.path.join(os.fspath(root), "")
    return {
        "kind": PAYLOAD_KIND,
        "root": os.fspath(root),
        "paths": [f.path[len(prefix) :] if f.path.startswith(prefix) else f.path for f in files],
        "counts": dict(sorted(Counter(f.filetype for f in files).items())),
        "after": watermark_to_json(after),
        "watermark": watermark_to_json(watermark),
        "remaining": remaining,
        "pending": pending,
    }


def payload_paths(
    payload: dict[str, Any], root: str | os.PathLike[str] | None = None, *, logger: Any = log
) -> list[str]:
    """The absolute paths of an event payload made by :func:`event_payload`, confined to ``root``.

    ``root`` is the *watched* root (the sensor's, or the watcher's of the event's asset); without it the
    payload's own ``root`` is used. Paths that lead outside it (``..``, absolute paths elsewhere, links to
    files elsewhere) are refused and logged, as is the whole payload when its ``root`` is not the watched
    one.
    """
    paths = payload.get("paths") or []
    if not isinstance(paths, list):
        logger.warning("Refused an event payload whose paths are not a list: %r", paths)
        return []
    watched = os.path.abspath(os.fspath(root if root is not None else payload.get("root") or ""))
    claimed_root = payload.get("root")
    if root is not None and claimed_root and os.path.abspath(str(claimed_root)) != watched:
        log_refused(logger, [(str(claimed_root), f"an event root other than the watched root {watched}")])
        return []
    confined = confine_paths(watched, paths)
    log_refused(logger, confined.refused)
    return confined.accepted


class ScanSettings(TypedDict, total=False):
    """The scan settings both triggers take as keywords, besides ``root`` (their meaning: see
    :class:`NewDataProductsEventTrigger`). Defaults: ``filetypes`` apStar and apVisit, no ``pattern``,
    ``min_age_seconds`` and ``poll_interval`` 5 s, ``use_ctime`` false, ``status_interval`` 60 s (the
    ``DEFAULT_*`` constants of :mod:`astra_provider.triggers.scan`)."""

    filetypes: Iterable[str] | str
    pattern: str | None
    min_age_seconds: float
    poll_interval: float
    use_ctime: bool
    status_interval: float


class _ScanningTrigger:
    """The scan settings both triggers share (kept as attributes so ``serialize`` can return them)."""

    root: str
    filetypes: list[str]
    pattern: str | None
    min_age_seconds: float
    poll_interval: float
    use_ctime: bool
    status_interval: float
    log: Any

    def _init_scan(self, root: str | os.PathLike[str], scan: ScanSettings) -> None:
        unknown = sorted(set(scan) - set(ScanSettings.__annotations__))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments: {', '.join(unknown)}")
        self.root = os.path.abspath(os.fspath(root))
        filetypes = scan.get("filetypes", DEFAULT_FILETYPES)
        self.filetypes = [filetypes] if isinstance(filetypes, str) else list(filetypes)
        self.pattern = scan.get("pattern") or None
        self.min_age_seconds = float(scan.get("min_age_seconds", DEFAULT_MIN_AGE_SECONDS))
        self.poll_interval = float(scan.get("poll_interval", DEFAULT_POLL_INTERVAL))
        self.use_ctime = bool(scan.get("use_ctime", False))
        self.status_interval = float(scan.get("status_interval", DEFAULT_STATUS_INTERVAL))
        scan_patterns(self.root, self.filetypes, self.pattern)  # validate file types and pattern early
        self._reporter: ScanReporter | None = None

    def _scan_kwargs(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "filetypes": list(self.filetypes),
            "pattern": self.pattern,
            "min_age_seconds": self.min_age_seconds,
            "poll_interval": self.poll_interval,
            "use_ctime": self.use_ctime,
            "status_interval": self.status_interval,
        }

    @property
    def reporter(self) -> ScanReporter:
        if self._reporter is None:
            self._reporter = ScanReporter.for_watch(
                self.log,
                self.root,
                self.filetypes,
                self.pattern,
                min_age_seconds=self.min_age_seconds,
                status_interval=self.status_interval,
            )
        return self._reporter

    async def _scan(self, watermark: Watermark | None) -> ScanResult:
        return await asyncio.to_thread(
            scan_data_products,
            self.root,
            filetypes=self.filetypes,
            pattern=self.pattern,
            watermark=watermark,
            min_age_seconds=self.min_age_seconds,
            use_ctime=self.use_ctime,
        )

    async def _check_root(self) -> str | None:
        """``None`` if the root can be watched, else why not (naming the path)."""
        try:
            await asyncio.to_thread(check_data_root, self.root)
        except DataRootError as error:
            return str(error)
        return None

    async def _check_layout(self) -> None:
        """Log the files named like the watched file types that the layout globs cannot see (once each)."""
        if self.pattern:
            return
        misplaced = await asyncio.to_thread(find_misplaced, self.root, self.filetypes)
        self.reporter.not_taken(misplaced)


class NewDataProductsEventTrigger(_ScanningTrigger, BaseEventTrigger):
    """Watch ``root`` for new data products and emit one event per batch of ready files (asset watchers).

    The watermark lives in the asset state store (``self.asset_state_store``, injected by the Airflow 3.3
    triggerer) under :data:`WATERMARK_KEY`, so files handed on before a restart never fire again. Without a
    store (e.g. the trigger run by hand) the watermark is kept in memory only.

    At most one event per poll, with at most ``max_files_per_event`` paths; a larger backlog is handed on
    over the next polls. Spacing events by ``poll_interval`` keeps the scheduler from leaving events of a
    burst for a later run: Airflow 3.3 only gives a run the events up to the one that queued it.

    Delivery is at least once: the watermark is saved after each event is yielded, so a triggerer that
    dies in between (or two triggerers running the same watcher) can repeat a batch. Consumers register
    the paths with ``AstraHook.claim_data_products``, which claims each file once, so repeats are harmless.

    A root that is missing or unreadable is logged (as an error, every ``status_interval``) and watched
    again at each poll; files named like the watched file types outside the SDSS layout are logged once
    (a layout check at start and every :data:`LAYOUT_CHECK_INTERVAL` seconds).

    :param root: the data root to scan.
    :param filetypes: SDSS file types (path-template globs) to watch; ignored when ``pattern`` is given.
    :param pattern: an explicit glob, relative to ``root`` (``**`` recurses; it must stay under ``root``):
        for deeper or non-SDSS layouts.
    :param min_age_seconds: a file is ready once unmodified for this long (and its size is stable).
    :param poll_interval: seconds between scans.
    :param max_files_per_event: cap on the paths in one event (keeps ``AssetEvent.extra`` small).
    :param emit_existing: on first start (no stored watermark), also emit the files already there;
        ``False`` starts the watermark at the newest ready file instead.
    :param use_ctime: order files by the later of mtime and ctime; use it when files arrive with their
        original mtimes (``rsync -a``, ``cp -p``), which would otherwise sort before the watermark.
    :param asset_name: the watched asset's name; makes the trigger (and its state) specific to that asset.
    :param status_interval: seconds between status lines while nothing changes.
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike[str],
        max_files_per_event: int = 1000,
        emit_existing: bool = True,
        asset_name: str | None = None,
        **scan: Unpack[ScanSettings],
    ) -> None:
        super().__init__()
        self._init_scan(root, scan)
        if int(max_files_per_event) < 1:
            raise ValueError("max_files_per_event must be at least 1")
        self.max_files_per_event = int(max_files_per_event)
        self.emit_existing = bool(emit_existing)
        self.asset_name = asset_name
        self._warned_no_store = False

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                **self._scan_kwargs(),
                "max_files_per_event": self.max_files_per_event,
                "emit_existing": self.emit_existing,
                "asset_name": self.asset_name,
            },
        )

    def _state(self) -> Any:
        """The asset state store accessor for the watched asset, or ``None`` without a store."""
        store = getattr(self, "asset_state_store", None)
        if store is None:
            if not self._warned_no_store:
                self.log.warning("No asset state store: the watermark of %s lives in memory only", self.root)
                self._warned_no_store = True
            return None
        if self.asset_name is not None:
            from airflow.sdk import Asset

            try:
                return store[Asset.ref(name=self.asset_name)]
            except KeyError:
                self.log.warning(
                    "Asset %r is not watched by this trigger; using the store as given", self.asset_name
                )
        return store

    async def load_watermark(self) -> tuple[bool, Watermark | None]:
        """``(found, watermark)`` from the asset state store; retries while the store is unreachable."""
        state = self._state()
        if state is None:
            return False, None
        while True:
            try:
                value = await state.aget(WATERMARK_KEY)
            except Exception as exc:  # the store is reachable again on a later poll
                self.log.warning(
                    "Cannot read the watermark (%s); retrying in %.0f s", exc, self.poll_interval
                )
                await asyncio.sleep(self.poll_interval)
                continue
            return value is not None, watermark_from_json(value)

    async def save_watermark(self, watermark: Watermark | None) -> None:
        """Store ``watermark``; on failure keep going with the in-memory one."""
        state = self._state()
        if state is None or watermark is None:
            return
        try:
            await state.aset(WATERMARK_KEY, watermark_to_json(watermark))
        except Exception as exc:
            self.log.warning("Cannot store the watermark %s (%s)", watermark, exc)

    async def _wait_for_root(self) -> None:
        """Return once the root can be read; log why not (now, then every ``status_interval``)."""
        last_told = float("-inf")
        while (problem := await self._check_root()) is not None:
            if time.monotonic() - last_told >= self.status_interval:
                self.log.error("Cannot watch %s; checking again every %g s", problem, self.poll_interval)
                last_told = time.monotonic()
            await asyncio.sleep(self.poll_interval)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        found, watermark = await self.load_watermark()
        await self._wait_for_root()
        await self._check_layout()
        layout_checked = time.monotonic()
        if not found and not self.emit_existing:
            result = await self._scan(None)
            watermark = result.watermark
            await self.save_watermark(watermark)
            self.log.info("Starting after the %d files already in %s", len(result.files), self.root)
            await asyncio.sleep(self.poll_interval)
        note = f"; scanning every {self.poll_interval:g} s"
        while True:
            await self._wait_for_root()
            if time.monotonic() - layout_checked >= LAYOUT_CHECK_INTERVAL:
                await self._check_layout()
                layout_checked = time.monotonic()
            try:
                result = await self._scan(watermark)
            except Exception:  # e.g. a file system hiccup: keep watching
                self.log.exception("Scanning %s failed; retrying in %.0f s", self.root, self.poll_interval)
                await asyncio.sleep(self.poll_interval)
                continue
            self.reporter.status(result, note)
            files, new_watermark = take_batch(result, self.max_files_per_event)
            if files:
                yield TriggerEvent(
                    event_payload(
                        self.root,
                        files,
                        new_watermark,
                        after=watermark,
                        remaining=len(result.files) - len(files),
                        pending=result.pending,
                    )
                )
            if new_watermark != watermark:
                watermark = new_watermark
                await self.save_watermark(watermark)
            await asyncio.sleep(self.poll_interval)


class NewDataProductsTrigger(_ScanningTrigger, BaseTrigger):
    """Wait until at least one ready file newer than ``watermark`` exists, then fire once (deferrable sensor).

    Events: ``{"status": "success", **event_payload(...)}`` with at most ``max_files`` paths and the
    watermark of the last one; ``{"status": "error", "kind": "data_root", "message": ...}`` when the root
    is missing or unreadable; ``{"status": "error", "message": ...}`` if scanning fails;
    ``{"status": "timeout", "message": ...}`` (what was seen) at ``deadline``.

    :param deadline: the time (seconds since the epoch) at which to give up; ``None`` waits forever. The
        trigger enforces it itself, so that a trigger run in-process (``airflow tasks test``,
        ``dag.test()``, which ignore the deferral timeout) ends too.

    The other parameters are those of :class:`NewDataProductsEventTrigger`.
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike[str],
        watermark: Any = None,
        max_files: int | None = None,
        deadline: float | None = None,
        **scan: Unpack[ScanSettings],
    ) -> None:
        super().__init__()
        self._init_scan(root, scan)
        self.watermark = watermark_from_json(watermark)
        self.max_files = int(max_files) if max_files else None
        self.deadline = float(deadline) if deadline is not None else None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                **self._scan_kwargs(),
                "watermark": watermark_to_json(self.watermark),
                "max_files": self.max_files,
                "deadline": self.deadline,
            },
        )

    def _note(self) -> str:
        note = f"; next scan in {self.poll_interval:g} s"
        if self.deadline is not None:
            note += f", giving up in {max(self.deadline - time.time(), 0.0) / 60:.1f} min"
        return note

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            problem = await self._check_root()
            if problem is not None:
                yield TriggerEvent({"status": "error", "kind": "data_root", "message": problem})
                return
            try:
                result = await self._scan(self.watermark)
            except Exception as exc:
                yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
                return
            files, watermark = take_batch(result, self.max_files)
            if files:
                payload = event_payload(
                    self.root,
                    files,
                    watermark,
                    after=self.watermark,
                    remaining=len(result.files) - len(files),
                    pending=result.pending,
                )
                yield TriggerEvent({"status": "success", **payload})
                return
            self.reporter.status(result, self._note())
            self.watermark = watermark  # do not look at the files that were not taken again
            left = None if self.deadline is None else self.deadline - time.time()
            if left is not None and left <= 0:
                seen = describe_scan(result, self.min_age_seconds)
                message = f"no new data products under {self.root} before the deadline; last scan: {seen}"
                yield TriggerEvent({"status": "timeout", "message": message})
                return
            await asyncio.sleep(self.poll_interval if left is None else min(self.poll_interval, left))


__all__ = [
    "DEFAULT_FILETYPES",
    "LAYOUT_CHECK_INTERVAL",
    "OTHER_FILETYPE",
    "PAYLOAD_KIND",
    "WATERMARK_KEY",
    "FoundFile",
    "NewDataProductsEventTrigger",
    "NewDataProductsTrigger",
    "ScanResult",
    "ScanSettings",
    "event_payload",
    "payload_paths",
    "scan_data_products",
    "scan_patterns",
    "take_batch",
    "watermark_from_json",
    "watermark_to_json",
]
