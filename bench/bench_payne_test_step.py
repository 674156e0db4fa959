"""The Payne's test step with and without the joint continuum correction: ms/star on the independent survey.

Usage::

    .venv/bin/python bench/bench_payne_test_step.py [--workdir DIR] [--snr 50] [--repeats 3]

Trains The Payne (default settings) on the survey's truth-normalised training spectra (the survey of
``bench/bench_labels.py``, made once and cached in ``--workdir``), then times
:func:`astra_provider.science.payne.fit` on the truth-normalised test spectra at ``--snr`` with
``continuum_correction=False`` (the baseline) and ``True``, alternating, ``--repeats`` times each. Prints the
best wall and CPU time per star of each and their ratio, with the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SURVEY_SNRS = (25.0, 50.0, 100.0)  # those of bench_labels.py, so that its cached survey is reused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench-cache" / "labels")
    parser.add_argument("--n-train", type=int, default=1250)
    parser.add_argument("--n-test", type=int, default=1250)
    parser.add_argument("--snr", type=float, default=50.0, choices=SURVEY_SNRS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from astra_provider.science.payne import fit, train
    from astra_provider.synthetic.independent_survey import independent_survey, truth_labels, truth_normalized

    print(f"load average at start: {os.getloadavg()}")
    survey = independent_survey(
        args.workdir / f"survey-{args.n_train}-{args.n_test}", args.n_train, args.n_test, SURVEY_SNRS
    )
    wavelength, flux, ivar = truth_normalized(survey.training)
    started = time.perf_counter()
    model = train(truth_labels(survey.training), flux, ivar, ["teff", "logg", "fe_h"], wavelength)
    print(f"trained in {time.perf_counter() - started:.1f} s")
    _, flux, ivar = truth_normalized(survey.tests[args.snr])
    best = {False: (float("inf"), float("inf")), True: (float("inf"), float("inf"))}
    for _ in range(args.repeats):
        for correction in (False, True):
            wall, cpu = time.perf_counter(), time.process_time()
            fit(model, flux, ivar, continuum_correction=correction)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[correction] = (min(best[correction][0], wall), min(best[correction][1], cpu))
    n = len(flux)
    for correction, (wall, cpu) in best.items():
        name = "with correction" if correction else "without (baseline)"
        print(f"{name:>20}: {1e3 * wall / n:.3f} ms/star wall, {1e3 * cpu / n:.3f} ms/star CPU")
    wall_ratio, cpu_ratio = best[True][0] / best[False][0], best[True][1] / best[False][1]
    print(f"ratio with/without: wall {wall_ratio:.2f}, CPU {cpu_ratio:.2f}")
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
