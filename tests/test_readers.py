"""Readers for apStar, apVisit and BOSS specFull: shapes, ordering, ivar rules and every error case.

Small files are built here with astropy (independently of the survey's own FITS writer); a tiny
synthetic survey checks the readers on generated files as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astra_provider.sdss.bitmasks import APOGEE_BAD_PIXEL_MASK, decode_bits
from astra_provider.sdss.paths import sdss_path
from astra_provider.sdss.spectrum import (
    Spectrum,
    SpectrumReadError,
    read_apstar,
    read_apvisit,
    read_specfull,
    read_spectrum,
    sigma_to_ivar,
)
from astra_provider.synthetic.model import apogee_wavelength
from astra_provider.synthetic.survey import generate_survey

N_APSTAR = 8575


# ----------------------------------------------------------------------------------------------------------
# Hand-built files
# ----------------------------------------------------------------------------------------------------------


def write_apstar(path: Path, nvisits: int = 3, n_rows: int | None = None, **overrides) -> dict:
    rng = np.random.default_rng(1)
    rows = (1 if nvisits == 1 else nvisits + 2) if n_rows is None else n_rows
    flux = rng.uniform(100, 200, (rows, N_APSTAR)).astype(np.float32)
    sigma = np.full((rows, N_APSTAR), 2.0, np.float32)
    mask = np.zeros((rows, N_APSTAR), np.int16)
    sigma[0, 10] = 0.0  # non-positive sigma
    sigma[0, 11] = np.nan  # non-finite sigma
    sigma[0, 12] = 1e10  # APOGEE "bad error"
    mask[0, 20] = 1 << 2  # SATPIX: bad
    mask[0, 21] = 1 << 14  # NOT_ENOUGH_PSF: bad
    mask[0, 22] = 1 << 12  # SIG_SKYLINE: harmless
    flux[0, 30] = np.nan
    data = {"flux": flux, "sigma": sigma, "mask": mask, **overrides}
    header = fits.Header()
    header["NVISITS"] = nvisits
    header["SNR"] = 80.0
    for i in range(1, nvisits + 1):
        header[f"SNRVIS{i}"] = 40.0 + i
        header[f"BC{i}"] = -10.0 + i
    header["OBJID"] = "2M00000001+0000001"
    header["CATID"] = 1234
    header["RA"], header["DEC"] = 10.5, -20.25
    wcs = fits.Header()
    wcs["CRVAL1"], wcs["CDELT1"], wcs["CRPIX1"] = 4.179, 6e-6, 1
    hdus = [fits.PrimaryHDU(header=header), fits.ImageHDU(data["flux"], header=wcs)]
    hdus += [fits.ImageHDU(data["sigma"]), fits.ImageHDU(data["mask"])]
    fits.HDUList(hdus[: overrides.get("n_hdus", 4)]).writeto(path, overwrite=True)
    return data


def write_apvisit(path: Path, n_hdus: int = 12, **overrides) -> dict:
    chips = ((16955.0, 16473.0), (16435.0, 15857.0), (15810.0, 15143.0))  # red→blue, descending
    wave = np.array([np.linspace(a, b, 4096) for a, b in chips])
    flux = wave.astype(np.float32)  # flux == wavelength makes the ordering check trivial
    sigma = np.full(wave.shape, 5.0, np.float32)
    mask = np.zeros(wave.shape, np.int16)
    mask[0, 0] = 1  # BADPIX on the reddest pixel
    data = {"flux": flux, "sigma": sigma, "mask": mask, "wave": wave, **overrides}
    header = fits.Header()
    for key, value in {
        "TELESCOP": "apo25m",
        "PLATE": "15001",
        "MJD5": 59300,
        "FIBERID": 7,
        "BC": -12.5,
        "SNR": 55.0,
        "OBJID": "2M1",
        "RA": 1.0,
        "DEC": 2.0,
        "JD-MID": 2459300.7,
    }.items():
        header[key] = value
    hdus = [fits.PrimaryHDU(header=header)] + [
        fits.ImageHDU(data[k]) for k in ("flux", "sigma", "mask", "wave")
    ]
    hdus += [fits.ImageHDU(np.zeros((3, 1), np.float32)) for _ in range(7)]
    fits.HDUList(hdus[:n_hdus]).writeto(path, overwrite=True)
    return data


def write_specfull(
    path: Path, lower_case: bool = False, drop: tuple[str, ...] = (), helio_rv=5.5, **overrides
):
    n = 200
    loglam = (3.5523 + 1e-4 * np.arange(n)).astype(np.float32)
    columns = {
        "FLUX": np.linspace(10, 20, n).astype(np.float32),
        "LOGLAM": loglam,
        "IVAR": np.full(n, 4.0, np.float32),
        "AND_MASK": np.zeros(n, np.int32),
        "OR_MASK": np.zeros(n, np.int32),
        "WDISP": np.ones(n, np.float32),
        "SKY": np.ones(n, np.float32),
        "MODEL": np.ones(n, np.float32),
        "WRESL": np.ones(n, np.float32),
    }
    columns.update(overrides)
    formats = {np.dtype(np.float32): "E", np.dtype(np.int32): "J", np.dtype(np.float64): "D"}
    cols = [
        fits.Column(name=name.lower() if lower_case else name, format=formats[np.asarray(a).dtype], array=a)
        for name, a in columns.items()
        if name not in drop
    ]
    header = fits.Header()
    header["HELIO_RV"] = helio_rv
    header["RA"], header["DEC"], header["MJD"], header["FIBERID"] = 1.0, 2.0, 59300, 77
    summary = fits.BinTableHDU.from_columns(
        [
            fits.Column(name="CATALOGID", format="K", array=[42]),
            fits.Column(name="ZWARNING", format="J", array=[0]),
            fits.Column(name="XCSAO_RV", format="D", array=[12.5]),
            fits.Column(name="MOON_PHASE", format="11A", array=["0.1 0.2 0.3"]),
        ]
    )
    hdus = [fits.PrimaryHDU(header=header), fits.BinTableHDU.from_columns(cols, name="COADD"), summary]
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return columns


# ----------------------------------------------------------------------------------------------------------
# apStar
# ----------------------------------------------------------------------------------------------------------


def test_apstar_rows_wavelengths_and_meta(tmp_path: Path):
    path = tmp_path / "apStar-1.3-apo25m-2M1.fits"
    data = write_apstar(path, nvisits=3)
    spectrum = read_spectrum(path)
    assert spectrum.filetype == "apStar" and spectrum.path == str(path)
    assert spectrum.flux.shape == spectrum.ivar.shape == spectrum.pixel_flags.shape == (5, N_APSTAR)
    # 1e-9 relative is 0.3 m/s in velocity: what radial velocities need, far above rounding.
    np.testing.assert_allclose(spectrum.wavelength, apogee_wavelength(), rtol=1e-9)
    assert (
        list(spectrum.meta["row_kind"]) == ["pixel_weighted_stack", "global_weighted_stack"] + ["visit"] * 3
    )
    assert list(spectrum.meta["visit_number"]) == [0, 0, 1, 2, 3]
    np.testing.assert_array_equal(spectrum.snr, [80, 80, 41, 42, 43])
    np.testing.assert_array_equal(spectrum.meta["bc"][2:], [-9, -8, -7])
    assert np.isnan(spectrum.meta["bc"][:2]).all()
    assert spectrum.meta["catalogid"] == 1234 and spectrum.meta["objid"] == "2M00000001+0000001"
    assert spectrum.meta["ra"] == 10.5 and spectrum.meta["nvisits"] == 3
    np.testing.assert_array_equal(spectrum.flux[1], data["flux"][1])


def test_apstar_ivar_rules(tmp_path: Path):
    path = tmp_path / "apStar-x.fits"
    write_apstar(path)
    s = read_apstar(path)
    assert s.ivar[1, 100] == pytest.approx(0.25)  # 1/σ² with σ = 2
    assert s.ivar[0, 10] == s.ivar[0, 11] == s.ivar[0, 12] == 0  # σ ≤ 0, NaN, 1e10
    assert s.ivar[0, 20] == s.ivar[0, 21] == 0  # bad bits (SATPIX, NOT_ENOUGH_PSF)
    assert s.pixel_flags[0, 20] & APOGEE_BAD_PIXEL_MASK
    assert s.ivar[0, 22] == pytest.approx(0.25)  # SIG_SKYLINE is not a bad bit
    assert s.flux[0, 30] == 0 and s.ivar[0, 30] == 0  # NaN flux
    assert decode_bits(int(s.pixel_flags[0, 22])) == ["SIG_SKYLINE"]


def test_apstar_single_visit_is_one_row(tmp_path: Path):
    path = tmp_path / "apStar-one.fits"
    write_apstar(path, nvisits=1)
    s = read_apstar(path)
    assert s.flux.shape == (1, N_APSTAR)
    assert list(s.meta["row_kind"]) == ["pixel_weighted_stack"] and list(s.snr) == [80.0]


def test_sigma_to_ivar():
    np.testing.assert_array_equal(
        sigma_to_ivar(np.array([2.0, 0.0, -1.0, np.inf, np.nan, 1e10])), [0.25, 0, 0, 0, 0, 0]
    )


# ----------------------------------------------------------------------------------------------------------
# apVisit
# ----------------------------------------------------------------------------------------------------------


def test_apvisit_is_monotonic_and_reordered_consistently(tmp_path: Path):
    path = tmp_path / "apVisit-1.3-apo25m-15001-59300-007.fits"
    write_apvisit(path)
    s = read_spectrum(path)
    assert s.filetype == "apVisit" and s.flux.shape == (1, 3 * 4096)
    assert np.all(np.diff(s.wavelength) > 0)  # v0.2.6 bug #19: chips AND pixels reversed
    assert s.wavelength[0] == 15143.0 and s.wavelength[-1] == 16955.0
    np.testing.assert_allclose(s.flux[0], s.wavelength, rtol=1e-6)  # every array got the same reordering
    assert s.ivar[0, -1] == 0 and s.pixel_flags[0, -1] == 1  # the reddest pixel carried BADPIX
    assert s.ivar[0, 0] == pytest.approx(1 / 25)
    assert s.meta["bc"] == -12.5 and s.meta["mjd"] == 59300 and s.meta["fiber"] == 7
    assert s.meta["telescope"] == "apo25m" and s.meta["jd_mid"] == 2459300.7 and s.meta["dithered"]
    assert list(s.snr) == [55.0]


def test_apvisit_with_fewer_than_five_hdus_is_corrupt(tmp_path: Path):
    path = tmp_path / "apVisit-short.fits"
    write_apvisit(path, n_hdus=4)
    with pytest.raises(SpectrumReadError, match="corrupt apVisit: 4 HDUs") as info:
        read_apvisit(path)
    assert str(path) in str(info.value)


def test_apvisit_overlapping_wavelengths_are_rejected(tmp_path: Path):
    path = tmp_path / "apVisit-dup.fits"
    wave = np.array([np.linspace(16000, 15000, 4096)] * 3)
    write_apvisit(path, wave=wave)
    with pytest.raises(SpectrumReadError, match="not distinct"):
        read_apvisit(path)


# ----------------------------------------------------------------------------------------------------------
# specFull
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lower_case", [False, True])
def test_specfull(tmp_path: Path, lower_case: bool):
    path = tmp_path / "spec-015000-59300-42.fits"
    columns = write_specfull(path, lower_case=lower_case)
    s = read_spectrum(path)
    assert s.filetype == "specFull" and s.flux.shape == (1, 200)
    np.testing.assert_allclose(s.wavelength, 10.0 ** columns["LOGLAM"].astype(float))
    assert set(s.extras) == {"or_mask", "wdisp", "sky", "model", "wresl"}
    assert s.meta["helio_rv"] == s.meta["bc"] == 5.5
    assert s.meta["catalogid"] == 42 and s.meta["mjd"] == 59300 and s.meta["fiber"] == 77
    assert s.meta["zwarning"] == 0 and s.meta["xcsao_rv"] == 12.5
    assert s.meta["summary"]["moon_phase"] == "0.1 0.2 0.3"
    assert s.snr[0] == pytest.approx(np.median(columns["FLUX"] * 2.0), rel=1e-6)


def test_specfull_nan_helio_rv_string(tmp_path: Path):
    path = tmp_path / "spec-nan.fits"
    write_specfull(path, helio_rv="NaN")
    assert np.isnan(read_specfull(path).meta["helio_rv"])


def test_specfull_bad_ivar_values_become_zero(tmp_path: Path):
    path = tmp_path / "spec-ivar.fits"
    ivar = np.full(200, 4.0, np.float32)
    ivar[:3] = [-1.0, np.nan, np.inf]
    flux = np.linspace(10, 20, 200).astype(np.float32)
    flux[5] = np.nan
    s = read_specfull(write_specfull(path, IVAR=ivar, FLUX=flux) and path)
    assert list(s.ivar[0, :3]) == [0, 0, 0] and s.ivar[0, 5] == 0 and s.flux[0, 5] == 0 and s.ivar[0, 4] == 4


# ----------------------------------------------------------------------------------------------------------
# Errors: every one names the file
# ----------------------------------------------------------------------------------------------------------


def _expect_error(path: Path, match: str, filetype: str | None = None) -> SpectrumReadError:
    with pytest.raises(SpectrumReadError, match=match) as info:
        read_spectrum(path, filetype)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(str(path)) and info.value.path == str(path)
    return info.value


def test_missing_file(tmp_path: Path):
    _expect_error(tmp_path / "apStar-missing.fits", "does not exist")


def test_not_a_fits_file(tmp_path: Path):
    path = tmp_path / "apStar-text.fits"
    path.write_text("this is not FITS\n" * 300)
    _expect_error(path, "not a valid FITS file")
    empty = tmp_path / "apVisit-empty.fits"
    empty.write_bytes(b"")
    _expect_error(empty, "not a valid FITS file")


@pytest.mark.parametrize(
    "writer, name",
    [(write_apstar, "apStar-t.fits"), (write_apvisit, "apVisit-t.fits"), (write_specfull, "spec-1-2-3.fits")],
)
@pytest.mark.parametrize("keep", [0.5, 0.02])  # truncated inside the data / inside a header
def test_truncated_files(tmp_path: Path, writer, name: str, keep: float):
    path = tmp_path / name
    writer(path)
    content = path.read_bytes()
    path.write_bytes(content[: max(2880 + 100, int(len(content) * keep))])
    _expect_error(path, "corrupt or truncated FITS file")


def test_missing_hdus(tmp_path: Path):
    path = tmp_path / "apStar-short.fits"
    write_apstar(path, n_hdus=3)
    _expect_error(path, r"needs at least 4 HDUs, found 3 \(missing HDU\)")
    spec = tmp_path / "spec-1-2-3.fits"
    fits.HDUList(
        [fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("FLUX", "E", array=[1.0])])]
    ).writeto(spec)
    _expect_error(spec, "needs at least 3 HDUs")


def test_missing_columns(tmp_path: Path):
    path = tmp_path / "spec-1-2-3.fits"
    write_specfull(path, drop=("IVAR", "AND_MASK"))
    _expect_error(path, r"missing column\(s\) \['IVAR', 'AND_MASK'\]")


def test_shape_mismatches(tmp_path: Path):
    path = tmp_path / "apStar-shape.fits"
    write_apstar(path, sigma=np.ones((5, 100), np.float32))
    _expect_error(path, "error shape .* does not match flux shape")
    path = tmp_path / "apStar-nvisits.fits"
    write_apstar(path, nvisits=3, n_rows=4)
    _expect_error(path, "NVISITS = 3 implies 5 flux rows, found 4")
    path = tmp_path / "apVisit-shape.fits"
    write_apvisit(path, wave=np.ones((3, 10)))
    _expect_error(path, "wavelength shape")


def test_missing_wavelength_keywords(tmp_path: Path):
    path = tmp_path / "apStar-nowcs.fits"
    write_apstar(path)
    with fits.open(path, mode="update") as hdul:
        del hdul[1].header["CRVAL1"]
    _expect_error(path, "missing CRVAL1/CDELT1")


def test_all_nan_flux(tmp_path: Path):
    path = tmp_path / "apVisit-nan.fits"
    write_apvisit(path, flux=np.full((3, 4096), np.nan, np.float32))
    _expect_error(path, "all flux values are NaN")
    path = tmp_path / "spec-nan-flux.fits"
    write_specfull(path, FLUX=np.full(200, np.nan, np.float32))
    _expect_error(path, "all flux values are NaN")


def test_all_ivar_zero(tmp_path: Path):
    path = tmp_path / "apStar-zero.fits"
    write_apstar(path, mask=np.full((5, N_APSTAR), 1, np.int16))  # every pixel BADPIX
    _expect_error(path, "all pixels have zero inverse variance")
    path = tmp_path / "spec-zero.fits"
    write_specfull(path, IVAR=np.zeros(200, np.float32))
    _expect_error(path, "all pixels have zero inverse variance")


def test_unknown_filetype(tmp_path: Path):
    path = tmp_path / "mystery.fits"
    fits.PrimaryHDU().writeto(path)
    _expect_error(path, "cannot infer the SDSS filetype")
    _expect_error(path, "unknown SDSS filetype", filetype="apFoo")
    _expect_error(path, "no reader for filetype 'mwmStar'", filetype="mwmStar")


def test_wrong_filetype_given_explicitly(tmp_path: Path):
    path = tmp_path / "spec-1-2-3.fits"
    write_specfull(path)
    _expect_error(path, "needs at least 4 HDUs|holds no image data", filetype="apStar")


# ----------------------------------------------------------------------------------------------------------
# Spectrum container
# ----------------------------------------------------------------------------------------------------------


def test_spectrum_select_and_table(tmp_path: Path):
    path = tmp_path / "apStar-sel.fits"
    write_apstar(path)
    s = read_apstar(path)
    visits = s.select(slice(2, None))
    assert visits.n_spectra == 3 and list(visits.snr) == [41, 42, 43]
    assert visits.meta["objid"] == s.meta["objid"]
    stack = s.select(0)
    assert stack.flux.shape == (1, N_APSTAR) and list(stack.meta["row_kind"]) == ["pixel_weighted_stack"]
    table = s.to_table()
    assert len(table) == 5 and table["flux"].shape == (5, N_APSTAR)
    assert table["wavelength"].unit == "Angstrom" and list(table["snr"]) == [80, 80, 41, 42, 43]
    assert table.meta["objid"] == "2M00000001+0000001"


def test_spectrum_validates_shapes():
    with pytest.raises(ValueError, match="ivar shape"):
        Spectrum(np.arange(3.0), np.ones(3), np.ones(4))
    s = Spectrum(np.arange(3.0), np.ones(3), np.ones(3))
    assert s.flux.shape == (1, 3) and s.pixel_flags.dtype == np.int64


def test_to_specutils_optional(tmp_path: Path):
    s = Spectrum(np.arange(1.0, 4.0), np.ones(3), np.array([1.0, 0.0, 1.0]))
    try:
        import specutils  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="specutils"):
            s.to_specutils()
    else:  # pragma: no cover - specutils is not a dependency
        converted = s.to_specutils()
        assert list(converted.mask) == [False, True, False]


# ----------------------------------------------------------------------------------------------------------
# Generated files
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("survey")
    return generate_survey(
        root, n_stars=3, visits_per_star=2, snr=50.0, seed=3, model_seed=0, flagged_fraction=0.01
    )


def test_readers_on_generated_files(survey):
    for row in survey.rows:
        s = read_spectrum(survey.root / row["path"])
        assert s.filetype == row["filetype"]
        assert np.all(np.diff(s.wavelength) > 0)
        bad = (s.pixel_flags & APOGEE_BAD_PIXEL_MASK) != 0 if row["filetype"] != "specFull" else None
        if row["filetype"] == "apStar":
            assert s.flux.shape == (4, N_APSTAR)
            assert np.all(s.ivar[bad] == 0) and bad.any()
            assert np.all(s.ivar[:, :246] == 0)  # the blue edge is off-detector (σ = 1e10)
        elif row["filetype"] == "apVisit":
            assert s.flux.shape == (1, 3 * 4096) and s.meta["bc"] == pytest.approx(row["bc_kms"])
            assert np.all(s.ivar[bad] == 0) and bad.sum() >= row["n_flagged_pixels"]
            harmless = (s.pixel_flags != 0) & ~bad
            assert np.all(s.ivar[harmless] > 0)
        else:
            assert s.flux.shape == (1, 4648) and s.meta["helio_rv"] == pytest.approx(row["bc_kms"])
            assert (s.ivar == 0).sum() == row["n_flagged_pixels"]


def test_generated_apstar_sigma_to_ivar(survey):
    row = survey.of_filetype("apStar")[0]
    path = survey.root / row["path"]
    s = read_apstar(path)
    with fits.open(path) as hdul:
        sigma = hdul[2].data.astype(float)
        mask = hdul[3].data
    usable = (sigma < 1e9) & ((mask & APOGEE_BAD_PIXEL_MASK) == 0)
    np.testing.assert_allclose(s.ivar[usable], 1.0 / sigma[usable] ** 2)
    assert np.all(s.ivar[~usable] == 0)


def test_truncated_generated_file(survey, tmp_path: Path):
    source = survey.paths("apVisit")[0]
    target = tmp_path / source.name
    target.write_bytes(source.read_bytes()[:50_000])
    _expect_error(target, "corrupt or truncated FITS file")


def test_sdss_path_of_generated_file(survey):
    row = survey.of_filetype("apVisit")[0]
    import json

    assert sdss_path("apVisit", survey.root, **json.loads(row["kwargs"])) == survey.root / row["path"]
