"""Scanning a data root for new, completely written data products (the core shared by the sensor and
the triggers), and reporting what the scans saw.

* :func:`scan_data_products` is a plain, blocking function (glob + ``os.stat``); the triggers run it in a
  worker thread (``asyncio.to_thread``), so the triggerer's event loop never blocks.
* :func:`find_misplaced` walks the root for files that *look like* the watched SDSS file types but are not
  where the SDSS layout puts them (so the layout globs never see them): e.g. a data root given one
  directory too high. It is slower than a scan, so it runs when watching starts and now and then.
* :class:`ScanReporter` logs what the scans saw: every file seen but not taken once (with the reason), and
  a status line when the counts change or every ``status_interval`` seconds.

**New** means "after the watermark": files are ordered by ``(mtime, path)`` and the watermark is the key of
the last file handed on. **Ready** (stable) means not modified for ``min_age_seconds`` and with the same
size and mtime on two ``stat`` calls; the files that are not ready yet hold the watermark back, so no file
still being written is ever skipped. Hidden files (``.name``, e.g. rsync's temporary files) never match.
Files whose real location (symbolic links resolved) is outside the root are never taken.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from astra_provider.hooks.data_products import confine_paths

#: Default SDSS file types to watch.
DEFAULT_FILETYPES: tuple[str, ...] = ("apStar", "apVisit")
#: Default seconds a file must be unmodified to be ready.
DEFAULT_MIN_AGE_SECONDS = 5.0
#: Default seconds between scans.
DEFAULT_POLL_INTERVAL = 5.0
#: Default seconds between status lines while nothing changes.
DEFAULT_STATUS_INTERVAL = 60.0
#: ``filetype`` given to files found by an explicit glob that are not SDSS products.
OTHER_FILETYPE = "full"
#: At most this many files are listed per report (the others are counted).
MAX_LISTED = 20
#: :class:`ScanReporter` remembers at most this many files it has logged.
MAX_REMEMBERED = 100_000
#: :func:`find_misplaced` stops after this many directories.
MAX_PROBED_DIRECTORIES = 20_000

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
    #: were not taken), else the watermark the scan was given.
    watermark: Watermark | None
    #: Files newer than the watermark that are not ready yet (still being written, or too recent).
    pending: int = 0
    #: ``(path, reason)`` of the ready files newer than the watermark that are not taken.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Files matched by the globs, old ones included.
    matched: int = 0
    #: Matched files at or before the watermark (handed on, or looked at, by earlier scans).
    seen_before: int = 0
    #: Seconds since the newest pending file was modified (``None`` without pending files).
    newest_pending_age: float | None = None
    seconds: float = field(default=0.0, compare=False)

    @property
    def ignored(self) -> int:
        """Number of ready files that were not taken (see :attr:`skipped`)."""
        return len(self.skipped)


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


def check_pattern(root: str | os.PathLike[str], pattern: str) -> str:
    """``pattern`` as an absolute glob under ``root``; raises ``ValueError`` if it could match outside it."""
    root_text = os.path.abspath(os.fspath(root))
    text = os.path.join(root_text, os.fspath(pattern))
    parts = os.fspath(pattern).replace("\\", "/").split("/")
    if ".." in parts or not (text == root_text or text.startswith(os.path.join(root_text, ""))):
        raise ValueError(f"the pattern {pattern!r} must stay under the data root {root_text}")
    return text


def scan_patterns(
    root: str | os.PathLike[str], filetypes: Iterable[str] = DEFAULT_FILETYPES, pattern: str | None = None
) -> list[tuple[str, str | None]]:
    """The ``(glob, filetype)`` pairs a scan walks; ``filetype`` is ``None`` for an explicit ``pattern``.

    An explicit ``pattern`` (relative to ``root``, or absolute under it; ``**`` recurses) takes precedence
    over ``filetypes``; otherwise each SDSS file type contributes its path-template glob.
    """
    root_text = os.fspath(root)
    if pattern:
        return [(check_pattern(root_text, pattern), None)]
    from astra_provider.sdss.paths import canonical_filetype, glob_pattern

    names = [canonical_filetype(name) for name in ([filetypes] if isinstance(filetypes, str) else filetypes)]
    if not names:
        raise ValueError("give at least one SDSS file type, or an explicit glob pattern")
    return [(glob_pattern(name, root_text), name) for name in dict.fromkeys(names)]


def describe_watch(filetypes: Sequence[str], pattern: str | None) -> str:
    """What a scan looks for, for log lines: ``"apStar, apVisit (SDSS layout)"`` or ``"pattern '...'"``."""
    return f"pattern {pattern!r}" if pattern else f"{', '.join(filetypes)} (SDSS layout)"


def _stat_time(st: os.stat_result, use_ctime: bool) -> float:
    return max(st.st_mtime, st.st_ctime) if use_ctime else st.st_mtime


def _why_not(path: str, filetype: str) -> str:
    """Why a file matched the glob of ``filetype`` does not parse as that file type."""
    from astra_provider.sdss.paths import parse_path

    try:
        parsed = parse_path(path, strict=True)
    except ValueError as error:
        return str(error).split(": not an SDSS data product path: ", 1)[-1]
    return f"parses as {parsed[0] if parsed else 'nothing'}, not {filetype}"


def scan_data_products(
    root: str | os.PathLike[str],
    *,
    filetypes: Iterable[str] = DEFAULT_FILETYPES,
    pattern: str | None = None,
    watermark: Watermark | None = None,
    min_age_seconds: float = DEFAULT_MIN_AGE_SECONDS,
    use_ctime: bool = False,
    now: float | None = None,
) -> ScanResult:
    """Find the ready files under ``root`` that are newer than ``watermark``.

    Blocking (one ``stat`` per matched file, a second one and a link check per new ready file); run it
    through ``asyncio.to_thread`` from async code. ``use_ctime`` orders files by the later of mtime and
    ctime, so that files copied with their original mtime (``rsync -a``, ``cp -p``) still count as new;
    ``chmod`` or ``chown`` then make old files new again too (registering them again claims nothing).
    """
    started = time.perf_counter()
    now = time.time() if now is None else now
    root = os.path.abspath(os.fspath(root))
    found: dict[str, tuple[float, int, int, str | None]] = {}
    matched = seen_before = 0
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
                seen_before += 1
                continue
            found[path] = (mtime, st.st_size, st.st_mtime_ns, filetype)

    from astra_provider.sdss.paths import parse_path

    ordered = sorted(found.items(), key=lambda item: (item[1][0], item[0]))
    result = ScanResult(files=[], watermark=watermark, matched=matched, seen_before=seen_before)
    ready = 0
    for path, (mtime, size, mtime_ns, filetype) in ordered:
        if now - mtime < min_age_seconds:
            break  # this file and every later one are too recent
        try:
            again = os.stat(path)
        except OSError:
            ready += 1  # gone: nothing to hand on, but do not let it block the files after it
            result.watermark = (mtime, path)
            continue
        if again.st_size != size or again.st_mtime_ns != mtime_ns:
            break  # still being written
        ready += 1
        result.watermark = (mtime, path)
        refused = confine_paths(root, [path]).refused
        parsed = parse_path(path)
        if refused:
            result.skipped.append((path, refused[0][1]))
        elif filetype is None:
            result.files.append(FoundFile(mtime, path, size, parsed[0] if parsed else OTHER_FILETYPE))
        elif parsed is not None and parsed[0] == filetype:
            result.files.append(FoundFile(mtime, path, size, filetype))
        else:
            result.skipped.append((path, _why_not(path, filetype)))
    result.pending = len(ordered) - ready
    if result.pending:
        result.newest_pending_age = max(now - ordered[-1][1][0], 0.0)
    result.seconds = time.perf_counter() - started
    return result


def take_batch(result: ScanResult, size: int | None) -> tuple[list[FoundFile], Watermark | None]:
    """The first ``size`` files of a scan (all of them when ``size`` is falsy) and the watermark after them.

    The watermark is the last file's key, or the scan's watermark when the batch takes every file (so the
    files that were not taken are not looked at again).
    """
    if size and len(result.files) > size:
        files = result.files[:size]
        return files, files[-1].key
    return list(result.files), result.watermark


def _glob_matches(glob_text: str, path: str) -> bool:
    """Whether ``path`` matches a glob without ``**`` (``*`` does not cross ``/``)."""
    glob_parts, path_parts = glob_text.split("/"), path.split("/")
    return len(glob_parts) == len(path_parts) and all(
        fnmatch.fnmatchcase(part, pattern) for part, pattern in zip(path_parts, glob_parts, strict=True)
    )


def find_misplaced(
    root: str | os.PathLike[str],
    filetypes: Iterable[str] = DEFAULT_FILETYPES,
    *,
    max_directories: int = MAX_PROBED_DIRECTORIES,
) -> list[tuple[str, str]]:
    """``(path, reason)`` for the files under ``root`` whose names look like ``filetypes`` but that are not
    where the SDSS layout (and so the scan's globs) expects them, and for directories that cannot be read.

    Walks at most ``max_directories`` directories (hidden ones skipped); a last entry says when it stopped.
    """
    from astra_provider.sdss.paths import FILETYPES

    root_text = os.path.abspath(os.fspath(root))
    globs = dict((name, text) for text, name in scan_patterns(root_text, filetypes) if name is not None)
    problems: list[tuple[str, str]] = []

    def unreadable(error: OSError) -> None:
        problems.append((str(error.filename), f"cannot read this directory ({error.strerror})"))

    visited = 0
    for directory, subdirectories, names in os.walk(root_text, onerror=unreadable):
        visited += 1
        if visited > max_directories:
            problems.append((root_text, f"layout check stopped after {max_directories} directories"))
            break
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(names):
            for filetype, glob_text in globs.items():
                if not FILETYPES[filetype].filename_regex.match(name):
                    continue
                path = os.path.join(directory, name)
                if not _glob_matches(glob_text, path):
                    layout = os.path.relpath(glob_text, root_text)
                    reason = (
                        f"named like {filetype} but not where the SDSS layout puts it ({layout} under the "
                        f"root), so it is not watched; watch such files with a pattern, e.g. "
                        f"'**/{filetype}-*.fits'"
                    )
                    problems.append((path, reason))
    return problems


def describe_scan(result: ScanResult, min_age_seconds: float) -> str:
    """What a scan saw, in words: files matched, seen before, new, not ready yet, not taken."""
    parts = [f"{result.matched} files match"]
    if result.seen_before:
        parts.append(f"{result.seen_before} seen before")
    if result.files:
        parts.append(f"{len(result.files)} new and ready")
    if result.pending:
        age = result.newest_pending_age or 0.0
        parts.append(
            f"{result.pending} not ready yet (the newest modified {age:.0f} s ago; ready once unmodified "
            f"for {min_age_seconds:g} s)"
        )
    if result.ignored:
        parts.append(f"{result.ignored} not taken (each listed once)")
    return ", ".join(parts)


class ScanReporter:
    """Logs what the scans of one root saw.

    Every file seen but not taken is logged once, with its reason (:meth:`not_taken`); a status line
    (:meth:`status`) is logged when the counts change, and every ``status_interval`` seconds otherwise.

    :param logger: where to log (a trigger's or operator's ``log``).
    :param root: the watched root.
    :param watching: what is watched (:func:`describe_watch`).
    :param min_age_seconds: the readiness age, quoted in status lines.
    :param status_interval: seconds between status lines while nothing changes.
    """

    def __init__(
        self,
        logger: Any,
        root: str,
        watching: str,
        *,
        min_age_seconds: float,
        status_interval: float = DEFAULT_STATUS_INTERVAL,
    ) -> None:
        self.logger, self.root, self.watching = logger, root, watching
        self.min_age_seconds = min_age_seconds
        self.status_interval = status_interval
        self._told: set[str] = set()
        self._last: tuple[int, ...] | None = None
        self._last_time = float("-inf")

    @classmethod
    def for_watch(
        cls,
        logger: Any,
        root: str,
        filetypes: Sequence[str],
        pattern: str | None,
        *,
        min_age_seconds: float,
        status_interval: float = DEFAULT_STATUS_INTERVAL,
    ) -> ScanReporter:
        """The reporter of a watch of ``root`` for ``filetypes`` or ``pattern`` (:func:`describe_watch`)."""
        watching = describe_watch(filetypes, pattern)
        return cls(logger, root, watching, min_age_seconds=min_age_seconds, status_interval=status_interval)

    def not_taken(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Log the files (or directories) not taken that were not logged before."""
        new = [(path, reason) for path, reason in skipped if path not in self._told]
        for path, reason in new[:MAX_LISTED]:
            self.logger.warning("Not taking %s: %s", path, reason)
        if len(new) > MAX_LISTED:
            self.logger.warning(
                "Not taking %d more files for the same kinds of reasons", len(new) - MAX_LISTED
            )
        if len(self._told) > MAX_REMEMBERED:  # a watcher runs for months: forget, and list again once
            self._told.clear()
        self._told.update(path for path, _ in new)

    def status(self, result: ScanResult, note: str = "", *, force: bool = False) -> bool:
        """Log what ``result`` saw if it differs from the last status, or the interval has passed."""
        self.not_taken(result.skipped)
        counts = (result.matched, result.seen_before, len(result.files), result.pending, result.ignored)
        now = time.monotonic()
        if not force and counts == self._last and now - self._last_time < self.status_interval:
            return False
        self._last, self._last_time = counts, now
        self.logger.info(
            "Watching %s for %s: %s%s (scan %.2f s)",
            self.root,
            self.watching,
            describe_scan(result, self.min_age_seconds),
            note,
            result.seconds,
        )
        return True


__all__ = [
    "DEFAULT_FILETYPES",
    "DEFAULT_MIN_AGE_SECONDS",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_STATUS_INTERVAL",
    "OTHER_FILETYPE",
    "FoundFile",
    "ScanReporter",
    "ScanResult",
    "Watermark",
    "check_pattern",
    "describe_scan",
    "describe_watch",
    "find_misplaced",
    "scan_data_products",
    "scan_patterns",
    "take_batch",
    "watermark_from_json",
    "watermark_to_json",
]
