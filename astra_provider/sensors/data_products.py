"""Wait inside a DAG run for new data products, and claim them for that run.

:class:`DataProductSensor` finds ready (completely written) files under a data root, registers them as
``DataProduct`` rows through :meth:`~astra_provider.hooks.astra.AstraHook.claim_data_products`, and returns
the rows *this* task created. That insert is an atomic claim on the (release, filetype, kwargs_hash)
unique constraint: when several runs (or sensors, or watcher consumers) see the same file, exactly one of
them gets it. "New" therefore means "not registered yet"; files already in the astra database are skipped,
unless ``include_registered`` asks for them too (to process a data root again: the steps downstream then
skip the spectra already analysed).

It fails at once, naming the path, when the data root is missing or unreadable; while it waits it logs
what it sees (files matched, not ready yet, not taken and why).

To start a DAG run when files arrive, rather than waiting inside a run, use the asset watcher in
:mod:`astra_provider.assets`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from astra_provider.hooks.data_products import (
    DataRootError,
    check_data_root,
    claim_data_products,
    data_products_xcom,
    registered_data_products,
)
from astra_provider.triggers.scan import (
    DEFAULT_FILETYPES,
    DEFAULT_MIN_AGE_SECONDS,
    DEFAULT_POLL_INTERVAL,
    OTHER_FILETYPE,
    FoundFile,
    ScanReporter,
    Watermark,
)
from astra_provider.utils import as_bool

if TYPE_CHECKING:
    from airflow.sdk import Context

    from astra_provider.database.astradb import DataProduct
    from astra_provider.hooks.astra import AstraHook

#: Shortest ``poke_interval`` (seconds) that is safe with ``mode="reschedule"`` on Airflow 3.3.
SAFE_RESCHEDULE_INTERVAL = 60.0
#: Seconds the deferral timeout leaves the trigger to report its own timeout (with what it saw).
DEFERRAL_GRACE_SECONDS = 60.0


def astra_database_url(astra_conn_id: str | None) -> str | None:
    """The astra database URL of the Airflow connection ``astra_conn_id`` (via ``AstraHook``).

    ``astra_conn_id=None`` gives ``None``: the default lookup of :mod:`astra_provider.database`
    (``configure()``, then ``ASTRA_DATABASE_URL``, then the embedded SQLite file).
    """
    if astra_conn_id is None:
        return None
    from astra_provider.hooks.astra import AstraHook

    return AstraHook(astra_conn_id).get_database_url()


def _number(value: Any, name: str, task_id: str, minimum: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number >= minimum:  # also false for NaN
        raise ValueError(f"{task_id}: {name} must be a number >= {minimum:g}, got {value!r}")
    return number


class DataProductSensor(BaseSensorOperator):
    """Wait for new, completely written data products under ``root``; register them and return their pks.

    Returns (XCom ``return_value``) ``{"data_product_pks": [...], "by_filetype": {filetype: [...]},
    "counts": {filetype: n}}`` for the rows this task created (pk lists range-encoded, see
    :func:`~astra_provider.hooks.data_products.data_products_xcom`); a file is never handed to two runs,
    even when runs overlap. On the first check all ready, unregistered files count (bound the backlog with
    ``max_files``); later checks only look at files newer than the last one seen.

    With ``include_registered`` the task also returns the ready files that are registered already (new
    files are still claimed atomically, so two runs never both *claim* a file, but both may return it):
    for running a pipeline again over a whole data root, where the steps downstream skip what is done.

    The task fails at once (without retries, :class:`~astra_provider.hooks.data_products.DataRootError`)
    when ``root`` is empty, missing, not a directory or unreadable, naming the path; ``soft_fail`` does not
    turn that into a skip. It logs every file it sees but does not take, once, with the reason (including
    files named like the watched file types outside the SDSS layout), and a status line while it waits.

    ``deferrable=True`` (the default, recommended) waits in the triggerer
    (:class:`~astra_provider.triggers.data_products.NewDataProductsTrigger`) without holding a worker slot;
    the trigger gives up at the sensor's ``timeout`` itself, also when it runs in-process (``airflow tasks
    test``). ``deferrable=False`` with ``mode="poke"`` holds a worker slot and scans every ``poke_interval``.

    .. warning::
        Do not use ``mode="reschedule"`` with a short ``poke_interval`` on Airflow 3.3: a scheduler race
        (apache/airflow#71172, reproduced on 3.3.2) can mark the sensor FAILED between reschedules. Use
        ``deferrable=True``, or keep ``poke_interval`` at least 60 s.

    :param root: data root to scan (templated).
    :param filetypes: SDSS file types to look for (path-template globs; templated).
    :param pattern: a glob instead of ``filetypes``, relative to ``root`` (templated; ``**`` recurses; an
        empty value means ``filetypes``): for deeper or non-SDSS layouts, e.g. ``"**/apStar-*.fits"``.
    :param min_age_seconds: a file is ready once unmodified for this long and its size is stable
        (templated; a number, or a template that renders to one).
    :param poke_interval: seconds between scans (templated, like ``min_age_seconds``).
    :param timeout: seconds to wait for new files before failing (templated, like ``min_age_seconds``).
    :param max_files: at most this many *new* products per run (``None``: all ready files).
    :param include_registered: also return ready files that are already registered (templated; a bool,
        or a template that renders to one, ``"False"`` included).
    :param astra_conn_id: Airflow connection of the astra database.
    :param deferrable: wait in the triggerer (recommended).
    :param encode_pks: write runs of consecutive pks as ``[first, last]`` (decode with
        :func:`astra_provider.bundling.decode_pks`); ``False`` returns plain lists.
    :param use_ctime: order files by the later of mtime and ctime (for files copied with ``rsync -a``).
    """

    template_fields: Sequence[str] = (
        "root",
        "filetypes",
        "pattern",
        "min_age_seconds",
        "include_registered",
        "poke_interval",
        "timeout",
    )
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        root: str | os.PathLike[str],
        filetypes: Sequence[str] | str = DEFAULT_FILETYPES,
        pattern: str | None = None,
        min_age_seconds: float | str = DEFAULT_MIN_AGE_SECONDS,
        poke_interval: float | str = DEFAULT_POLL_INTERVAL,
        timeout: float | str | timedelta | None = None,
        max_files: int | None = None,
        include_registered: bool | str = False,
        astra_conn_id: str | None = "astra_default",
        deferrable: bool = True,
        encode_pks: bool = True,
        use_ctime: bool = False,
        **kwargs: Any,
    ) -> None:
        # Templates ("{{ params.x }}") are checked once rendered, by _settings(); numbers now.
        super().__init__(
            poke_interval=DEFAULT_POLL_INTERVAL if isinstance(poke_interval, str) else poke_interval,
            timeout=None if isinstance(timeout, str) else timeout,
            **kwargs,
        )
        if isinstance(poke_interval, str):
            self.poke_interval = poke_interval  # type: ignore[assignment]
        if isinstance(timeout, str):
            self.timeout = timeout  # type: ignore[assignment]
        self.root = os.fspath(root)
        self.filetypes = [filetypes] if isinstance(filetypes, str) else list(filetypes)
        self.pattern = pattern
        self.min_age_seconds = min_age_seconds if isinstance(min_age_seconds, str) else float(min_age_seconds)
        self.max_files = int(max_files) if max_files else None
        self.include_registered = include_registered
        self.astra_conn_id = astra_conn_id
        self.deferrable = deferrable
        self.encode_pks = encode_pks
        self.use_ctime = use_ctime
        self._watermark: Watermark | None = None
        self._reporter: ScanReporter | None = None
        self._deferred = False
        short = isinstance(self.poke_interval, int | float) and self.poke_interval < SAFE_RESCHEDULE_INTERVAL
        if not deferrable and self.mode == "reschedule" and short:
            warnings.warn(
                f"{self.task_id}: mode='reschedule' with poke_interval={self.poke_interval:g}s can be "
                "marked FAILED by a scheduler race on Airflow 3.3 (apache/airflow#71172); use "
                f"deferrable=True or poke_interval >= {SAFE_RESCHEDULE_INTERVAL:g}s",
                UserWarning,
                stacklevel=2,
            )

    # -- settings, scanning and claiming --------------------------------------------------------------

    def _settings(self) -> None:
        """Turn the rendered templated settings into their types (a no-op when they already are)."""
        self.min_age_seconds = _number(self.min_age_seconds, "min_age_seconds", self.task_id)
        self.poke_interval = _number(self.poke_interval, "poke_interval", self.task_id)
        self.timeout = _number(self.timeout, "timeout", self.task_id)
        self.include_registered = as_bool(self.include_registered, f"{self.task_id}: include_registered")
        self.pattern = str(self.pattern).strip() or None if self.pattern is not None else None
        if isinstance(self.filetypes, str):
            self.filetypes = [self.filetypes]

    def _hook(self) -> AstraHook:
        from astra_provider.hooks.astra import AstraHook

        return AstraHook(self.astra_conn_id)

    @property
    def reporter(self) -> ScanReporter:
        if self._reporter is None:
            self._reporter = ScanReporter.for_watch(
                self.log, self.root, self.filetypes, self.pattern, min_age_seconds=float(self.min_age_seconds)
            )
        return self._reporter

    def _start(self) -> None:
        """Render the settings, check the root (fail at once if it cannot be watched), check the layout."""
        from astra_provider.triggers.scan import check_pattern, find_misplaced

        self._settings()
        self.root = check_data_root(self.root)
        if self.pattern:
            check_pattern(self.root, self.pattern)
        else:
            self.reporter.not_taken(find_misplaced(self.root, self.filetypes))

    def _scan(self, watermark: Watermark | None) -> Any:
        from astra_provider.triggers.scan import scan_data_products

        return scan_data_products(
            self.root,
            filetypes=self.filetypes,
            pattern=self.pattern,
            watermark=watermark,
            min_age_seconds=float(self.min_age_seconds),
            use_ctime=self.use_ctime,
        )

    def _claim(self, files: Sequence[FoundFile], scan_watermark: Watermark | None) -> list[DataProduct]:
        """Claim ``files`` (in order); advance the watermark past the files looked at.

        Returns the rows claimed, and with ``include_registered`` the registered rows of the others too.
        """
        paths = [f.path for f in files]
        products, used = self._claim_paths(paths)
        self._watermark = files[used - 1].key if used < len(files) else scan_watermark
        return products

    def _claim_paths(self, paths: Sequence[str]) -> tuple[list[DataProduct], int]:
        hook = self._hook()
        created, used = hook.claim_data_products(paths, root=self.root, max_new=self.max_files)
        if not paths:
            return created, used
        if not self.include_registered:
            skipped = used - len(created)
            self.log.info(
                "Claimed %d of %d ready files under %s%s",
                len(created),
                used,
                self.root,
                f" ({skipped} were registered already; rediscover/include_registered takes them too)"
                if skipped
                else "",
            )
            return created, used
        mine = {p.pk for p in created}
        before = hook.registered_data_products(paths[:used], root=self.root)
        registered = [p for p in before if p.pk not in mine]
        self.log.info(
            "Claimed %d new ready files under %s; %d more were registered already and are included "
            "(include_registered)",
            len(created),
            self.root,
            len(registered),
        )
        return sorted([*created, *registered], key=lambda p: p.pk), used

    def poke(self, context: Context) -> PokeReturnValue:
        self._settings()
        result = self._scan(self._watermark)
        self.reporter.status(result)
        plain = [f.path for f in result.files if f.filetype == OTHER_FILETYPE]
        if plain:
            self.log.info(
                "%d files matched by the pattern are not SDSS product paths (e.g. %s): they are registered "
                "as plain files (filetype %r)",
                len(plain),
                plain[0],
                OTHER_FILETYPE,
            )
        products = self._claim(result.files, result.watermark)
        if products:
            return PokeReturnValue(
                is_done=True, xcom_value=data_products_xcom(products, encode=self.encode_pks)
            )
        return PokeReturnValue(is_done=False)

    # -- deferrable path ------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        self._start()
        if not self.deferrable:
            return super().execute(context)
        started = time.time()
        result = self.poke(context)
        if result.is_done:
            return result.xcom_value
        self._defer(deadline=started + self.timeout)

    def _defer(self, *, deadline: float) -> None:
        from airflow.sdk.exceptions import AirflowSensorTimeout

        from astra_provider.triggers.data_products import NewDataProductsTrigger
        from astra_provider.triggers.scan import watermark_to_json

        remaining = deadline - time.time()
        if remaining <= 0:
            raise AirflowSensorTimeout(f"no new data products under {self.root} within {self.timeout:g} s")
        self.log.info(
            "Waiting in the triggerer for new files under %s (a scan every %g s, for at most %.0f s)",
            self.root,
            self.poke_interval,
            remaining,
        )
        self._deferred = True
        self.defer(
            trigger=NewDataProductsTrigger(
                root=self.root,
                filetypes=self.filetypes,
                pattern=self.pattern,
                min_age_seconds=float(self.min_age_seconds),
                poll_interval=self.poke_interval,
                watermark=watermark_to_json(self._watermark),
                max_files=self.max_files,
                use_ctime=self.use_ctime,
                deadline=deadline,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=remaining + DEFERRAL_GRACE_SECONDS),
            kwargs={"deadline": deadline},
        )

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, deadline: float | None = None
    ) -> Any:
        """Claim the files the trigger found; wait again if other runs claimed all of them first.

        Without an event (the task run again after it had deferred, e.g. by ``airflow tasks test``) it
        starts over, as :meth:`execute`.
        """
        from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout

        from astra_provider.triggers.data_products import payload_paths
        from astra_provider.triggers.scan import watermark_from_json

        if not event:
            self.log.info("Resumed without a trigger event (run again after deferring): starting over")
            return self.execute(context)
        status = event.get("status")
        message = str(event.get("message", ""))
        if status == "error" and event.get("kind") == "data_root":
            raise DataRootError(message)
        if status == "timeout":
            raise AirflowSensorTimeout(message)
        if status != "success":
            raise AirflowException(f"watching {self.root} for data products failed: {message or event!r}")
        self._settings()
        watermark = watermark_from_json(event.get("watermark"))
        products, _ = self._claim_paths(payload_paths(event, self.root, logger=self.log))
        if products:
            return data_products_xcom(products, encode=self.encode_pks)
        self._watermark = watermark
        self._defer(deadline=deadline if deadline is not None else time.time() + self.timeout)

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        """As the base sensor's, except that a bad data root fails even with ``soft_fail``."""
        from airflow.sdk.exceptions import AirflowSkipException

        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except AirflowSkipException as skip:
            if isinstance(skip.__cause__, DataRootError):
                raise skip.__cause__ from None
            raise

    def on_kill(self) -> None:
        """Stop a trigger that runs in this process (``airflow tasks test``, ``dag.test()``) on SIGTERM.

        In a worker the task has exited by the time it is deferred; in-process, the task runner's SIGTERM
        handler only calls this method, so the in-process trigger would otherwise keep waiting.
        """
        if self._deferred:
            from airflow.sdk.exceptions import AirflowTaskTerminated

            raise AirflowTaskTerminated(f"{self.task_id}: terminated while waiting for files in {self.root}")


__all__ = [
    "DEFERRAL_GRACE_SECONDS",
    "SAFE_RESCHEDULE_INTERVAL",
    "DataProductSensor",
    "astra_database_url",
    "claim_data_products",
    "data_products_xcom",
    "registered_data_products",
]
