"""Wait inside a DAG run for new data products, and claim them for that run.

:class:`DataProductSensor` finds ready (completely written) files under a data root, registers them as
``DataProduct`` rows with :func:`~astra_provider.database.recording.register_new_data_products`, and returns
the rows *this* call created. That insert is an atomic claim on the (release, filetype, kwargs_hash)
unique constraint: when several runs (or sensors, or watcher consumers) see the same file, exactly one of
them gets it. "New" therefore means "not registered yet"; files already in the astra database are skipped,
unless ``include_registered`` asks for them too (to process a data root again: the steps downstream then
skip the spectra already analysed).

To start a DAG run when files arrive, rather than waiting inside a run, use the asset watcher in
:mod:`astra_provider.assets`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from astra_provider.triggers.data_products import DEFAULT_FILETYPES, FoundFile, Watermark
from astra_provider.utils import as_bool

if TYPE_CHECKING:
    from airflow.sdk import Context

    from astra_provider.database.astradb import DataProduct

#: Shortest ``poke_interval`` (seconds) that is safe with ``mode="reschedule"`` on Airflow 3.3.
SAFE_RESCHEDULE_INTERVAL = 60.0


def astra_database_url(astra_conn_id: str | None) -> str | None:
    """The astra database URL of the Airflow connection ``astra_conn_id`` (via ``AstraHook``).

    ``astra_conn_id=None`` gives ``None``: the default lookup of :mod:`astra_provider.database`
    (``configure()``, then ``ASTRA_DATABASE_URL``, then the embedded SQLite file).
    """
    if astra_conn_id is None:
        return None
    from astra_provider.hooks.astra import AstraHook

    return AstraHook(astra_conn_id).get_database_url()


def _specs(paths: Iterable[str]) -> list[Any]:
    """``DataProductSpec``s for the files that still exist (files deleted meanwhile are skipped)."""
    from astra_provider.database.recording import DataProductSpec

    specs = []
    for path in paths:
        try:
            specs.append(DataProductSpec.from_path(path))
        except FileNotFoundError:
            continue
    return specs


def claim_data_products(
    paths: Sequence[str], *, database_url: str | None = None, max_new: int | None = None
) -> tuple[list[DataProduct], int]:
    """Register ``paths`` as data products and return ``(rows this call created, number of paths used)``.

    Paths are claimed in order. With ``max_new``, claiming stops once that many rows were created; the
    paths after the returned count were not looked at. Files that no longer exist are skipped.
    """
    from astra_provider.database import session_scope
    from astra_provider.database.recording import register_new_data_products

    if not max_new:
        with session_scope(database_url) as session:
            return register_new_data_products(session, _specs(paths)), len(paths)
    created: list[DataProduct] = []
    used = 0
    with session_scope(database_url) as session:
        while used < len(paths) and len(created) < max_new:
            chunk = paths[used : used + max_new - len(created)]
            created.extend(register_new_data_products(session, _specs(chunk)))
            used += len(chunk)
    return created, used


def registered_data_products(paths: Sequence[str], *, database_url: str | None = None) -> list[DataProduct]:
    """The ``DataProduct`` rows already registered for ``paths`` (files that are not registered are left out).

    Nothing is inserted: claim new files with :func:`claim_data_products` first.
    """
    from sqlalchemy import select

    from astra_provider.database import session_scope
    from astra_provider.database.astradb import DataProduct
    from astra_provider.database.recording import select_in

    specs = {(s.release, s.filetype, s.kwargs_hash): s for s in _specs(paths)}
    if not specs:
        return []
    with session_scope(database_url) as session:
        rows = select_in(
            session, select(DataProduct), DataProduct.kwargs_hash, sorted({key[2] for key in specs})
        )
        found = {(p.release, p.filetype, p.kwargs_hash): p for (p,) in rows}
    return [found[key] for key in specs if key in found]


def data_products_xcom(products: Sequence[DataProduct], *, encode: bool = True) -> dict[str, Any]:
    """The compact XCom value describing claimed data products.

    ``{"data_product_pks": [...], "by_filetype": {filetype: [...]}, "counts": {filetype: n}}``. With
    ``encode`` (the default) runs of consecutive pks are written as inclusive ``[first, last]`` pairs
    (:func:`astra_provider.bundling.encode_pks`); read them back with
    :func:`astra_provider.bundling.decode_pks`, which also accepts plain lists.
    """
    from astra_provider.bundling import encode_pks

    by_filetype: dict[str, list[int]] = {}
    for product in products:
        by_filetype.setdefault(product.filetype, []).append(int(product.pk))
    pks = [int(p.pk) for p in products]

    def write(values: list[int]) -> list[Any]:
        return encode_pks(values) if encode else values

    return {
        "data_product_pks": write(pks),
        "by_filetype": {filetype: write(values) for filetype, values in sorted(by_filetype.items())},
        "counts": {filetype: len(values) for filetype, values in sorted(by_filetype.items())},
    }


class DataProductSensor(BaseSensorOperator):
    """Wait for new, completely written data products under ``root``; register them and return their pks.

    Returns (XCom ``return_value``) ``{"data_product_pks": [...], "by_filetype": {filetype: [...]},
    "counts": {filetype: n}}`` for the rows this task created (pk lists range-encoded, see
    :func:`data_products_xcom`); a file is never handed to two runs, even when runs overlap. On the first
    check all ready, unregistered files count (bound the backlog with ``max_files``); later checks only
    look at files newer than the last one seen.

    With ``include_registered`` the task also returns the ready files that are registered already (new
    files are still claimed atomically, so two runs never both *claim* a file, but both may return it):
    for running a pipeline again over a whole data root, where the steps downstream skip what is done.

    ``deferrable=True`` (the default, recommended) waits in the triggerer
    (:class:`~astra_provider.triggers.data_products.NewDataProductsTrigger`) without holding a worker slot.
    ``deferrable=False`` with ``mode="poke"`` holds a worker slot and scans every ``poke_interval``.

    .. warning::
        Do not use ``mode="reschedule"`` with a short ``poke_interval`` on Airflow 3.3: a scheduler race
        (apache/airflow#71172, reproduced on 3.3.2) can mark the sensor FAILED between reschedules. Use
        ``deferrable=True``, or keep ``poke_interval`` at least 60 s.

    :param root: data root to scan (templated).
    :param filetypes: SDSS file types to look for (path-template globs; templated).
    :param pattern: explicit glob instead of ``filetypes``, absolute or relative to ``root`` (templated).
    :param min_age_seconds: a file is ready once unmodified for this long and its size is stable
        (templated; a number, or a template that renders to one).
    :param max_files: at most this many *new* products per run (``None``: all ready files).
    :param include_registered: also return ready files that are already registered (templated; a bool,
        or a template that renders to one, ``"False"`` included).
    :param astra_conn_id: Airflow connection of the astra database.
    :param deferrable: wait in the triggerer (recommended).
    :param encode_pks: write runs of consecutive pks as ``[first, last]`` (decode with
        :func:`astra_provider.bundling.decode_pks`); ``False`` returns plain lists.
    :param use_ctime: order files by the later of mtime and ctime (for files copied with ``rsync -a``).
    """

    template_fields: Sequence[str] = ("root", "filetypes", "pattern", "min_age_seconds", "include_registered")
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        root: str | os.PathLike[str],
        filetypes: Sequence[str] | str = DEFAULT_FILETYPES,
        pattern: str | None = None,
        min_age_seconds: float | str = 60.0,
        max_files: int | None = None,
        include_registered: bool | str = False,
        astra_conn_id: str | None = "astra_default",
        deferrable: bool = True,
        encode_pks: bool = True,
        use_ctime: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = os.fspath(root)
        self.filetypes = [filetypes] if isinstance(filetypes, str) else list(filetypes)
        self.pattern = pattern
        # Numbers are checked now; templates ("{{ params.x }}") once rendered, by _settings().
        self.min_age_seconds = min_age_seconds if isinstance(min_age_seconds, str) else float(min_age_seconds)
        self.max_files = int(max_files) if max_files else None
        self.include_registered = include_registered
        self.astra_conn_id = astra_conn_id
        self.deferrable = deferrable
        self.encode_pks = encode_pks
        self.use_ctime = use_ctime
        self._watermark: Watermark | None = None
        if not deferrable and self.mode == "reschedule" and self.poke_interval < SAFE_RESCHEDULE_INTERVAL:
            warnings.warn(
                f"{self.task_id}: mode='reschedule' with poke_interval={self.poke_interval:g}s can be "
                "marked FAILED by a scheduler race on Airflow 3.3 (apache/airflow#71172); use "
                f"deferrable=True or poke_interval >= {SAFE_RESCHEDULE_INTERVAL:g}s",
                UserWarning,
                stacklevel=2,
            )

    # -- scanning and claiming ------------------------------------------------------------------------

    def _settings(self) -> None:
        """Turn the rendered templated settings into their types (a no-op when they already are)."""
        try:
            self.min_age_seconds = float(self.min_age_seconds)
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.task_id}: min_age_seconds must be a number, got {self.min_age_seconds!r}"
            ) from None
        self.include_registered = as_bool(self.include_registered, f"{self.task_id}: include_registered")

    def _scan(self, watermark: Watermark | None) -> Any:
        from astra_provider.triggers.data_products import scan_data_products

        return scan_data_products(
            self.root,
            filetypes=self.filetypes,
            pattern=self.pattern,
            watermark=watermark,
            min_age_seconds=self.min_age_seconds,
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
        url = astra_database_url(self.astra_conn_id)
        created, used = claim_data_products(paths, database_url=url, max_new=self.max_files)
        if not paths:
            return created, used
        if not self.include_registered:
            skipped = used - len(created)
            self.log.info(
                "Claimed %d of %d ready files under %s%s",
                len(created),
                used,
                self.root,
                f" ({skipped} were registered already)" if skipped else "",
            )
            return created, used
        mine = {p.pk for p in created}
        registered = [p for p in registered_data_products(paths[:used], database_url=url) if p.pk not in mine]
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
        products = self._claim(result.files, result.watermark)
        if products:
            return PokeReturnValue(
                is_done=True, xcom_value=data_products_xcom(products, encode=self.encode_pks)
            )
        if result.pending:
            self.log.info("%d new files under %s are not ready yet", result.pending, self.root)
        return PokeReturnValue(is_done=False)

    # -- deferrable path ------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        self._settings()
        if not self.deferrable:
            return super().execute(context)
        started = time.time()
        result = self.poke(context)
        if result.is_done:
            return result.xcom_value
        self._defer(deadline=started + self.timeout)

    def _defer(self, *, deadline: float) -> None:
        from airflow.sdk.exceptions import AirflowSensorTimeout

        from astra_provider.triggers.data_products import NewDataProductsTrigger, watermark_to_json

        remaining = deadline - time.time()
        if remaining <= 0:
            raise AirflowSensorTimeout(f"no new data products under {self.root} within {self.timeout:g}s")
        self.defer(
            trigger=NewDataProductsTrigger(
                root=self.root,
                filetypes=self.filetypes,
                pattern=self.pattern,
                min_age_seconds=self.min_age_seconds,
                poll_interval=self.poke_interval,
                watermark=watermark_to_json(self._watermark),
                max_files=self.max_files,
                use_ctime=self.use_ctime,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=remaining),
            kwargs={"deadline": deadline},
        )

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, deadline: float | None = None
    ) -> Any:
        """Claim the files the trigger found; wait again if other runs claimed all of them first."""
        from airflow.sdk.exceptions import AirflowException

        from astra_provider.triggers.data_products import payload_paths, watermark_from_json

        if not event or event.get("status") != "success":
            message = (event or {}).get("message", "no event")
            raise AirflowException(f"watching {self.root} for data products failed: {message}")
        self._settings()
        watermark = watermark_from_json(event.get("watermark"))
        paths = payload_paths(event)
        products, _ = self._claim_paths(paths)
        if products:
            return data_products_xcom(products, encode=self.encode_pks)
        self._watermark = watermark
        self._defer(deadline=deadline if deadline is not None else time.time() + self.timeout)


__all__ = [
    "SAFE_RESCHEDULE_INTERVAL",
    "DataProductSensor",
    "astra_database_url",
    "claim_data_products",
    "data_products_xcom",
    "registered_data_products",
]
