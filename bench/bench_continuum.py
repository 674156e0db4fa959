"""Benchmark the batched Sinusoidal continuum against a naive per-spectrum loop.

Usage: ``.venv/bin/python bench/bench_continuum.py [--n-spectra 2000] [--n-naive 300] [--repeats 7]
[--accuracy]``

All paths fit, evaluate and (except "fit only") apply the continuum (flux/C, ivar·C²) to the same synthetic
apStar spectra (S/N 50, sinusoidal continuum, shipped continuum pixels):

* ``fit_sinusoidal_continuum`` alone;
* ``continuum_normalize`` (fit + normalise) with float64 results, float32 results (as the task writes
  them), and float64 results into preallocated arrays (``out=``, no new memory);
* the naive baseline: per spectrum and region, ``np.linalg.lstsq`` on the √ivar-weighted design matrix (no
  ridge), run on a subset of the spectra.

Each is timed ``--repeats`` times, interleaved (so a burst of load hits all alike). Reported per spectrum:
the best, median and worst wall-clock time, the largest kernel (system) CPU time of a run, and the minor
page faults per call. A slow run with kernel time is the cost of getting new output memory from the
kernel, not of the arithmetic. The machine load is printed before and after: the figures are wall-clock
times on whatever else the machine is running.

``--accuracy`` also prints the "fit's maths" table of ``docs/science.md``: rms and mean of ``C_fit/C − 1``
over the detector pixels of 300 spectra per S/N, for a sinusoidal and a per-chip quadratic true continuum.
Those spectra come from the quadratic truth and the shipped pixels are that truth's line-free pixels, so the
table checks the fit and its noise propagation, not continuum accuracy on spectra whose truth chose nothing
(that is ``bench/bench_labels.py``, on the independent truth with pixels derived from its training set).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

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


def accuracy_table(model: TruthModel, n_spectra: int = 300) -> None:
    wavelength, mask, detector = apogee_wavelength(), load_continuum_pixels(), apogee_detector_mask()
    print(f"accuracy over the detector pixels, {n_spectra} spectra per S/N (rms, and as a multiple of 1/SNR)")
    print("| S/N | rms (sinusoidal truth) | bias | rms (per-chip quadratic truth) | bias |")
    print("| --- | --- | --- | --- | --- |")
    for snr in (25, 50, 100, 200):
        cells = []
        for kind in ("sinusoid", "quadratic"):
            rng = np.random.default_rng([snr, 7])
            spectra = make_spectra(model, draw_labels(n_spectra, rng), snr, rng=rng, continuum_kind=kind)
            fitted = fit_sinusoidal_continuum(wavelength, spectra.flux, spectra.ivar, mask)
            ratio = (fitted / spectra.continuum - 1.0)[:, detector]
            rms = np.sqrt(np.mean(ratio**2))
            cells += [f"{rms:.4f} ({rms * snr:.3f}/SNR)", f"{ratio.mean():+.1e}"]
        print(f"| {snr} | " + " | ".join(cells) + " |")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-spectra", type=int, default=2000)
    parser.add_argument("--n-naive", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--accuracy", action="store_true", help="also print the accuracy table")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    rng = np.random.default_rng(2024)
    model = TruthModel.default(seed=0)
    spectra = make_spectra(model, draw_labels(args.n_spectra, rng), 50.0, rng=rng)
    wavelength, mask = apogee_wavelength(), load_continuum_pixels()
    flux, ivar = spectra.flux, spectra.ivar
    n_naive = min(args.n_naive, args.n_spectra)
    preallocated = tuple(np.full(flux.shape, np.nan) for _ in range(3))  # touched: reused memory

    cases = {
        "fit only (float64)": (
            args.n_spectra,
            lambda: fit_sinusoidal_continuum(wavelength, flux, ivar, mask),
        ),
        "fit + normalise (float64)": (
            args.n_spectra,
            lambda: continuum_normalize(wavelength, flux, ivar, mask),
        ),
        "fit + normalise (float32)": (
            args.n_spectra,
            lambda: continuum_normalize(wavelength, flux, ivar, mask, dtype=np.float32),
        ),
        "fit + normalise (out=)": (
            args.n_spectra,
            lambda: continuum_normalize(wavelength, flux, ivar, mask, out=preallocated),
        ),
        "naive lstsq loop": (n_naive, lambda: naive(wavelength, flux[:n_naive], ivar[:n_naive], mask)),
    }
    times = {name: [] for name in cases}
    faults = {name: [] for name in cases}
    system = {name: [] for name in cases}  # kernel CPU time (page faults of new memory), ms/spectrum
    results = {}
    load_before = loadavg()
    for _ in range(args.repeats):
        for name, (count, function) in cases.items():
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            results[name] = function()
            times[name].append(1e3 * (time.perf_counter() - start) / count)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults[name].append(after.ru_minflt - before.ru_minflt)
            system[name].append(1e3 * (after.ru_stime - before.ru_stime) / count)
            if name not in ("fit only (float64)", "naive lstsq loop"):
                del results[name]  # keep one copy of the large outputs at a time
    load_after = loadavg()

    print(
        f"spectra: {args.n_spectra} (naive: {n_naive}), continuum pixels: {mask.sum()}, "
        f"{args.repeats} interleaved runs each"
    )
    print(f"load average (1, 5, 15 min): {load_before} before, {load_after} after")
    print(
        f"{'ms/spectrum':27s} {'best':>7s} {'median':>7s} {'worst':>7s}  {'kernel (max)':>12s}"
        "  page faults/call"
    )
    for name in cases:
        print(
            f"{name:27s} {min(times[name]):7.3f} {np.median(times[name]):7.3f} {max(times[name]):7.3f}"
            f"  {max(system[name]):12.3f}  {int(np.median(faults[name])):>16d}"
        )
    naive_best, naive_median = min(times["naive lstsq loop"]), np.median(times["naive lstsq loop"])
    total = "fit + normalise (float64)"
    print(
        f"speed-up of fit + normalise (float64) over the naive loop: {naive_best / min(times[total]):.1f}x "
        f"(best), {naive_median / np.median(times[total]):.1f}x (median)"
    )

    continuum = results["fit only (float64)"]
    flux_norm, _, _ = continuum_normalize(wavelength, flux[:n_naive], ivar[:n_naive], mask)
    naive_flux, _ = results["naive lstsq loop"]
    detector = apogee_detector_mask()
    error = (continuum / spectra.continuum - 1.0)[:, detector]
    difference = np.abs(flux_norm - naive_flux)[:, detector].max()
    print(
        f"accuracy at S/N 50: rms(C_fit/C - 1) = {error.std():.2e} ({50 * error.std():.3f}/SNR), "
        f"bias = {error.mean():+.1e}"
    )
    print(f"max |flux_norm batched - naive| = {difference:.1e} (naive has no ridge)")
    if args.accuracy:
        accuracy_table(model)


if __name__ == "__main__":
    main()
