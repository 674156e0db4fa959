"""Choose the continuum-pixel criterion on training stars alone: continuum accuracy and The Cannon's label
scatter on held-out training stars of the independent survey (never on its test stars).

Usage::

    .venv/bin/python bench/continuum_cv.py [--workdir DIR] [--holdout 250] [--tolerance 0.002 0.005]
        [--snr 25 50 100]

Reads the training stars of the cached independent survey (``bench/bench_labels.py`` makes it; same
``--workdir``) with their true continua. Per ``--tolerance`` of
:class:`~astra_provider.science.cannon.continuum_pixels.ContinuumPixelCriteria`, derives the continuum
pixels from all but the last ``--holdout`` training stars, then on the held-out stars, re-observed at each
``--snr`` (their noise-free spectra, from the truth model, times their true continua, plus Gaussian noise
of continuum / S/N):

- the continuum accuracy: rms and bias over detector pixels and stars of (normalised flux / truth-normalised
  flux − 1), times S/N (the target of issue #9 is 0.3), and the noise-free floor;
- the scatter of The Cannon's labels (quadratic model trained on the other training stars, normalised with
  those pixels) divided by the scatter of the same Cannon on truth-normalised spectra (target <= 1.15).

Prints the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LABEL_NAMES = ("teff", "logg", "fe_h")


def _observe(clean: np.ndarray, continuum: np.ndarray, good: np.ndarray, snr: float, rng) -> tuple:
    """Noisy flux and its ivar at ``snr`` (noise σ = continuum / snr, the survey's convention)."""
    flux = clean + rng.standard_normal(clean.shape) * continuum / snr
    return flux, np.where(good, snr**2 / continuum**2, 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench-cache" / "labels")
    parser.add_argument("--n-train", type=int, default=1250, help="of the cached survey")
    parser.add_argument("--n-test", type=int, default=1250, help="of the cached survey (not used)")
    parser.add_argument("--holdout", type=int, default=250, help="the last N training stars")
    parser.add_argument("--tolerance", type=float, nargs="+", default=[0.002, 0.005])
    parser.add_argument("--snr", type=float, nargs="+", default=[25.0, 50.0, 100.0])
    args = parser.parse_args(argv)
    from astra_provider.science.cannon import fit, train
    from astra_provider.science.cannon.continuum_pixels import ContinuumPixelCriteria, derive_continuum_pixels
    from astra_provider.science.continuum import continuum_normalize
    from astra_provider.synthetic.independent_survey import (
        independent_survey,
        truth_labels,
        with_true_continuum,
    )

    print(f"load average at start: {os.getloadavg()}")
    survey = independent_survey(
        args.workdir / f"survey-{args.n_train}-{args.n_test}", args.n_train, args.n_test
    )
    wavelength, flux, ivar, continuum = with_true_continuum(survey.training)
    labels = truth_labels(survey.training)
    fit_rows, held = np.arange(len(labels) - args.holdout), np.arange(len(labels) - args.holdout, len(labels))
    truth = survey.model.normalized_flux(labels[held])
    good = ivar[held] > 0
    usable = good & (np.abs(truth) > 0.05)
    rng = np.random.default_rng(1)
    observed = {snr: _observe(truth * continuum[held], continuum[held], good, snr, rng) for snr in args.snr}
    reference = train(
        labels[fit_rows],
        flux[fit_rows] / continuum[fit_rows],
        ivar[fit_rows] * continuum[fit_rows] ** 2,
        LABEL_NAMES,
        wavelength,
    )
    truth_scatter = {
        snr: np.std(
            fit(reference, f / continuum[held], i * continuum[held] ** 2).labels - labels[held], axis=0
        )
        for snr, (f, i) in observed.items()
    }
    print(f"{len(fit_rows)} training stars, {len(held)} held out (training S/N, re-observed at {args.snr})")
    for tolerance in args.tolerance:
        selection = derive_continuum_pixels(
            labels[fit_rows],
            flux[fit_rows],
            ivar[fit_rows],
            LABEL_NAMES,
            wavelength,
            criteria=ContinuumPixelCriteria(tolerance=tolerance),
        )
        mask = selection.mask
        normalised, normalised_ivar, _ = continuum_normalize(wavelength, flux[fit_rows], ivar[fit_rows], mask)
        model = train(labels[fit_rows], normalised, normalised_ivar, LABEL_NAMES, wavelength)
        per_region = "/".join(map(str, selection.n_per_region))
        print(f"tolerance {tolerance:g}: {int(mask.sum())} pixels ({per_region} per region)")
        clean = truth * continuum[held]
        _, _, fitted = continuum_normalize(wavelength, clean, np.where(good, 1.0, 0.0), mask)
        floor = continuum[held][usable] / fitted[usable] - 1
        print(f"  noise-free: bias {floor.mean():+.5f}, rms {np.sqrt(np.mean(floor**2)):.5f}")
        for snr, (f, i) in observed.items():
            normalised, normalised_ivar, fitted = continuum_normalize(wavelength, f, i, mask)
            error = continuum[held][usable] / fitted[usable] - 1
            rms = float(np.sqrt(np.mean(error**2)))
            scatter = np.std(fit(model, normalised, normalised_ivar).labels - labels[held], axis=0)
            ratios = "/".join(f"{r:.3f}" for r in scatter / truth_scatter[snr])
            print(
                f"  S/N {snr:>4g}: continuum bias {error.mean():+.5f}, rms {rms:.5f} = {rms * snr:.3f}/SNR; "
                f"Cannon scatter / truth-normalised scatter (teff/logg/fe_h) {ratios}"
            )
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
