"""Benchmark the batched Sinusoidal continuum against a naive per-spectrum loop.

Usage: ``.venv/bin/python bench/bench_continuum.py [--n-spectra 2000] [--n-naive 300] [--repeats 3]``

Both paths fit, evaluate and apply the continuum (flux/C, ivar·C²) to the same synthetic apStar spectra
(S/N 50, sinusoidal continuum, shipped continuum pixels). The naive baseline is a per-spectrum, per-region
``np.linalg.lstsq`` on the √ivar-weighted design matrix (no ridge), run on a subset of the spectra and
reported per spectrum. The best of ``--repeats`` runs is reported for each.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from astra_provider.science.continuum import (
    continuum_normalize,
    fit_sinusoidal_continuum,
    load_continuum_pixels,
    sinusoid_basis,
)
from astra_provider.synthetic.model import (
    APOGEE_REGIONS_AA,
    TruthModel,
    apogee_detector_mask,
    apogee_wavelength,
    draw_labels,
    make_spectra,
)


def batched(wavelength, flux, ivar, mask):
    flux_norm, ivar_norm, _ = continuum_normalize(wavelength, flux, ivar, mask)
    return flux_norm, ivar_norm


def naive(wavelength, flux, ivar, mask):
    flux_norm = np.ones_like(flux)
    ivar_norm = np.zeros_like(ivar)
    regions = [(wavelength >= lower) & (wavelength <= upper) for lower, upper in APOGEE_REGIONS_AA]
    for i in range(flux.shape[0]):
        for region in regions:
            fit = region & mask & np.isfinite(flux[i]) & (ivar[i] > 0)
            sqrt_ivar = np.sqrt(ivar[i, fit])
            design = sinusoid_basis(wavelength[fit])
            amplitudes = np.linalg.lstsq(design * sqrt_ivar[:, None], flux[i, fit] * sqrt_ivar, rcond=None)[0]
            continuum = sinusoid_basis(wavelength[region]) @ amplitudes
            good = ivar[i, region] > 0
            flux_norm[i, region] = np.where(good, flux[i, region] / continuum, 1.0)
            ivar_norm[i, region] = np.where(good, ivar[i, region] * continuum**2, 0.0)
    return flux_norm, ivar_norm


def best_time(function, *args, repeats: int) -> tuple[float, tuple]:
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-spectra", type=int, default=2000)
    parser.add_argument("--n-naive", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(2024)
    model = TruthModel.default(seed=0)
    spectra = make_spectra(model, draw_labels(args.n_spectra, rng), 50.0, rng=rng)
    wavelength, mask = apogee_wavelength(), load_continuum_pixels()

    fit_only, continuum = best_time(
        fit_sinusoidal_continuum, wavelength, spectra.flux, spectra.ivar, mask, repeats=args.repeats
    )
    total, (flux_norm, _) = best_time(
        batched, wavelength, spectra.flux, spectra.ivar, mask, repeats=args.repeats
    )
    n_naive = min(args.n_naive, args.n_spectra)
    subset = (wavelength, spectra.flux[:n_naive], spectra.ivar[:n_naive], mask)
    naive_total, (naive_flux, _) = best_time(naive, *subset, repeats=args.repeats)

    per_batched = 1e3 * total / args.n_spectra
    per_naive = 1e3 * naive_total / n_naive
    detector = apogee_detector_mask()
    error = (continuum / spectra.continuum - 1.0)[:, detector]
    difference = np.abs(flux_norm[:n_naive] - naive_flux)[:, detector].max()
    print(f"spectra: {args.n_spectra} (naive: {n_naive}), continuum pixels: {mask.sum()}, ", end="")
    print(f"best of {args.repeats} runs")
    print(f"batched fit only        : {1e3 * fit_only / args.n_spectra:.3f} ms/spectrum")
    print(f"batched fit + normalise : {per_batched:.3f} ms/spectrum")
    print(f"naive lstsq loop        : {per_naive:.3f} ms/spectrum")
    print(f"speed-up                : {per_naive / per_batched:.1f}x")
    print(
        f"accuracy at S/N 50      : rms(C_fit/C - 1) = {error.std():.2e} ({50 * error.std():.3f}/SNR), "
        f"bias = {error.mean():+.1e}"
    )
    print(f"max |flux_norm batched - naive| = {difference:.1e} (naive has no ridge)")


if __name__ == "__main__":
    main()
