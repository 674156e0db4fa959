"""Doppler radial velocities as a task, bundled on ``model_path``.

Each task reads one SDSS spectrum file: an APOGEE ``apVisit`` (three chips, the file's masks) or ``apStar``
(one measurement per visit row), or a BOSS ``spec-…``/``specFull`` coadd (optical, its own log grid,
``AND_MASK``, sky and ``WDISP``). ``model_path`` is a template grid: a Cannon model file (the imported
150,001-pixel vacuum grid, an instrument-ready model, or a model trained by ``TrainTheCannon``) or a
directory of them (``$ASTRA_HOME/templates`` after ``astra templates install``, with the cool-star and
hot-dwarf grids, between which every spectrum chooses). The grids are made ready for each instrument once
per process (:func:`astra_provider.templates.prepare.prepared_model`), and the spectra of a bundle are
measured together by :func:`astra_provider.science.doppler.measure_visit_radial_velocities`
(pseudo-continuum, FFT cross-correlation, then a joint Gauss–Newton fit of velocity, labels and a
multiplicative continuum with the model evaluated at the observed pixels).

Frames (one ``astra.doppler`` row per visit, ``vhelio = vrel + bc`` in every row):

* apVisit: the measured velocity is ``vrel`` (observed frame); ``bc`` is the header's ``BC``. In a file
  with its fibre's Gauss–Hermite LSF (HDU 10), each pixel's wavelength is moved by the offset of its LSF's
  centre (``extras["lsf_offset"]``: the asymmetric part of the LSF); the templates keep one Gaussian LSF of
  R = 22,500, as for files without HDU 10.
* apStar: each visit row was shifted to rest by the APOGEE pipeline with its ``VRAD``; the measured
  residual is added back: ``vrel = VRAD + v``, ``bc = BC``.
* BOSS: the wavelengths are already heliocentric, so the measured velocity is ``vhelio``. The header's
  ``HELIO_RV`` is the *negative* of the additive correction (the pipeline divides the wavelengths by
  ``1 + HELIO_RV/c``; for plate 3586/MJD 55181 astropy gives −29.6…−30.0 km/s at APO where the header has
  +29.49), so ``bc = −HELIO_RV`` and ``vrel = vhelio + HELIO_RV``.

A spectrum that is neither APOGEE nor BOSS, has no usable pixel, or lies mostly outside the grid's
wavelength range fails alone, with a message naming the file (and both wavelength ranges).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from astra_provider.base import Parameter, TaskInstance
from astra_provider.database.astradb import Doppler

_INSTRUMENTS = {"apVisit": "apogee", "apStar": "apogee", "specFull": "boss"}
_MIN_COVERAGE = 0.9  # fraction of a spectrum's usable pixels that must fall on the template grid


@dataclass
class _Visit:
    """One spectrum to measure: its arrays and how its velocity maps to the frames of the ``doppler`` row."""

    row_index: int
    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    lsf_sigma: np.ndarray | None
    bc: float  # vhelio = vrel + bc
    vrel_offset: float  # vrel = vrel_offset + measured velocity
    snr: float


@dataclass
class _Input:
    path: str
    instrument: str
    visits: list[_Visit]


class DopplerRadialVelocity(TaskInstance):
    """Radial velocity and template labels of APOGEE (apVisit, apStar) and BOSS spectra."""

    model_path = Parameter(
        type=str,
        bundled=True,
        description="A template grid (Cannon model file), or a directory of them: every grid in it is used.",
    )
    max_velocity = Parameter(
        default=1000.0, type=float, bundled=True, description="Largest |velocity| searched (km/s)."
    )

    def pre_execute(self) -> None:
        from astra_provider.templates.prepare import template_grids

        self.grids = template_grids(self.model_path)

    def execute(self):
        inputs = self.read_inputs(_read_input)
        outputs: dict[int, dict] = {}
        for instrument in ("apogee", "boss"):
            group = [item for item in inputs if item[2].instrument == instrument]
            if group:
                outputs.update(self._measure(instrument, group))
        return [outputs.get(task.pk) for task, _ in self.iterable()]

    def _measure(self, instrument: str, group: list) -> dict[int, dict]:
        """Measure the inputs of one instrument together; write their rows; return task pk → output."""
        from astra_provider.science.doppler import DopplerOptions, measure_visit_radial_velocities
        from astra_provider.templates.prepare import prepared_model

        models = [prepared_model(grid, instrument) for grid in self.grids]
        grid_wavelength = models[0].wavelength
        measured = []
        for task, data_product, item in group:
            try:
                _check_input(item, grid_wavelength, self.grids[0].name)
            except ValueError as error:
                self.fail(task, error)
                continue
            measured.append((task, data_product, item))
        visits = [visit for _, _, item in measured for visit in item.visits]
        if not visits:
            return {}
        options = (DopplerOptions.boss if instrument == "boss" else DopplerOptions)(label_margin=0.0)
        result = measure_visit_radial_velocities(
            [visit.wavelength for visit in visits],
            [visit.flux for visit in visits],
            [visit.ivar for visit in visits],
            models,
            max_velocity=float(self.max_velocity),
            lsf_sigma=[visit.lsf_sigma for visit in visits] if instrument == "boss" else None,
            options=options,
        )
        return self._write(measured, result)

    def _write(self, measured: list, result) -> dict[int, dict]:
        from astra_provider.science.doppler import RVFlag

        outputs: dict[int, dict] = {}
        index = 0
        for task, data_product, item in measured:
            rows = []
            for visit in item.visits:
                rows.append(_row(visit, result, index, [grid.name for grid in self.grids]))
                index += 1
            if all(row["bitmask_flag"] & RVFlag.NO_USABLE_PIXELS for row in rows):
                self.fail(task, ValueError(f"{item.path}: no usable pixels (after masks and continuum)"))
                continue
            for row in rows:
                self.add_result(task, Doppler, data_product=data_product, **row)
            keys = ("vhelio", "u_vrel", "bitmask_flag")
            values = {key: [row[key] for row in rows] for key in keys}
            output = {key: value if len(rows) > 1 else value[0] for key, value in values.items()}
            output["flag"] = output.pop("bitmask_flag")
            outputs[task.pk] = output
        return outputs


def _row(visit: _Visit, result, index: int, grid_names: list[str]) -> dict:
    """The ``astra.doppler`` columns of one measured visit (NaN stored as NULL)."""
    measured = result.vrel[index]
    vrel = visit.vrel_offset + measured
    grid = int(result.grid_index[index])
    row = {
        "row_index": visit.row_index,
        "vrel": vrel,
        "u_vrel": result.u_vrel[index],
        "bc": visit.bc,
        "vhelio": vrel + visit.bc,
        "chisq": result.chisq[index],
        "ccf_peak": result.ccf_peak[index],
        "model_mismatch": result.model_mismatch[index],
        "snr": visit.snr,
    }
    for name in ("teff", "logg", "fe_h"):
        row[name] = getattr(result, name)[index]
        row[f"u_{name}"] = getattr(result, f"u_{name}")[index]
    row = {key: float(value) if np.isfinite(value) else None for key, value in row.items()}
    row["row_index"] = visit.row_index
    row["template_grid"] = grid_names[grid] if grid >= 0 else None
    row["bitmask_flag"] = int(result.flag[index])
    return row


def _read_input(path: str) -> _Input:
    """The visits of an SDSS spectrum file, ready to measure.

    :raises ValueError: if the file is not an APOGEE or BOSS spectrum, or lacks what its frame needs.
    """
    from astra_provider.sdss.spectrum import infer_filetype, read_spectrum

    filetype = infer_filetype(path)
    if filetype is None or _INSTRUMENTS.get(filetype) is None:
        raise ValueError(
            f"{path}: neither an APOGEE (apVisit, apStar) nor a BOSS (spec, specFull) spectrum "
            f"(file type {filetype or 'unknown'}); DopplerRadialVelocity measures only those"
        )
    spectrum = read_spectrum(path, filetype)
    filetype = spectrum.filetype or filetype
    instrument = _INSTRUMENTS[filetype]
    readers = {"apVisit": _apvisit_visits, "apStar": _apstar_visits, "specFull": _boss_visits}
    return _Input(str(path), instrument, readers[filetype](spectrum))


def _apvisit_visits(spectrum) -> list[_Visit]:
    from astra_provider.science.doppler.spectra import apogee_rv_ivar

    bc = float(spectrum.meta.get("bc", np.nan))
    if not np.isfinite(bc):
        raise ValueError(f"{spectrum.path}: no barycentric correction (BC) in the header")
    ivar = apogee_rv_ivar(spectrum.ivar, spectrum.pixel_flags)[0]
    wavelength = spectrum.wavelength
    if "lsf_offset" in spectrum.extras:
        # The model of a pixel is the symmetric-LSF model at the wavelength of its LSF's centre.
        wavelength = wavelength * np.exp(-spectrum.extras["lsf_offset"][0])
    return [_Visit(0, wavelength, spectrum.flux[0], ivar, None, bc, 0.0, float(spectrum.snr[0]))]


def _apstar_visits(spectrum) -> list[_Visit]:
    """Visit rows (or the single row of a one-visit file): at rest after the pipeline's shift by VRAD."""
    from astra_provider.science.doppler.spectra import apogee_rv_ivar

    meta = spectrum.meta
    kind = np.asarray(meta.get("row_kind", []))
    rows = np.flatnonzero(kind == "visit") if np.any(kind == "visit") else np.arange(spectrum.n_spectra)
    ivar = apogee_rv_ivar(spectrum.ivar, spectrum.pixel_flags)
    visits = []
    for row in rows:
        bc, vrad = float(np.asarray(meta["bc"])[row]), float(np.asarray(meta["vrad"])[row])
        if not (np.isfinite(bc) and np.isfinite(vrad)):
            raise ValueError(f"{spectrum.path}: row {row} has no BC/VRAD{row} to undo its shift to rest")
        snr = float(spectrum.snr[row])
        visits.append(
            _Visit(int(row), spectrum.wavelength, spectrum.flux[row], ivar[row], None, bc, vrad, snr)
        )
    return visits


def _boss_visits(spectrum) -> list[_Visit]:
    from astra_provider.science.doppler.spectra import boss_lsf_sigma, boss_rv_ivar

    helio_rv = float(spectrum.meta.get("helio_rv", np.nan))
    if not np.isfinite(helio_rv):
        raise ValueError(f"{spectrum.path}: no HELIO_RV in the header (the frame of its wavelengths)")
    if "wdisp" not in spectrum.extras:
        raise ValueError(f"{spectrum.path}: no WDISP column (the line-spread function)")
    ivar = boss_rv_ivar(spectrum.ivar, spectrum.pixel_flags, spectrum.extras.get("sky"))[0]
    lsf_sigma = boss_lsf_sigma(spectrum.extras["wdisp"])[0]
    # Heliocentric wavelengths: the measured velocity is vhelio; bc = −HELIO_RV (module docstring).
    bc = -helio_rv
    visit = _Visit(0, spectrum.wavelength, spectrum.flux[0], ivar, lsf_sigma, bc, -bc, float(spectrum.snr[0]))
    return [visit]


def _check_input(item: _Input, grid_wavelength: np.ndarray, grid_name: str) -> None:
    """:raises ValueError: if a visit has no usable pixel or lies mostly outside the grid's range."""
    low, high = float(grid_wavelength[0]), float(grid_wavelength[-1])
    for visit in item.visits:
        usable = (visit.ivar > 0) & np.isfinite(visit.flux)
        if not np.any(usable):
            raise ValueError(
                f"{item.path}: row {visit.row_index} has no usable pixel (ivar > 0, finite flux)"
            )
        wavelength = visit.wavelength[usable]
        inside = np.mean((wavelength >= low) & (wavelength <= high))
        if inside < _MIN_COVERAGE:
            raise ValueError(
                f"{item.path}: the spectrum covers {wavelength[0]:.0f}–{wavelength[-1]:.0f} Å but the "
                f"template grid {grid_name!r} prepared for {item.instrument.upper()} covers "
                f"{low:.0f}–{high:.0f} Å ({inside:.0%} of the usable pixels inside)"
            )
