"""A cached benchmark survey from the independent truth model (:func:`independent_survey`), for accuracy
figures of any label method: a training set and the *same* test stars observed at several S/N.

Everything is written once under ``root`` (apStar files in the SDSS layout, ``truth.csv`` and ``survey.json``
per survey, a training table, the Cramér–Rao bounds) and read back by later calls with the same arguments:

- ``training/``: ``n_train`` stars at S/N ``train_snr`` (one visit each), and ``training.csv`` (path and
  labels, the input of ``TrainTheCannon``);
- ``test-snr{S}/`` for each S in ``snrs``: the same ``n_test`` stars (identical labels) at S/N ``S``, each
  survey with its own noise, continua and positions;
- ``bounds.npy``: the label Cramér–Rao bounds of the test stars at S/N 1 (the bound at S/N S is this / S:
  white noise σ = 1/S on the normalised flux, no intrinsic scatter).

:func:`truth_normalized` divides the files' flux by the true continuum: the reference "perfect continuum"
that a method's own normalisation is compared with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astra_provider.synthetic.independent import IndependentTruthModel
from astra_provider.synthetic.truth import TRUTH_FILENAME, SurveyTruth

__all__ = [
    "IndependentSurvey",
    "independent_survey",
    "truth_labels",
    "truth_normalized",
    "with_true_continuum",
]

_SPEC_FILENAME = "independent-survey.json"


class _FixedLabels:
    """The independent model, but every survey draws the same given labels (so test sets differ only in
    S/N, noise, continua and positions)."""

    def __init__(self, model: IndependentTruthModel, labels: np.ndarray) -> None:
        self.model = model
        self.labels = labels
        self.label_names = model.label_names

    def draw_labels(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if n != len(self.labels):
            raise ValueError(f"{n} stars requested, {len(self.labels)} labels fixed")
        return self.labels.copy()

    def normalized_flux(self, labels, rv_kms=None, wavelength=None) -> np.ndarray:
        return self.model.normalized_flux(labels, rv_kms, wavelength)

    def intrinsic_scatter(self) -> np.ndarray | None:
        return self.model.intrinsic_scatter()

    def survey_parameters(self) -> dict[str, Any]:
        return {**self.model.survey_parameters(), "labels": "fixed: the test stars of the benchmark"}


@dataclass
class IndependentSurvey:
    """The cached benchmark survey (see the module docstring)."""

    root: Path
    model: IndependentTruthModel
    training: SurveyTruth
    training_table: Path
    tests: dict[float, SurveyTruth]
    bounds_at_snr1: np.ndarray  # (n_test, 3)

    @property
    def snrs(self) -> list[float]:
        return sorted(self.tests)

    def test_labels(self) -> np.ndarray:
        """True labels (n_test, 3) of the test stars (the same at every S/N)."""
        return truth_labels(self.tests[self.snrs[0]])

    def test_paths(self, snr: float) -> list[Path]:
        """apStar paths of the test stars at ``snr``, in star order."""
        return self.tests[snr].paths("apStar")

    def bound(self, snr: float) -> np.ndarray:
        """Label Cramér–Rao bounds (n_test, 3) of the test stars at ``snr``."""
        return self.bounds_at_snr1 / snr


def truth_labels(truth: SurveyTruth) -> np.ndarray:
    """(n, 3) teff, logg, fe_h of a survey's apStar rows, in file order."""
    return np.array([[r["teff"], r["logg"], r["fe_h"]] for r in truth.of_filetype("apStar")])


def truth_normalized(truth: SurveyTruth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first row of every apStar file of ``truth`` divided by its true continuum (the star's continuum
    times the visit throughput): ``(wavelength, flux, ivar)`` with flux ``(n, 8575)``; bad pixels ivar 0."""
    wavelength, flux, ivar, continuum = with_true_continuum(truth)
    return wavelength, flux / continuum, ivar * continuum**2


def with_true_continuum(truth: SurveyTruth) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first row of every apStar file of ``truth`` as observed, and its true continuum:
    ``(wavelength, flux, ivar, continuum)``, each spectrum array ``(n, 8575)``."""
    from astra_provider.sdss.spectrum import read_spectrum
    from astra_provider.synthetic.apogee_flux import star_continuum

    rows = truth.of_filetype("apStar")
    flux, ivar, continua, wavelength = [], [], [], None
    for row in rows:
        spectrum = read_spectrum(truth.root / row["path"])
        wavelength = spectrum.wavelength
        continua.append(star_continuum(row["continuum_seed"], wavelength) * row["throughput"])
        flux.append(spectrum.flux[0])
        ivar.append(spectrum.ivar[0])
    if wavelength is None:
        raise ValueError(f"{truth.root}: the survey has no apStar file")
    return wavelength, np.array(flux), np.array(ivar), np.array(continua)


def _write_training_table(truth: SurveyTruth, path: Path) -> None:
    rows = [f"{r['path']},{r['teff']!r},{r['logg']!r},{r['fe_h']!r}" for r in truth.of_filetype("apStar")]
    path.write_text("\n".join(["path,teff,logg,fe_h", *rows]) + "\n")


def independent_survey(
    root: str | os.PathLike[str],
    n_train: int = 1250,
    n_test: int = 1250,
    snrs: tuple[float, ...] = (25.0, 50.0, 100.0),
    train_snr: float = 150.0,
    seed: int = 2027,
    model_seed: int = 0,
    say=print,
) -> IndependentSurvey:
    """The benchmark survey under ``root``: read if it was made with these arguments, else (re)made.

    :param root: the cache directory.
    :param n_train: training stars (S/N ``train_snr``).
    :param n_test: test stars, observed once at each of ``snrs``.
    :param seed: seeds the surveys (training ``seed``, tests ``seed + 1 + k``, the test labels
        ``seed + 100``).
    :param model_seed: the independent model's line-list seed.
    :param say: progress messages (``None`` for silence).
    """
    from astra_provider.synthetic.model import crb_labels
    from astra_provider.synthetic.survey import generate_survey

    root = Path(root)
    spec: dict[str, Any] = {
        "n_train": n_train,
        "n_test": n_test,
        "snrs": [float(s) for s in snrs],
        "train_snr": float(train_snr),
        "seed": seed,
        "model_seed": model_seed,
    }
    model = IndependentTruthModel.default(model_seed)
    spec_path = root / _SPEC_FILENAME
    fresh = not (spec_path.exists() and json.loads(spec_path.read_text()) == spec)
    if fresh:
        spec_path.unlink(missing_ok=True)
        root.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {
        "visits_per_star": 1,
        "filetypes": ("apStar",),
        "boss_visits_per_star": 0,
        "overwrite": True,
    }
    if fresh:
        (say or (lambda _: None))(f"writing the independent survey under {root} (once)")
        generate_survey(root / "training", n_stars=n_train, snr=train_snr, seed=seed, model=model, **common)
        labels = model.draw_labels(n_test, np.random.default_rng(seed + 100))
        for k, snr in enumerate(spec["snrs"]):
            fixed = _FixedLabels(model, labels)
            generate_survey(
                root / f"test-snr{snr:g}", n_stars=n_test, snr=snr, seed=seed + 1 + k, model=fixed, **common
            )
        np.save(root / "bounds.npy", crb_labels(model, labels, 1.0))
    training = SurveyTruth.read(root / "training" / TRUTH_FILENAME)
    table = root / "training" / "training.csv"
    if fresh or not table.exists():
        _write_training_table(training, table)
    tests = {snr: SurveyTruth.read(root / f"test-snr{snr:g}" / TRUTH_FILENAME) for snr in spec["snrs"]}
    if fresh:
        spec_path.write_text(json.dumps(spec))
    return IndependentSurvey(root, model, training, table, tests, np.load(root / "bounds.npy"))
