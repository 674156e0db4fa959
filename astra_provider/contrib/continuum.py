"""Sinusoidal pseudo-continuum normalisation as a task.

Each task reads one apStar file, normalises every row (stacks and visits) with
:func:`astra_provider.science.continuum.continuum_normalize` (batched over the whole bundle; float32 results,
as written), writes the normalised spectra to a FITS file (an *output data product*, read back by
:func:`read_normalized`), and records one ``astra.continuum`` row per spectrum row.

The continuum pixels are those of ``continuum_pixels_path`` (a pixel file), else of the Cannon model at
``model_path`` (the pixels its training spectra were normalised with), else the shipped synthetic-quadratic
list; their set id is recorded as ``CONTPIX``, which ``TestTheCannon`` checks against its model.

Output file (``{output_dir}/astraContinuum-{input file stem}.fits``): HDU 0 header with the source path and
the fit settings; image HDUs ``WAVELENGTH`` (P,), ``FLUX`` (n, P) normalised flux, ``IVAR`` (n, P)
normalised inverse variance, ``CONTINUUM`` (n, P) the fitted continuum in the input flux units, and a
``SNR`` table column per row.
"""

from __future__ import annotations

import os
from pathlib import Path

from astra_provider.base import Parameter, TaskInstance
from astra_provider.database import astra_home
from astra_provider.database.astradb import Continuum

#: ``astra.continuum.bitmask_flag`` bits.
FLAG_FIT_FAILED = 1  # too few usable continuum pixels in a region: the row is not normalised


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
        description="A Cannon model: normalise with its continuum pixels.",
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

        from astra_provider.science.cannon.continuum_pixels import resolve_continuum_pixels
        from astra_provider.science.continuum import continuum_normalize
        from astra_provider.science.continuum_pixels import continuum_pixel_set_id
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
        flux = np.concatenate([s.flux for s in spectra])
        ivar = np.concatenate([s.ivar for s in spectra])
        # Computed in float64, returned rounded to float32 as the file stores them: half the memory written.
        flux_norm, ivar_norm, continuum = continuum_normalize(
            wavelength,
            flux,
            ivar,
            mask,
            deg=self.deg,
            length_scale=float(self.length_scale),
            on_failure="nan",
            dtype=np.float32,
        )

        results, start = {}, 0
        for task, data_product, spectrum in inputs:
            rows = slice(start, start + spectrum.n_spectra)
            start += spectrum.n_spectra
            failed = ~np.all(np.isfinite(continuum[rows][:, mask]), axis=1)
            if failed.all():
                self.fail(task, f"{data_product.path}: too few usable continuum pixels to fit any row")
                continue
            path = output_dir / f"astraContinuum-{Path(data_product.path).stem}.fits"
            write_normalized(
                path,
                wavelength,
                flux_norm[rows],
                ivar_norm[rows],
                continuum[rows],
                spectrum.snr,
                source=data_product.path,
                deg=self.deg,
                length_scale=float(self.length_scale),
                continuum_pixels_id=pixels_id,
            )
            self.add_output_data_product(task, path)
            for row in range(spectrum.n_spectra):
                used = mask & (ivar_norm[rows][row] > 0)
                flux_used = flux_norm[rows][row][used].astype(float)
                residual = (flux_used - 1.0) * np.sqrt(ivar_norm[rows][row][used].astype(float))
                self.add_result(
                    task,
                    Continuum,
                    data_product=data_product,
                    row_index=row,
                    snr=float(spectrum.snr[row]),
                    n_continuum_pixels=int(used.sum()),
                    rms_residual=float(np.sqrt(np.mean(residual**2))) if used.any() else None,
                    bitmask_flag=FLAG_FIT_FAILED if failed[row] else 0,
                )
            results[task.pk] = {
                "path": str(path),
                "rows": spectrum.n_spectra,
                "failed_rows": int(failed.sum()),
            }
        return [results.get(task.pk) for task, _ in self.iterable()]


def write_normalized(
    path: str | os.PathLike,
    wavelength,
    flux,
    ivar,
    continuum,
    snr,
    *,
    source: str,
    deg: int,
    length_scale: float,
    continuum_pixels_id: str | None = None,
) -> None:
    """Write normalised spectra (see the module docstring for the layout)."""
    import numpy as np
    from astropy.io import fits

    from astra_provider import __version__

    header = fits.Header()
    header["SOURCE"] = os.fspath(source)  # the input spectrum file (long paths use CONTINUE cards)
    header["CONTDEG"] = (deg, "sinusoid pairs per region")
    header["CONTL"] = (length_scale, "sinusoid period (Angstrom)")
    if continuum_pixels_id is not None:
        header["CONTPIX"] = (continuum_pixels_id, "continuum-pixel set id")
    header["V_ASTRA"] = (__version__, "astra-provider version")
    hdus = [
        fits.PrimaryHDU(header=header),
        fits.ImageHDU(np.asarray(wavelength, dtype=np.float64), name="WAVELENGTH"),
        fits.ImageHDU(np.asarray(flux, dtype=np.float32), name="FLUX"),
        fits.ImageHDU(np.asarray(ivar, dtype=np.float32), name="IVAR"),
        fits.ImageHDU(np.asarray(continuum, dtype=np.float32), name="CONTINUUM"),
        fits.BinTableHDU.from_columns(
            [fits.Column(name="SNR", format="E", array=np.asarray(snr))], name="ROWS"
        ),
    ]
    fits.HDUList(hdus).writeto(path, overwrite=True)


def read_normalized(path: str | os.PathLike):
    """Read a file written by :func:`write_normalized` into a ``Spectrum``."""
    import numpy as np
    from astropy.io import fits

    from astra_provider.sdss.spectrum import Spectrum, SpectrumReadError

    try:
        with fits.open(path, memmap=False) as hdul:
            names = {hdu.name for hdu in hdul}
            missing = {"WAVELENGTH", "FLUX", "IVAR", "CONTINUUM", "ROWS"} - names
            if missing:
                raise SpectrumReadError(
                    path, f"not a normalised-spectrum file: missing HDU(s) {sorted(missing)}"
                )
            flux = np.asarray(hdul["FLUX"].data, dtype=float)
            ivar = np.asarray(hdul["IVAR"].data, dtype=float)
            return Spectrum(
                wavelength=np.asarray(hdul["WAVELENGTH"].data, dtype=float),
                flux=flux,
                ivar=np.where(np.isfinite(flux), ivar, 0.0),
                meta={
                    "path": os.fspath(path),
                    "filetype": "astraContinuum",
                    "source": hdul[0].header.get("SOURCE"),
                    "continuum": (hdul[0].header.get("CONTDEG"), hdul[0].header.get("CONTL")),
                    "continuum_pixels_id": hdul[0].header.get("CONTPIX"),
                    "snr": np.asarray(hdul["ROWS"].data["SNR"], dtype=float),
                },
                extras={"continuum": np.asarray(hdul["CONTINUUM"].data, dtype=float)},
            )
    except SpectrumReadError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SpectrumReadError(path, f"cannot read normalised spectra ({error})") from None
