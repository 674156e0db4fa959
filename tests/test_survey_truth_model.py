"""The survey generator with another APOGEE truth model than the default line list (the pluggable seam,
:class:`~astra_provider.synthetic.truth_model.ApogeeTruthModel`).

The model here is deliberately trivial and independent of :class:`~astra_provider.synthetic.model.TruthModel`:
a flat spectrum with one Gaussian absorption line whose depth is a fourth label. The tests check that the
survey writes readable apStar/apVisit/specFull files from it, that the truth table carries its labels, and
that the spectra in the files are that model (the line, at its depth and velocity, and nothing else).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from astra_provider.constants import SPEED_OF_LIGHT_KMS
from astra_provider.sdss.apogee import apogee_wavelength
from astra_provider.sdss.spectrum import read_spectrum
from astra_provider.synthetic.model import TruthModel, draw_continuum
from astra_provider.synthetic.survey import SurveyTruth, generate_survey
from astra_provider.synthetic.truth_model import ApogeeTruthModel

LINE_CENTER_AA = 16_000.0  # vacuum, at rest
LINE_SIGMA_AA = 0.6  # ≈ 2.7 apStar pixels
SNR = 150.0


class OneLineModel:
    """A flat spectrum with one Gaussian absorption line at 16,000 Å; its depth is the last label."""

    label_names: tuple[str, ...] = ("teff", "logg", "fe_h", "line_depth")

    def draw_labels(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.column_stack(
            [
                rng.uniform(4000.0, 5500.0, n),
                rng.uniform(1.0, 3.5, n),
                rng.uniform(-1.0, 0.3, n),
                rng.uniform(0.2, 0.8, n),
            ]
        )[:, -len(self.label_names) :]

    def normalized_flux(
        self,
        labels: np.ndarray,
        rv_kms: float | np.ndarray | None = None,
        wavelength: np.ndarray | None = None,
    ) -> np.ndarray:
        labels = np.atleast_2d(labels)
        wavelength = apogee_wavelength() if wavelength is None else np.asarray(wavelength)
        rv = np.zeros(len(labels)) if rv_kms is None else np.broadcast_to(rv_kms, (len(labels),))
        center = LINE_CENTER_AA * (1.0 + rv / SPEED_OF_LIGHT_KMS)
        profile = np.exp(-0.5 * ((wavelength - center[:, None]) / LINE_SIGMA_AA) ** 2)
        return 1.0 - labels[:, -1:] * profile

    def intrinsic_scatter(self) -> np.ndarray | None:
        return None

    def survey_parameters(self) -> dict[str, Any]:
        return {"truth_model": "one Gaussian line", "line_center_aa": LINE_CENTER_AA}


class DepthOnlyModel(OneLineModel):
    """The same spectrum with the line depth as its only label (no teff, logg, fe_h for BOSS)."""

    label_names = ("line_depth",)


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> SurveyTruth:
    return generate_survey(
        tmp_path_factory.mktemp("one-line"),
        n_stars=4,
        visits_per_star=(1, 3),
        snr=SNR,
        seed=21,
        rv_jitter_kms=5.0,
        model=OneLineModel(),
    )


def test_both_models_satisfy_the_protocol():
    assert isinstance(OneLineModel(), ApogeeTruthModel)
    assert isinstance(TruthModel.default(0), ApogeeTruthModel)


def test_truth_table_carries_the_models_labels(survey: SurveyTruth):
    counts = survey.counts()
    assert counts["apStar"] == 4 and counts["specFull"] == 4
    assert counts["apVisit"] == sum(r["n_visits"] for r in survey.of_filetype("apStar"))
    assert survey.label_names == OneLineModel.label_names
    assert survey.parameters["truth_model"] == "one Gaussian line" and "model_seed" not in survey.parameters
    again = SurveyTruth.read(survey.truth_path)
    assert again.columns == survey.columns and again.label_names == OneLineModel.label_names
    for read, written in zip(again.rows, survey.rows, strict=True):
        assert read.keys() == written.keys()
        for key, value in read.items():
            assert value == written[key] or (np.isnan(value) and np.isnan(written[key])), key
    depths = {r["star_index"]: r["line_depth"] for r in survey.rows}
    assert len(set(depths.values())) == 4 and all(0.2 <= d <= 0.8 for d in depths.values())
    assert "line_depth" in survey.to_table().colnames


def _normalised(flux: np.ndarray, ivar: np.ndarray, continuum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flux / (row scale × continuum) and its σ; the row scale (throughput) from the median ratio."""
    good = ivar > 0
    scale = np.median(flux[good] / continuum[good])
    sigma = np.where(good, 1.0 / np.sqrt(np.where(good, ivar, 1.0)), np.inf) / (scale * continuum)
    return flux / (scale * continuum), sigma


def _check_spectrum(wavelength: np.ndarray, normalised: np.ndarray, sigma: np.ndarray, row: dict) -> None:
    """The line at the row's depth and Doppler shift (within 5σ of the fit), flat noise everywhere else."""
    center = LINE_CENTER_AA * (1.0 + row["rv_applied_kms"] / SPEED_OF_LIGHT_KMS)
    profile = np.exp(-0.5 * ((wavelength - center) / LINE_SIGMA_AA) ** 2)
    weight = 1.0 / sigma**2  # 0 on bad pixels
    depth = np.sum(weight * profile * (1.0 - normalised)) / np.sum(weight * profile**2)
    depth_error = 1.0 / np.sqrt(np.sum(weight * profile**2))
    assert abs(depth - row["line_depth"]) < 5 * depth_error, (row["path"], depth, row["line_depth"])
    away = (np.abs(wavelength - center) > 8 * LINE_SIGMA_AA) & np.isfinite(sigma)
    z = (normalised[away] - 1.0) / sigma[away]
    assert abs(z.mean()) < 0.05 and 0.95 < z.std() < 1.05, row["path"]  # no other lines, no scatter


def test_apvisit_spectra_are_the_model_at_the_visit_velocity(survey: SurveyTruth):
    for row in survey.of_filetype("apVisit"):
        s = read_spectrum(survey.root / row["path"])
        continuum = draw_continuum(1, s.wavelength, np.random.default_rng(row["continuum_seed"]))[0]
        normalised, sigma = _normalised(s.flux[0], s.ivar[0], continuum)
        _check_spectrum(s.wavelength, normalised, sigma, row)
        # the line is where vhelio − bc puts it: a χ² scan over velocity
        trial = row["rv_applied_kms"] + np.arange(-6.0, 6.5, 1.0)
        model = OneLineModel().normalized_flux(
            np.repeat([[row["line_depth"]]], trial.size, 0), trial, s.wavelength
        )
        chi2 = np.sum((normalised - model) ** 2 / sigma**2, axis=1)
        assert trial[np.argmin(chi2)] == pytest.approx(row["rv_applied_kms"], abs=1.0)


def test_apstar_rows_are_the_model_at_rest(survey: SurveyTruth):
    for row in survey.of_filetype("apStar"):
        s = read_spectrum(survey.root / row["path"])
        assert s.n_spectra == (1 if row["n_visits"] == 1 else row["n_visits"] + 2)
        continuum = draw_continuum(1, s.wavelength, np.random.default_rng(row["continuum_seed"]))[0]
        for k in range(s.n_spectra):
            normalised, sigma = _normalised(s.flux[k], s.ivar[k], continuum)
            _check_spectrum(s.wavelength, normalised, sigma, row)


def test_specfull_files_are_readable(survey: SurveyTruth):
    for row in survey.of_filetype("specFull"):
        s = read_spectrum(survey.root / row["path"])
        assert s.n_spectra == 1 and np.all(np.isfinite(s.flux)) and np.median(s.ivar) > 0


def test_exact_visits_match_interpolated_ones(tmp_path: Path):
    """The fine-grid interpolation serves any model: ≤ 1e-3 of the continuum from exact evaluation."""
    kwargs = {"n_stars": 2, "visits_per_star": 1, "snr": SNR, "filetypes": ["apVisit"], "seed": 4}
    fast = generate_survey(tmp_path / "fast", model=OneLineModel(), **kwargs)
    exact = generate_survey(tmp_path / "exact", model=OneLineModel(), exact_visits=True, **kwargs)
    for a, b in zip(fast.paths(), exact.paths()):
        fa, fb = read_spectrum(a), read_spectrum(b)
        good = fb.ivar[0] > 0
        continuum = 1.0 / np.sqrt(fb.ivar[0][good]) * SNR
        assert np.max(np.abs(fa.flux[0] - fb.flux[0])[good] / continuum) < 1e-3


def test_a_model_without_boss_labels_writes_apogee_files_only(tmp_path: Path):
    kwargs = {"n_stars": 2, "visits_per_star": 1, "model": DepthOnlyModel()}
    with pytest.raises(ValueError, match=r"specFull needs the labels .* lacks \['teff', 'logg', 'fe_h'\]"):
        generate_survey(tmp_path / "all", **kwargs)
    truth = generate_survey(tmp_path / "apogee", filetypes=["apStar", "apVisit"], **kwargs)
    assert truth.label_names == ("line_depth",) and truth.counts() == {"apStar": 2, "apVisit": 2}
    assert "teff" not in SurveyTruth.read(truth.truth_path).columns


def test_names_that_clash_with_the_surveys_own_are_refused(tmp_path: Path):
    class ClashingLabel(OneLineModel):
        label_names = ("teff", "logg", "fe_h", "snr")

    class ShadowingParameter(OneLineModel):
        def survey_parameters(self) -> dict[str, Any]:
            return {"seed": 1}

    with pytest.raises(ValueError, match=r"clash with truth columns \['snr'\]"):
        generate_survey(tmp_path / "label", n_stars=1, model=ClashingLabel())
    with pytest.raises(ValueError, match=r"shadow survey arguments \['seed'\]"):
        generate_survey(tmp_path / "parameter", n_stars=1, model=ShadowingParameter())
    assert not list(tmp_path.rglob("*.fits"))  # refused before any file is written
