"""Triggers that watch a data root for new, completely written data products.

* :func:`scan_data_products` is the scanning core: a plain, blocking function (glob + ``os.stat``) that the
  triggers run in a worker thread (``asyncio.to_thread``), so the triggerer's event loop never blocks.
* :class:`NewDataProductsEventTrigger` drives an ``AssetWatcher``: it keeps a watermark in the asset state
  store and emits one ``TriggerEvent`` per batch of new files, forever.
* :class:`NewDataProductsTrigger` backs the deferrable
  :class:`~astra_provider.sensors.data_products.DataProductSensor`: it fires once, when at least one new
  file is ready.

**New** means "after the watermark": files are ordered by ``(mtime, path)`` and the watermark is the key of
the last file handed on. **Ready** (stable) means not modified for ``min_age_seconds`` and with the same
size and mtime on two ``stat`` calls; the files that are not ready yet hold the watermark back, so no file
still being written is ever skipped. Hidden files (``.name``, e.g. rsync's temporary files) never match.

Triggers do not touch the astra database: payloads carry paths, and the sensor (or the first task of the
DAG scheduled on the asset) registers them with
:func:`~astra_provider.database.recording.register_new_data_products`, whose atomic claim gives every file
to exactly one run even when events are delivered twice.
"""

from __future__ import annotations

import asyncio
import glob
import os
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent

#: Default SDSS file types to watch.
DEFAULT_FILETYPES: tuple[str, ...] = ("apStar", "apVisit")
#: Key of the watermark in the asset state store.
WATERMARK_KEY = "data_products_watermark"
#: ``payload["kind"]`` of the events these triggers emit.
PAYLOAD_KIND = "astra.new_data_products"
#: ``filetype`` given to files found by an explicit glob that are not SDSS products.
OTHER_FILETYPE = "full"

Watermark = tuple[float, str]


@dataclass(frozen=True, slots=True)
class FoundFile:
    """A file found by a scan."""

    mtime: float
    path: str
    size: int
    filetype: str

    @property
    def key(self) -> Watermark:
        """The sort key, and the watermark once this file has been handed on."""
        return (self.mtime, self.path)


@dataclass(slots=True)
class ScanResult:
    """What one scan found beyond the watermark."""

    #: Ready files newer than the watermark, sorted by ``(mtime, path)``.
    files: list[FoundFile]
    #: Where the next scan starts: the key of the last ready file looked at (including files that
    #: did not parse as the requested file types), else the watermark the scan was given.
    watermark: Watermark | None
    #: Files newer than the watermark that are not ready yet (still being written, or too recent).
    pending: int = 0
    #: Ready files that matched a file-type glob but did not parse as that SDSS file type.
    ignored: int = 0
    #: Files matched by the globs, old ones included.
    matched: int = 0
    seconds: float = field(default=0.0, compare=False)


def watermark_to_json(watermark: Watermark | None) -> dict[str, Any] | None:
    """``{"mtime": ..., "path": ...}`` (``None`` stays ``None``)."""
    if watermark is None:
        return None
    return {"mtime": float(watermark[0]), "path": str(watermark[1])}


def watermark_from_json(value: Any) -> Watermark | None:
    """Read a stored watermark: a ``{"mtime", "path"}`` dict, an ``[mtime, path]`` pair or a bare mtime."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return (float(value["mtime"]), str(value.get("path", "")))
    if isinstance(value, list | tuple):
        return (float(value[0]), str(value[1]) if len(value) > 1 else "")
    return (float(value), "")


def scan_patterns(
    root: str | os.PathLike[str], filetypes: Iterable[str] = DEFAULT_FILETYPES, pattern: str | None = None
) -> list[tuple[str, str | None]]:
    """The ``(glob, filetype)`` pairs a scan walks; ``filetype`` is ``None`` for an explicit ``pattern``.

    An explicit ``pattern`` (absolute, or relative to ``root``; ``**`` recurses) takes precedence over
    ``filetypes``; otherwise each SDSS file type contributes its path-template glob.
    """
    root_text = os.fspath(root)
    if pattern:
        return [(os.path.join(root_text, os.fspath(pattern)), None)]
    from astra_provider.sdss.paths import canonical_filetype, glob_pattern

    names = [canonical_filetype(name) for name in ([filetypes] if isinstance(filetypes, str) else filetypes)]
    if not names:
        raise ValueError("give at least one SDSS file type, or an explicit glob pattern")
    return [(glob_pattern(name, root_text), name) for name in dict.fromkeys(names)]


def _stat_time(st: os.stat_result, use_ctime: bool) -> float:
    return max(st.st_mtime, st.st_ctime) if use_ctime else st.st_mtime


def scan_data_products(
    root: str | os.PathLike[str],
    *,
    filetypes: Iterable[str] = DEFAULT_FILETYPES,
    pattern: str | None = None,
    watermark: Watermark | None = None,
    min_age_seconds: float = 60.0,
    use_ctime: bool = False,
    now: float | None = None,
) -> ScanResult:
    """Find the ready files under ``root`` that are newer than ``watermark``.

    Blocking (one ``stat`` per matched file, a second one per new ready file); run it through
    ``asyncio.to_thread`` from async code. ``use_ctime`` orders files by the later of mtime and ctime, so
    that files copied with their original mtime (``rsync -a``, ``cp -p``) still count as new; ``chmod`` or
    ``chown`` then make old files new again too (registering them again claims nothing).
    """
    started = time.perf_counter()
    now = time.time() if now is None else now
    found: dict[str, tuple[float, int, int, str | None]] = {}
    matched = 0
    for glob_text, filetype in scan_patterns(root, filetypes, pattern):
        for path in glob.iglob(glob_text, recursive=True):
            try:
                st = os.stat(path)
            except OSError:  # deleted meanwhile, dangling link
                continue
            if not stat.S_ISREG(st.st_mode) or path in found:
                continue
            matched += 1
            mtime = _stat_time(st, use_ctime)
            if watermark is not None and (mtime, path) <= watermark:
                continue
            found[path] = (mtime, st.st_size, st.st_mtime_ns, filetype)

    from astra_provider.sdss.paths import parse_path

    ordered = sorted(found.items(), key=lambda item: (item[1][0], item[0]))
    files: list[FoundFile] = []
    ignored = 0
    last = watermark
    ready = 0
    for path, (mtime, size, mtime_ns, filetype) in ordered:
        if now - mtime < min_age_seconds:
            break  # this file and every later one are too recent
        try:
            again = os.stat(path)
        except OSError:
            ready += 1  # gone: nothing to hand on, but do not let it block the files after it
            last = (mtime, path)
            continue
        if again.st_size != size or again.st_mtime_ns != mtime_ns:
            break  # still being written
        ready += 1
        last = (mtime, path)
        parsed = parse_path(path)
        if filetype is None:
            files.append(FoundFile(mtime, path, size, parsed[0] if parsed else OTHER_FILETYPE))
        elif parsed is not None and parsed[0] == filetype:
            files.append(FoundFile(mtime, path, size, filetype))
        else:
            ignored += 1
    return ScanResult(
        files=files,
        watermark=last,
        pending=len(ordered) - ready,
        ignored=ignored,
        matched=matched,
        seconds=time.perf_counter() - started,
    )


def take_batch(result: ScanResult, size: int | None) -> tuple[list[FoundFile], Watermark | None]:
    """The first ``size`` files of a scan (all of them when ``size`` is falsy) and the watermark after them.

    The watermark is the last file's key, or the scan's watermark when the batch takes every file (so the
    files that did not parse are not looked at again).
    """
    if size and len(result.files) > size:
        files = result.files[:size]
        return files, files[-1].key
    return list(result.files), result.watermark


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


def payload_paths(payload: dict[str, Any]) -> list[str]:
    """The absolute paths in an event payload made by :func:`event_payload`."""
    root = payload.get("root") or ""
    return [os.path.join(root, path) for path in payload.get("paths", [])]


class _ScanningTrigger:
    """The scan settings both triggers share (kept as attributes so ``serialize`` can return them)."""

    root: str
    filetypes: list[str]
    pattern: str | None
    min_age_seconds: float
    poll_interval: float
    use_ctime: bool

    def _init_scan(
        self,
        root: str | os.PathLike[str],
        filetypes: Iterable[str] | str,
        pattern: str | None,
        min_age_seconds: float,
        poll_interval: float,
        use_ctime: bool,
    ) -> None:
        self.root = os.fspath(root)
        self.filetypes = [filetypes] if isinstance(filetypes, str) else list(filetypes)
        self.pattern = pattern
        self.min_age_seconds = float(min_age_seconds)
        self.poll_interval = float(poll_interval)
        self.use_ctime = bool(use_ctime)
        scan_patterns(self.root, self.filetypes, self.pattern)  # validate file types early

    def _scan_kwargs(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "filetypes": list(self.filetypes),
            "pattern": self.pattern,
            "min_age_seconds": self.min_age_seconds,
            "poll_interval": self.poll_interval,
            "use_ctime": self.use_ctime,
        }

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
    the paths with ``register_new_data_products``, which claims each file once, so repeats are harmless.

    :param root: the data root to scan.
    :param filetypes: SDSS file types (path-template globs) to watch; ignored when ``pattern`` is given.
    :param pattern: an explicit glob, absolute or relative to ``root`` (``**`` recurses).
    :param min_age_seconds: a file is ready once unmodified for this long (and its size is stable).
    :param poll_interval: seconds between scans.
    :param max_files_per_event: cap on the paths in one event (keeps ``AssetEvent.extra`` small).
    :param emit_existing: on first start (no stored watermark), also emit the files already there;
        ``False`` starts the watermark at the newest ready file instead.
    :param use_ctime: order files by the later of mtime and ctime; use it when files arrive with their
        original mtimes (``rsync -a``, ``cp -p``), which would otherwise sort before the watermark.
    :param asset_name: the watched asset's name; makes the trigger (and its state) specific to that asset.
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike[str],
        filetypes: Iterable[str] | str = DEFAULT_FILETYPES,
        pattern: str | None = None,
        min_age_seconds: float = 60.0,
        poll_interval: float = 60.0,
        max_files_per_event: int = 1000,
        emit_existing: bool = True,
        use_ctime: bool = False,
        asset_name: str | None = None,
    ) -> None:
        super().__init__()
        self._init_scan(root, filetypes, pattern, min_age_seconds, poll_interval, use_ctime)
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

    async def run(self) -> AsyncIterator[TriggerEvent]:
        found, watermark = await self.load_watermark()
        if not found and not self.emit_existing:
            result = await self._scan(None)
            watermark = result.watermark
            await self.save_watermark(watermark)
            self.log.info("Starting after the %d files already in %s", len(result.files), self.root)
            await asyncio.sleep(self.poll_interval)
        while True:
            try:
                result = await self._scan(watermark)
            except Exception:  # e.g. a file system hiccup: keep watching
                self.log.exception("Scanning %s failed; retrying in %.0f s", self.root, self.poll_interval)
                await asyncio.sleep(self.poll_interval)
                continue
            self.log.debug(
                "Scanned %s in %.2f s: %d new, %d pending, %d ignored, %d matched",
                self.root,
                result.seconds,
                len(result.files),
                result.pending,
                result.ignored,
                result.matched,
            )
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

    The event is ``{"status": "success", **event_payload(...)}`` with at most ``max_files`` paths and the
    watermark of the last one; ``{"status": "error", "message": ...}`` if scanning fails.
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike[str],
        filetypes: Iterable[str] | str = DEFAULT_FILETYPES,
        pattern: str | None = None,
        min_age_seconds: float = 60.0,
        poll_interval: float = 60.0,
        watermark: Any = None,
        max_files: int | None = None,
        use_ctime: bool = False,
    ) -> None:
        super().__init__()
        self._init_scan(root, filetypes, pattern, min_age_seconds, poll_interval, use_ctime)
        self.watermark = watermark_from_json(watermark)
        self.max_files = int(max_files) if max_files else None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                **self._scan_kwargs(),
                "watermark": watermark_to_json(self.watermark),
                "max_files": self.max_files,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
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
            if result.pending:
                self.log.info("%d new files in %s are not ready yet", result.pending, self.root)
            self.watermark = watermark  # skip unparseable files next time
            await asyncio.sleep(self.poll_interval)


__all__ = [
    "DEFAULT_FILETYPES",
    "OTHER_FILETYPE",
    "PAYLOAD_KIND",
    "WATERMARK_KEY",
    "FoundFile",
    "NewDataProductsEventTrigger",
    "NewDataProductsTrigger",
    "ScanResult",
    "event_payload",
    "payload_paths",
    "scan_data_products",
    "scan_patterns",
    "take_batch",
    "watermark_from_json",
    "watermark_to_json",
]
