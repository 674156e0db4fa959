"""Radial velocities on a truth that chose none of Doppler's settings: apVisits of the independent model.

Usage::

    .venv/bin/python bench/bench_rv_independent.py [--workdir DIR] [--n-visits 300]

1. Trains The Cannon on the independent survey's 1,250 training stars (S/N 150) through ``TrainTheCannon``,
   which derives the continuum pixels from them (:func:`astra_provider.synthetic.independent_survey.
   independent_survey`; cached in ``--workdir``). That model is Doppler's template grid.
2. Writes ``--n-visits`` apVisit files of other stars of the same truth model (one visit each, S/N 20–200
   log-uniform, no intrinsic scatter; cached).
3. Measures them with the ``DopplerRadialVelocity`` task (read + science + rows + provenance, a fresh
   SQLite astra database in the work directory). The task normalises each visit with the model's own continuum
   pixels, the set its training spectra were normalised with.
4. For comparison, measures the same arrays with
   :func:`~astra_provider.science.doppler.measure_visit_radial_velocities` and the shipped
   synthetic-quadratic pixel list (``continuum_mask=``), which the visits' continuum used before models
   carried their pixels: that list is the line-free pixels of *another* truth model.
5. Prints per S/N bin the rms error against the Cramér–Rao bound for the visit's own pixels, the bias, the
   scatter of error/u_vrel, the flags, and ms per visit, with the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_rv import visit_pixel_crb  # noqa: E402

BINS = ((0.0, 35.0), (35.0, 60.0), (60.0, 100.0), (100.0, np.inf), (0.0, np.inf))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(name: str, error: np.ndarray, u_vrel: np.ndarray, crb: np.ndarray, snr: np.ndarray, flags) -> None:
    """One table: rms / bound, bias and error/u_vrel scatter per S/N bin, and the flag counts."""
    from astra_provider.science.flags import RVFlag

    print(f"\n{name}")
    print("  visit S/N     n   rms m/s   CRB m/s   rms/CRB   bias m/s   std(err/u_vrel)")
    for lo, hi in BINS:
        m = (snr >= lo) & (snr < hi)
        rms, rms_crb = np.sqrt(np.mean(error[m] ** 2)), np.sqrt(np.mean(crb[m] ** 2))
        label = "all" if (lo, hi) == BINS[-1] else (f">= {lo:g}" if hi == np.inf else f"{lo:g}-{hi:g}")
        print(
            f"  {label:>9} {m.sum():>5} {rms * 1e3:>9.1f} {rms_crb * 1e3:>9.1f} {rms / rms_crb:>9.2f} "
            f"{np.mean(error[m]) * 1e3:>+10.1f} {np.std(error[m] / u_vrel[m]):>17.2f}"
        )
    counts = {flag.name: int(np.sum((flags & flag) != 0)) for flag in RVFlag}
    print(
        "  flags: "
        + (", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none")
        + f" (of {error.size})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench-cache" / "rv-independent")
    parser.add_argument("--n-visits", type=int, default=300)
    args = parser.parse_args(argv)

    from astra_provider import database
    from astra_provider.contrib.doppler import DopplerRadialVelocity
    from astra_provider.contrib.thecannon import TrainTheCannon
    from astra_provider.science.continuum import load_continuum_pixels
    from astra_provider.science.doppler import DopplerOptions, measure_visit_radial_velocities
    from astra_provider.sdss.spectrum import read_spectrum
    from astra_provider.synthetic.independent_survey import independent_survey
    from astra_provider.synthetic.survey import generate_survey
    from astra_provider.synthetic.truth import TRUTH_FILENAME, SurveyTruth
    from astra_provider.templates.prepare import prepared_model, template_grids

    print(f"load average at start: {_load()}")
    workdir = args.workdir
    survey = independent_survey(workdir / "survey", n_train=1250, n_test=10, snrs=(50.0,))
    truth = survey.model
    # A fresh astra database per run, so that the task measures every visit (none is already done).
    database_path = workdir / "astra.db"
    database_path.unlink(missing_ok=True)
    database.configure(f"sqlite:///{database_path}")
    model_path = workdir / "cannon.npz"
    if not model_path.exists():
        started = time.perf_counter()
        TrainTheCannon(input_data_products=str(survey.training_table), output_path=str(model_path)).execute()
        print(f"TrainTheCannon on 1,250 training stars: {time.perf_counter() - started:.1f} s")

    root = workdir / f"visits-{args.n_visits}"
    if (root / TRUTH_FILENAME).exists():
        visits_truth = SurveyTruth.read(root / TRUTH_FILENAME)
    else:
        visits_truth = generate_survey(
            root,
            n_stars=args.n_visits,
            visits_per_star=1,
            snr=(20.0, 200.0),
            seed=77,
            filetypes=("apVisit",),
            intrinsic_scatter=False,
            model=truth,
            overwrite=True,
        )
    rows = visits_truth.of_filetype("apVisit")
    paths = [str(root / row["path"]) for row in rows]
    spectra = [read_spectrum(path) for path in paths]
    vrel = np.array([row["rv_applied_kms"] for row in rows], dtype=float)
    vhelio = np.array([row["vhelio_kms"] for row in rows], dtype=float)
    labels = np.array([[row[name] for name in truth.label_names] for row in rows], dtype=float)
    snr = np.array([row["snr"] for row in rows], dtype=float)
    crb = np.array(
        [
            visit_pixel_crb(truth, lab, v, s.wavelength, s.ivar[0], q)
            for lab, v, s, q in zip(labels, vrel, spectra, snr, strict=True)
        ]
    )

    started = time.perf_counter()
    results = DopplerRadialVelocity(input_data_products=paths, model_path=str(model_path)).execute()
    task_ms = (time.perf_counter() - started) / len(paths) * 1e3
    report(
        "DopplerRadialVelocity task, the model's own continuum pixels (the default)",
        np.array([r["vhelio"] for r in results]) - vhelio,
        np.array([r["u_vrel"] for r in results]),
        crb,
        snr,
        np.array([r["flag"] for r in results]),
    )
    print(f"  {task_ms:.2f} ms per visit, whole task (read + science + rows + provenance); load {_load()}")

    models = [prepared_model(grid, "apogee") for grid in template_grids(str(model_path))]
    arrays = ([s.wavelength for s in spectra], [s.flux[0] for s in spectra], [s.ivar[0] for s in spectra])
    started = time.perf_counter()
    shipped = measure_visit_radial_velocities(
        *arrays, models, continuum_mask=load_continuum_pixels(), options=DopplerOptions(label_margin=0.0)
    )
    science_ms = (time.perf_counter() - started) / len(paths) * 1e3
    report(
        "the same visits, the shipped synthetic-quadratic pixel list (science function, as the task had it)",
        shipped.vrel - vrel,
        shipped.u_vrel,
        crb,
        snr,
        shipped.flag,
    )
    print(f"  {science_ms:.2f} ms per visit, science alone; load {_load()}")
    database.configure(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
