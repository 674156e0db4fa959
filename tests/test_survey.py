"""The synthetic survey generator: reproducibility, SDSS layout, truth vs headers and spectra, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astra_provider.sdss.paths import iter_products, kwargs_hash, parse_path, split_data_root
from astra_provider.sdss.spectrum import read_spectrum
from astra_provider.synthetic.model import TruthModel, apogee_wavelength, draw_continuum
from astra_provider.synthetic.survey import (
    TRUTH_COLUMNS,
    SurveyTruth,
    approximate_barycentric_correction,
    generate_survey,
    healpix_ring,
    main,
)

SMALL = {"n_stars": 5, "visits_per_star": (1, 3), "snr": (40.0, 120.0), "boss_visits_per_star": 2}


@pytest.fixture(scope="module")
def model() -> TruthModel:
    return TruthModel.default(seed=0)


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory, model: TruthModel) -> SurveyTruth:
    return generate_survey(tmp_path_factory.mktemp("survey"), seed=11, **SMALL)


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_counts_and_truth_file(survey: SurveyTruth):
    counts = survey.counts()
    n_visits = sum(r["n_visits"] for r in survey.of_filetype("apStar"))
    assert counts["apStar"] == 5 and counts["apVisit"] == n_visits
    assert counts["specFull"] == sum(min(2, r["n_visits"]) for r in survey.of_filetype("apStar"))
    assert {r["n_visits"] for r in survey.of_filetype("apStar")} <= {1, 2, 3}
    assert survey.truth_path == survey.root / "truth.csv"
    again = SurveyTruth.read(survey.truth_path)
    assert len(again) == len(survey)
    for a, b in zip(again.rows, survey.rows):
        assert a.keys() == b.keys() == TRUTH_COLUMNS.keys()
        for key in a:
            assert a[key] == b[key] or (isinstance(a[key], float) and np.isnan(a[key]) and np.isnan(b[key]))
    assert again.parameters == survey.parameters
    assert survey.parameters["seed"] == 11 and survey.parameters["model_seed"] == 0
    table = survey.to_table()
    assert len(table) == len(survey) and set(table.colnames) == set(TRUTH_COLUMNS)


def test_reproducible_with_a_seed(survey: SurveyTruth, tmp_path: Path, model: TruthModel):
    again = generate_survey(tmp_path / "a", seed=11, **SMALL)
    assert _digests(again.root) == _digests(survey.root)
    other = generate_survey(tmp_path / "b", seed=12, **SMALL)
    assert _digests(other.root) != _digests(survey.root)


def test_file_types_draw_independent_streams(survey: SurveyTruth, tmp_path: Path, model: TruthModel):
    only = generate_survey(tmp_path / "apstar-only", seed=11, filetypes=["apStar"], **SMALL)
    assert set(only.counts()) == {"apStar"}
    full = _digests(survey.root)
    for path, digest in _digests(only.root).items():
        if path not in ("truth.csv", "survey.json"):
            assert full[path] == digest


def test_files_land_in_the_sdss_layout(survey: SurveyTruth):
    for row in survey.rows:
        path = survey.root / row["path"]
        assert path.is_file()
        filetype, kwargs = parse_path(path, strict=True)
        assert filetype == row["filetype"]
        assert kwargs == json.loads(row["kwargs"])
        assert kwargs_hash(filetype, kwargs) == row["kwargs_hash"]
        assert split_data_root(path)[0] == survey.root
        subtree = {"apStar": "apogee", "apVisit": "apogee", "specFull": "boss"}[filetype]
        assert row["path"].startswith(f"{subtree}/")
    for filetype in ("apStar", "apVisit", "specFull"):
        found = {p for p, _ in iter_products(filetype, survey.root)}
        assert found == set(survey.paths(filetype))
    assert len({r["kwargs_hash"] for r in survey.rows}) == len(survey)


def test_every_file_is_valid_fits(survey: SurveyTruth):
    for path in survey.paths():
        with fits.open(path) as hdul:
            hdul.verify("exception")
            assert len(hdul) >= (5 if "apVisit" in path.name else 3)


def test_truth_matches_headers(survey: SurveyTruth):
    for row in survey.rows:
        with fits.open(survey.root / row["path"]) as hdul:
            h = hdul[0].header
            assert h["RA"] == pytest.approx(row["ra"]) and h["DEC"] == pytest.approx(row["dec"])
            if row["filetype"] == "apStar":
                assert h["NVISITS"] == row["n_visits"] and h["OBJID"] == row["obj"]
                assert h["CATID"] == row["catalogid"] and h["HEALPIX"] == row["healpix"]
                assert h["SDSS_ID"] == row["sdss_id"] and h["FIELD"] == row["field"]
                assert h["SNR"] == pytest.approx(row["snr"])
                visit_snr = [h[f"SNRVIS{i}"] for i in range(1, row["n_visits"] + 1)]
                assert row["snr"] == pytest.approx(np.sqrt(np.sum(np.square(visit_snr))))
                assert hdul[1].data.shape == ((1 if row["n_visits"] == 1 else row["n_visits"] + 2), 8575)
                assert (hdul[1].header["CRVAL1"], hdul[1].header["CDELT1"]) == (4.179, 6e-6)
            elif row["filetype"] == "apVisit":
                assert h["BC"] == pytest.approx(row["bc_kms"]) and h["MJD5"] == row["mjd"]
                assert h["FIBERID"] == row["fiber"] and h["PLATE"] == str(row["plate"])
                assert h["SNR"] == pytest.approx(row["snr"]) and h["OBJID"] == row["obj"]
                assert h["TELESCOP"] == row["telescope"] and h["CATID"] == row["catalogid"]
                assert h["SDSS_ID"] == row["sdss_id"] and h["FIELD"] == row["field"]
                assert h["JD-MID"] == pytest.approx(row["jd_mid"])
                assert row["rv_applied_kms"] == pytest.approx(row["vhelio_kms"] - row["bc_kms"])
                wave = hdul[4].data
                assert wave.shape == (3, 4096) and np.all(np.diff(wave, axis=1) < 0)
                assert wave[0, 0] > wave[1, 0] > wave[2, 0]  # chips red→blue
            else:
                assert h["HELIO_RV"] == pytest.approx(row["bc_kms"]) and h["MJD"] == row["mjd"]
                summary = hdul[2].data[0]
                assert summary["CATALOGID"] == row["catalogid"] and summary["ZWARNING"] == 0
                assert h["SDSS_ID"] == summary["SDSS_ID"] == row["sdss_id"]
                assert (h["PLUG_RA"], h["PLUG_DEC"]) == pytest.approx((row["ra"], row["dec"]))
                assert abs(summary["XCSAO_RV"] - row["vhelio_kms"]) < 6 * summary["XCSAO_ERV"]
                assert row["rv_applied_kms"] == row["vhelio_kms"]


def test_stars_share_truth_across_files(survey: SurveyTruth):
    by_star: dict[int, list[dict]] = {}
    for row in survey.rows:
        by_star.setdefault(row["star_index"], []).append(row)
    assert len(by_star) == 5
    for rows in by_star.values():
        for key in ("teff", "logg", "fe_h", "obj", "catalogid", "sdss_id", "continuum_seed"):
            assert len({r[key] for r in rows}) == 1


def _model_flux(model: TruthModel, row: dict, wavelength: np.ndarray) -> np.ndarray:
    labels = np.array([[row["teff"], row["logg"], row["fe_h"]]])
    continuum = draw_continuum(1, wavelength, np.random.default_rng(row["continuum_seed"]))[0]
    return continuum * model.normalized_flux(labels, row["rv_applied_kms"], wavelength=wavelength)[0]


def _scatter_at(model: TruthModel, wavelength: np.ndarray, rv_kms: float) -> np.ndarray:
    """RMS of the star's scatter field at observed ``wavelength``.

    The field is white noise of rms s_p on the apStar grid, interpolated linearly to the visit pixels, so its
    variance there is s_p² · ((1 − w)² + w²) with w the fractional apStar-pixel position.
    """
    rest = wavelength / (1.0 + rv_kms / 299792.458)
    u = (np.log10(rest) - 4.179) / 6e-6
    w = u - np.floor(u)
    s_p = np.interp(u, np.arange(apogee_wavelength().size), model.intrinsic_scatter())
    return s_p * np.sqrt((1 - w) ** 2 + w**2)


def test_apvisit_flux_follows_the_truth(survey: SurveyTruth, model: TruthModel):
    """flux = throughput × continuum × (F(λ; labels, vhelio − bc) + scatter) + noise, σ = continuum / SNR."""
    for row in survey.of_filetype("apVisit"):
        s = read_spectrum(survey.root / row["path"])
        continuum = (
            row["throughput"]
            * draw_continuum(1, s.wavelength, np.random.default_rng(row["continuum_seed"]))[0]
        )
        good = s.ivar[0] > 0
        np.testing.assert_allclose(s.ivar[0][good] ** -0.5, (continuum / row["snr"])[good], rtol=1e-6)
        expected = row["throughput"] * _model_flux(model, row, s.wavelength)
        variance = (
            1.0 / s.ivar[0][good]
            + (continuum * _scatter_at(model, s.wavelength, row["rv_applied_kms"]))[good] ** 2
        )
        z = (s.flux[0] - expected)[good] / np.sqrt(variance)
        assert abs(z.mean()) < 0.05 and 0.95 < z.std() < 1.05


def test_apvisit_rv_is_recoverable(survey: SurveyTruth, model: TruthModel):
    """A coarse χ² scan over velocity finds vhelio − bc (the spectra really are shifted)."""
    row = max(survey.of_filetype("apVisit"), key=lambda r: r["snr"])
    s = read_spectrum(survey.root / row["path"])
    labels = np.array([[row["teff"], row["logg"], row["fe_h"]]])
    continuum = (
        row["throughput"] * draw_continuum(1, s.wavelength, np.random.default_rng(row["continuum_seed"]))[0]
    )
    trial = row["rv_applied_kms"] + np.linspace(-6, 6, 13)
    model_flux = continuum * model.normalized_flux(
        np.repeat(labels, trial.size, 0), trial, wavelength=s.wavelength
    )
    chi2 = (((s.flux - model_flux) ** 2) * s.ivar).sum(axis=1)
    assert trial[np.argmin(chi2)] == pytest.approx(row["rv_applied_kms"], abs=1.0)


def test_apstar_rows_are_rest_frame_and_stacked(survey: SurveyTruth, model: TruthModel):
    """Every row is continuum × (F at rest + the star's scatter field) + noise; stacks have higher S/N."""
    row = max(survey.of_filetype("apStar"), key=lambda r: r["n_visits"])
    assert row["n_visits"] >= 2
    s = read_spectrum(survey.root / row["path"])
    assert list(s.meta["row_kind"][:2]) == ["pixel_weighted_stack", "global_weighted_stack"]
    expected = _model_flux(model, row, s.wavelength)  # rv_applied = 0: rest frame
    scatter = model.intrinsic_scatter()
    for k in range(s.n_spectra):
        good = s.ivar[k] > 0
        ratio = np.median(s.flux[k][good] / expected[good])  # the row's throughput
        continuum = expected / model.normalized_flux(np.array([[row["teff"], row["logg"], row["fe_h"]]]))[0]
        variance = 1.0 / s.ivar[k][good] + (ratio * continuum * scatter)[good] ** 2
        z = (s.flux[k] - ratio * expected)[good] / np.sqrt(variance)
        assert abs(z.mean()) < 0.05 and 0.93 < z.std() < 1.07, k
        assert 0.6 < ratio < 1.6
    snr = np.median(s.flux * np.sqrt(s.ivar), axis=1)
    assert snr[0] > snr[2:].max() and snr[1] > snr[2:].max()


def test_interpolated_visits_match_exact_evaluation(tmp_path: Path, model: TruthModel):
    kwargs = {"n_stars": 2, "visits_per_star": 1, "filetypes": ["apVisit"], "seed": 5}
    fast = generate_survey(tmp_path / "fast", **kwargs)
    exact = generate_survey(tmp_path / "exact", exact_visits=True, **kwargs)
    for a, b in zip(fast.paths(), exact.paths()):
        fa, fb = read_spectrum(a), read_spectrum(b)
        np.testing.assert_array_equal(fa.wavelength, fb.wavelength)
        sigma = np.sqrt(1.0 / fb.ivar[0][fb.ivar[0] > 0])
        diff = np.abs(fa.flux[0] - fb.flux[0])[fb.ivar[0] > 0] / (sigma * fb.meta["snr"][0])
        assert diff.max() < 3e-4  # normalised-flux units (σ·SNR is the continuum)


def test_overwrite_guard_and_arguments(tmp_path: Path, model: TruthModel):
    generate_survey(tmp_path, n_stars=1, visits_per_star=1, filetypes=["specFull"])
    with pytest.raises(FileExistsError, match="truth.csv"):
        generate_survey(tmp_path, n_stars=1, filetypes=["specFull"])
    stale = SurveyTruth.read(tmp_path / "truth.csv").paths()
    generate_survey(tmp_path, n_stars=1, filetypes=["specFull"], seed=1, overwrite=True)
    assert not any(path.exists() for path in stale)  # the previous survey's files are gone
    with pytest.raises(ValueError, match="cannot synthesise"):
        generate_survey(tmp_path / "x", filetypes=["mwmStar"])
    with pytest.raises(ValueError, match="visits_per_star"):
        generate_survey(tmp_path / "y", visits_per_star=0)
    with pytest.raises(ValueError, match="snr"):
        generate_survey(tmp_path / "z", snr=-1.0)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main([str(tmp_path), "--n-stars", "2", "--visits-per-star", "1", "--filetypes", "specFull"]) == 0
    assert "wrote 2 specFull" in capsys.readouterr().out
    assert main([str(tmp_path), "--n-stars", "2", "--filetypes", "specFull", "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
    result = subprocess.run(
        [sys.executable, "-m", "astra_provider.synthetic.survey", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "synthetic-survey" in result.stdout and "--n-stars" in result.stdout


def test_healpix_ring():
    assert list(healpix_ring(1, np.array([0.0, 90.0, 0.0, 0.0]), np.array([0.0, 0.0, 90.0, -90.0]))) == [
        4,
        5,
        0,
        8,
    ]
    rng = np.random.default_rng(0)
    ra = rng.uniform(0, 360, 96_000)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, ra.size)))
    pixels = healpix_ring(4, ra, dec)
    counts = np.bincount(pixels)
    assert pixels.min() == 0 and pixels.max() == 191 and counts.min() > 0.8 * 500 and counts.max() < 1.2 * 500
    # RING order: indices grow from north to south along a meridian
    along = healpix_ring(128, np.full(50, 10.0), np.linspace(89, -89, 50))
    assert np.all(np.diff(along) > 0) and along.max() < 12 * 128**2


def test_barycentric_correction_is_annual_and_bounded():
    jd = 2459300.5 + np.linspace(0, 365.25, 50)
    bc = approximate_barycentric_correction(np.full(50, 100.0), np.full(50, 10.0), jd)
    assert np.abs(bc).max() < 30.5 and bc.max() - bc.min() > 40
    pole = approximate_barycentric_correction(np.array([270.0]), np.array([66.56]), np.array([2459300.5]))
    assert abs(pole[0]) < 0.5  # ecliptic pole: Earth's velocity is perpendicular to the line of sight
