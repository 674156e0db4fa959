"""Sinusoidal pseudo-continuum normalisation as a task, and its output files.

Each task reads one apStar file and normalises every row (stacks and visits) with
:func:`astra_provider.science.continuum.common_grid.continuum_normalize`, batched over the whole bundle. The
bundle's normalised spectra go to **one FITS file per bundle**, one image row per spectrum row, written
atomically; each task records one ``astra.continuum`` row per spectrum row and one output data product that
says where its rows are (``docs/outputs.md``).

Output file ``{output_dir}/astraContinuum-{version}-{digest}.fits``, where ``digest`` hashes the ``task_id``
and ``pk`` of every task in the file (so different parameters, versions, bundles or forced re-runs never
share a name):

* HDU 0: ``V_ASTRA`` (version), ``TASKNAME``, ``CONTDEG``, ``CONTL``, ``CONTPIX``, ``NTASKS``, ``NROWS``;
* ``WAVELENGTH`` (P,) float64 vacuum Å;
* ``FLUX``, ``IVAR`` (n, P) float32: normalised flux and its inverse variance;
* ``CONTINUUM`` (n, P) float32: the fitted continuum in the input flux units;
* ``ROWS`` table, one row per spectrum row: ``TASK_PK``, ``TASK_ID``, ``SOURCE_PK`` and ``SOURCE`` (the
  input data product), ``ROW_INDEX`` (the row in the input file), ``SNR``, ``FLAG``.

A task's output data product has ``filetype = "astraContinuum"``, ``path`` the file, and
``kwargs = {"path", "row_start", "row_stop"}``: its rows are ``[row_start, row_stop)`` of ``FLUX``, ``IVAR``,
``CONTINUUM`` and ``ROWS``. :func:`read_normalized` reads a data product (or a path and rows);
:func:`read_normalized_inputs` reads the inputs of a whole bundle (TestTheCannon, TestThePayne).

The continuum pixels are those of ``continuum_pixels_path`` (a pixel file), else of the Cannon or Payne
model at ``model_path`` (the pixels its training spectra were normalised with), else the shipped
synthetic-quadratic list; their set id is recorded as ``CONTPIX``, which ``TestTheCannon`` and
``TestThePayne`` check against their model's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from astra_provider.base import Parameter, TaskInstance
from astra_provider.database import astra_home
from astra_provider.database.astradb import Continuum
from astra_provider.utils import Closing

if TYPE_CHECKING:
    import numpy as np

    from astra_provider.database.astradb import DataProduct, Task
    from astra_provider.sdss.spectrum import Spectrum

#: ``astra.continuum.bitmask_flag`` bits.
FLAG_FIT_FAILED = 1  # too few usable continuum pixels in a region: the row is not normalised
#: The ``filetype`` of the output data products.
OUTPUT_FILETYPE = "astraContinuum"
_HDUS = ("WAVELENGTH", "FLUX", "IVAR", "CONTINUUM", "ROWS")


class SinusoidalContinuum(TaskInstance):
    """Normalise apStar spectra by a sum of sines and cosines fitted to fixed continuum pixels."""

    deg = Parameter(default=3, type=int, bundled=True, description="Number of sine/cosine pairs per region.")
    length_scale = Parameter(
        default=1400.0, type=float, bundled=True, description="Period L of the sinusoids (Å)."
    )
    output_dir = Parameter(
        default=None, type=str, bundled=True, description="Where to write the normalised spectra."
    )

    model_path = Parameter(
        default=None,
        type=str,
        bundled=True,
        description="A Cannon or Payne model: normalise with its continuum pixels.",
    )
    continuum_pixels_path = Parameter(
        default=None,
        type=str,
        bundled=True,
        description="A continuum-pixel file (one pixel index per line); default: the model's pixels, else "
        "the shipped synthetic-quadratic list.",
    )

    def execute(self):
        import numpy as np

        from astra_provider.science.continuum import continuum_normalize
        from astra_provider.science.continuum_pixels import continuum_pixel_set_id, resolve_continuum_pixels
        from astra_provider.sdss.apogee import apogee_wavelength
        from astra_provider.sdss.spectrum import read_spectrum

        output_dir = Path(self.output_dir or astra_home() / "outputs" / "continuum")
        output_dir.mkdir(parents=True, exist_ok=True)
        mask, _ = resolve_continuum_pixels(apogee_wavelength(), self.model_path, self.continuum_pixels_path)
        pixels_id = continuum_pixel_set_id(mask)

        def read(path: str):
            spectrum = read_spectrum(path)
            if spectrum.n_pixels != mask.size:
                raise ValueError(f"{path}: {spectrum.n_pixels} pixels, expected {mask.size}")
            return spectrum

        inputs = self.read_inputs(read)
        if not inputs:
            return []
        spectra = [spectrum for _, _, spectrum in inputs]
        wavelength = spectra[0].wavelength
        # Computed in float64, returned rounded to float32 as the file stores them: half the memory written.
        flux_norm, ivar_norm, continuum = continuum_normalize(
            wavelength,
            np.concatenate([s.flux for s in spectra]),
            np.concatenate([s.ivar for s in spectra]),
            mask,
            deg=self.deg,
            length_scale=float(self.length_scale),
            on_failure="nan",
            dtype=np.float32,
        )
        failed = ~np.all(np.isfinite(continuum[:, mask]), axis=1)
        kept, rows, start = [], [], 0
        for task, data_product, spectrum in inputs:
            span = slice(start, start + spectrum.n_spectra)
            start = span.stop
            if failed[span].all():
                self.fail(task, f"{data_product.path}: too few usable continuum pixels to fit any row")
            else:
                kept.append((task, data_product, spectrum))
                rows.append(np.arange(span.start, span.stop))
        if not kept:
            return []
        take = np.concatenate(rows)
        if take.size != flux_norm.shape[0]:  # drop the rows of tasks that failed entirely
            flux_norm, ivar_norm, continuum, failed = (
                a[take] for a in (flux_norm, ivar_norm, continuum, failed)
            )
        path = output_dir / output_name(self, [task for task, *_ in kept])
        try:
            write_normalized(
                path,
                wavelength,
                flux_norm,
                ivar_norm,
                continuum,
                kept,
                failed,
                deg=self.deg,
                length_scale=float(self.length_scale),
                task_name=type(self).task_path(),
                continuum_pixels_id=pixels_id,
            )
        except OSError as error:
            for task, *_ in kept:
                self.fail(task, f"{path}: cannot write the normalised spectra ({error})")
            return []
        return self._record_outputs(path, kept, flux_norm, ivar_norm, failed, mask)

    def _record_outputs(self, path: Path, kept: list, flux_norm, ivar_norm, failed, mask) -> list[Any]:
        """One output data product and one ``astra.continuum`` row per spectrum row, for every task."""
        n_used, rms = _residual_rms(flux_norm, ivar_norm, mask)
        results, row = {}, 0
        for task, data_product, spectrum in kept:
            start = row
            self.add_output_data_product(
                task,
                path,
                filetype=OUTPUT_FILETYPE,
                kwargs={"path": str(path), "row_start": start, "row_stop": start + spectrum.n_spectra},
            )
            for index in range(spectrum.n_spectra):
                self.add_result(
                    task,
                    Continuum,
                    data_product=data_product,
                    row_index=index,
                    snr=float(spectrum.snr[index]),
                    n_continuum_pixels=int(n_used[row]),
                    rms_residual=float(rms[row]) if n_used[row] else None,
                    bitmask_flag=FLAG_FIT_FAILED if failed[row] else 0,
                )
                row += 1
            results[task.pk] = {
                "path": str(path),
                "row_start": start,
                "rows": spectrum.n_spectra,
                "failed_rows": int(failed[start:row].sum()),
            }
        return [results.get(task.pk) for task, _ in self.iterable()]


def _residual_rms(flux, ivar, mask) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the usable continuum pixels and the RMS of ``(flux - 1)·√ivar`` over them (float64)."""
    import numpy as np

    flux, ivar = flux[:, mask].astype(float), ivar[:, mask].astype(float)
    used = ivar > 0
    n_used = used.sum(axis=1)
    squares = np.where(used, (flux - 1.0) ** 2 * ivar, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n_used, np.sqrt(squares.sum(axis=1) / n_used)


def output_name(instance: TaskInstance, tasks: Sequence[Task]) -> str:
    """``astraContinuum-{version}-{digest}.fits``: the digest hashes the ``task_id`` and ``pk`` of ``tasks``.

    ``task_id`` changes with the parameters and inputs, ``pk`` with every new run (a forced re-run inserts
    new tasks), so no two runs that could differ share a file.
    """
    from astra_provider import __version__

    text = "\n".join(f"{task.pk} {task.task_id}" for task in sorted(tasks, key=lambda t: t.pk))
    digest = hashlib.sha256(f"{type(instance).task_path()}\n{__version__}\n{text}".encode()).hexdigest()
    return f"{OUTPUT_FILETYPE}-{__version__}-{digest[:20]}.fits"


def write_normalized(
    path: str | os.PathLike,
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum: np.ndarray,
    sources: Sequence[tuple[Task, DataProduct, Spectrum]],
    failed: np.ndarray,
    *,
    deg: int,
    length_scale: float,
    task_name: str,
    continuum_pixels_id: str | None = None,
) -> None:
    """Write a bundle's normalised spectra (layout in the module docstring), atomically.

    ``sources`` are the ``(task, input data product, input spectrum)`` whose rows fill ``flux``... in order.

    :raises OSError: the file cannot be written (nothing is left under ``path``).
    """
    import numpy as np

    from astra_provider import __version__
    from astra_provider.fits import ImageHDU, TableHDU, write_fits

    counts = [spectrum.n_spectra for *_, spectrum in sources]
    table = {
        "TASK_PK": np.repeat([task.pk for task, *_ in sources], counts).astype(np.int64),
        "TASK_ID": np.repeat([task.task_id for task, *_ in sources], counts),
        "SOURCE_PK": np.repeat([product.pk for _, product, _ in sources], counts).astype(np.int64),
        "SOURCE": np.repeat([str(product.path) for _, product, _ in sources], counts),
        "ROW_INDEX": np.concatenate([np.arange(n) for n in counts]).astype(np.int32),
        "SNR": np.concatenate([spectrum.snr for *_, spectrum in sources]).astype(np.float32),
        "FLAG": np.where(failed, FLAG_FIT_FAILED, 0).astype(np.int32),
    }
    cards = [
        ("V_ASTRA", __version__, "astra-provider version"),
        ("TASKNAME", task_name, "task class"),
        ("CONTDEG", int(deg), "sinusoid pairs per region"),
        ("CONTL", float(length_scale), "sinusoid period (Angstrom)"),
        *([("CONTPIX", continuum_pixels_id, "continuum-pixel set id")] if continuum_pixels_id else []),
        ("NTASKS", len(sources), "tasks in this file"),
        ("NROWS", int(sum(counts)), "spectrum rows in this file"),
    ]
    write_fits(
        path,
        [
            ImageHDU(None, cards),
            ImageHDU(np.asarray(wavelength, dtype=np.float64), name="WAVELENGTH"),
            ImageHDU(np.asarray(flux, dtype=np.float32), name="FLUX"),
            ImageHDU(np.asarray(ivar, dtype=np.float32), name="IVAR"),
            ImageHDU(np.asarray(continuum, dtype=np.float32), name="CONTINUUM"),
            TableHDU(table, name="ROWS"),
        ],
    )


def read_normalized(product: str | os.PathLike | DataProduct, rows: slice | None = None) -> Spectrum:
    """The normalised spectra of one task: a data product recorded by :class:`SinusoidalContinuum`, or a
    path and the ``rows`` to read (``None``: the whole file, which must then hold one task).

    Also reads the one-task-per-file layout of astra-provider 0.4. ``meta`` has ``path``, ``source``,
    ``continuum`` = ``(deg, length_scale)``, and per row ``snr``, plus ``row_index`` and ``task_pk``
    when the file has them; ``extras["continuum"]`` is the fitted continuum.

    :raises SpectrumReadError: the file is missing, corrupt, not a normalised-spectrum file, or holds several
        tasks and no rows were given.
    """
    path, product_rows = _rows_of(product)
    with NormalizedFile(path) as normalized:
        return normalized.spectrum(rows if rows is not None else product_rows)


def read_normalized_inputs(
    instance: TaskInstance, check: Callable[[str, Spectrum], None] | None = None, *, first_row: bool = False
) -> list[tuple[Task, DataProduct, Spectrum]]:
    """``(task, data_product, spectrum)`` for the first input of each task of ``instance`` still to run.

    The inputs are normalised spectra, as :func:`read_normalized` reads them but without the continuum;
    with ``first_row``, only the first row of each task's spectra (an apStar's pixel-weighted stack).
    Each file is read once for all the tasks whose rows it holds. A file that cannot be read fails the
    tasks that read it; ``check(path, spectrum)`` raising ``ValueError`` fails only its own task. Failures
    are recorded with :meth:`TaskInstance.fail`, and their messages name the file.
    """
    by_file: dict[str, list[tuple[Task, DataProduct, slice | None]]] = {}
    for task, data_products in instance.iterable():
        path, rows = _rows_of(data_products[0])
        if first_row and rows is not None and rows.stop > rows.start:
            rows = slice(rows.start, rows.start + 1)
        by_file.setdefault(path, []).append((task, data_products[0], rows))
    loaded = {}
    for path, wanted in by_file.items():
        try:
            normalized = NormalizedFile(path)
        except (ValueError, OSError) as error:
            for task, *_ in wanted:
                instance.fail(task, error)
            continue
        with normalized:
            _preload_rows(normalized, [rows for *_, rows in wanted if rows is not None])
            for task, product, rows in wanted:
                try:
                    spectrum = normalized.spectrum(rows, continuum=False)
                    if first_row and spectrum.n_spectra > 1:  # a one-task file read whole
                        spectrum = spectrum.select([0])
                    if check is not None:
                        check(path, spectrum)
                    loaded[task.pk] = (task, product, spectrum)
                except (ValueError, OSError) as error:
                    instance.fail(task, error)
    return [loaded[task.pk] for task, _ in instance.iterable() if task.pk in loaded]


def _preload_rows(normalized: NormalizedFile, spans: list[slice]) -> None:
    """Read the rows of all ``spans`` of a file at once; if that fails, each task reads (and fails) alone."""
    start = max(0, min((span.start for span in spans), default=0))
    stop = min(normalized.n_rows, max((span.stop for span in spans), default=0))
    if start < stop:
        with contextlib.suppress(ValueError, OSError):
            normalized.preload(slice(start, stop))


def find_normalized(output_dir: str | os.PathLike, source: str | os.PathLike) -> Spectrum | None:
    """The normalised spectra of input file ``source`` in the newest file of ``output_dir`` that has them.

    For looking around by hand (the database says exactly where each task's rows are: its output data
    product); ``None`` when no file there holds ``source``.
    """
    import numpy as np

    wanted = os.path.abspath(os.fspath(source))
    files = sorted(Path(output_dir).glob(f"{OUTPUT_FILETYPE}-*.fits"), key=lambda p: p.stat().st_mtime)
    for path in reversed(files):
        with NormalizedFile(str(path)) as normalized:
            hits = np.flatnonzero(normalized.table.get("SOURCE", np.array([])) == wanted)
            if hits.size:
                return normalized.spectrum(slice(int(hits[0]), int(hits[-1]) + 1))
    return None


def _rows_of(product: Any) -> tuple[str, slice | None]:
    """The path of a data product (or path), and its rows when it is an output of this module."""
    kwargs = getattr(product, "kwargs", None) or {}
    if getattr(product, "filetype", None) == OUTPUT_FILETYPE and "row_start" in kwargs:
        return product.path, slice(int(kwargs["row_start"]), int(kwargs["row_stop"]))
    return os.fspath(getattr(product, "path", product)), None


class NormalizedFile(Closing):
    """An open normalised-spectrum file; its header, wavelengths and ``ROWS`` table are read once.

    :raises SpectrumReadError: the file is missing, not FITS, or lacks an HDU of the layout.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from astra_provider.fits import FitsError, FitsFile
        from astra_provider.sdss.spectrum import SpectrumReadError

        self.path = os.fspath(path)
        self._preloaded: tuple[slice, np.ndarray, np.ndarray] | None = None
        if not os.path.isfile(self.path):
            raise SpectrumReadError(self.path, "file does not exist")
        try:
            self._handle = FitsFile(self.path)
        except (FitsError, OSError) as error:
            raise SpectrumReadError(self.path, f"cannot read normalised spectra ({error})") from None
        try:
            missing = [name for name in _HDUS if not self._has_hdu(name)]
            if missing:
                raise SpectrumReadError(
                    self.path, f"not a normalised-spectrum file: missing HDU(s) {missing}"
                )
            self.header = self._handle.header(0)
            self.n_rows = int(self._handle.header("ROWS").get("NAXIS2", 0))
            self.table = self._handle.read_table("ROWS")
            self.wavelength = self._handle.read_image("WAVELENGTH").astype(float)
        except FitsError as error:
            self.close()
            raise SpectrumReadError(self.path, f"cannot read normalised spectra ({error})") from None
        except BaseException:
            self.close()
            raise

    def _has_hdu(self, name: str) -> bool:
        try:
            self._handle.hdu(name)
        except IndexError:
            return False
        return True

    def close(self) -> None:
        self._handle.close()

    def preload(self, rows: slice) -> None:
        """Read ``FLUX`` and ``IVAR`` of ``rows`` once, as stored: :meth:`spectrum` then takes each task's
        rows from them instead of reading the file again."""
        self._preloaded = (rows, self._read_image("FLUX", rows), self._read_image("IVAR", rows))

    def _images(self, rows: slice, continuum: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``flux``, ``ivar`` (0 where the flux is not finite) in float64; ``{"continuum": ...}`` if asked."""
        import numpy as np

        span, flux, ivar = self._preloaded or (slice(0, 0), None, None)
        if flux is not None and ivar is not None and span.start <= rows.start and rows.stop <= span.stop:
            inside = slice(rows.start - span.start, rows.stop - span.start)
            flux, ivar = flux[inside], ivar[inside]
        else:
            flux, ivar = self._read_image("FLUX", rows), self._read_image("IVAR", rows)
        flux, ivar = flux.astype(float), ivar.astype(float)
        np.copyto(ivar, 0.0, where=~np.isfinite(flux))
        extras = {"continuum": self._read_image("CONTINUUM", rows).astype(float)} if continuum else {}
        return flux, ivar, extras

    def _read_image(self, name: str, rows: slice) -> np.ndarray:
        from astra_provider.fits import FitsError
        from astra_provider.sdss.spectrum import SpectrumReadError

        try:
            return self._handle.read_image(name, rows)
        except FitsError as error:
            raise SpectrumReadError(self.path, f"cannot read normalised spectra ({error})") from None

    def spectrum(self, rows: slice | None, continuum: bool = True) -> Spectrum:
        """The spectra of ``rows`` (all rows when ``None``: the file must then hold one task's)."""
        import numpy as np

        from astra_provider.sdss.spectrum import Spectrum, SpectrumReadError

        path, table = self.path, self.table
        if rows is None:
            task_pks = set(table["TASK_PK"].tolist()) if "TASK_PK" in table else set()
            if len(task_pks) > 1:
                raise SpectrumReadError(
                    path,
                    f"holds the spectra of {len(task_pks)} tasks: read one task's rows "
                    "(pass its output data product, or rows=)",
                )
            rows = slice(0, self.n_rows)
        if not 0 <= rows.start < rows.stop <= self.n_rows:
            raise SpectrumReadError(
                path, f"rows {rows.start}:{rows.stop} are not within the file's {self.n_rows} rows"
            )
        flux, ivar, extras = self._images(rows, continuum)
        sources = (
            sorted(set(table["SOURCE"][rows].tolist())) if "SOURCE" in table else [self.header.get("SOURCE")]
        )
        meta = {
            "path": path,
            "filetype": OUTPUT_FILETYPE,
            "source": sources[0] if len(sources) == 1 else sources,
            "continuum": (self.header.get("CONTDEG"), self.header.get("CONTL")),
            "continuum_pixels_id": self.header.get("CONTPIX"),
            "snr": np.asarray(table["SNR"][rows], dtype=float),
        }
        for column, key in (("ROW_INDEX", "row_index"), ("TASK_PK", "task_pk")):
            if column in table:
                meta[key] = np.asarray(table[column][rows])
        try:
            return Spectrum(wavelength=self.wavelength.copy(), flux=flux, ivar=ivar, meta=meta, extras=extras)
        except ValueError as error:
            raise SpectrumReadError(path, f"inconsistent normalised-spectrum file ({error})") from None
