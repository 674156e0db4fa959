"""Choose The Payne's network and continuum-pixel tolerance by cross-validation on a training set alone
(never on test scores).

Usage::

    .venv/bin/python bench/payne_cv.py TRAINING_TABLE [--hidden 64,9 64,19 128,19] [--holdout 5]
        [--tolerance 0.002 0.005] [--correction default off 0 1 2 3]

Reads the training table and its spectra the way ``TrainThePayne`` does
(:func:`astra_provider.contrib.label_tasks.read_training_set`: continuum pixels derived from the training
set with each ``--tolerance`` of the pixel criterion, Sinusoidal normalisation), holds out every
``--holdout``-th star, trains one emulator per ``--hidden`` setting on the others and fits the held-out
stars. Prints per setting the training time and the bias and scatter of the held-out labels against their
*training-table* labels, with the load average; per ``--correction`` setting of the test step's joint
continuum correction (``default``, ``off``, or its degree). At the training S/N that scatter is the
emulator's error plus the effect of each held-out spectrum's continuum noise. (The continuum pixels are
derived from all the training stars, held-out ones included.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _cross_validate(training, hidden: tuple[int, ...], args) -> None:
    """Train on all but every ``args.holdout``-th star, fit those, print their label residuals."""
    from astra_provider.contrib.label_tasks import NAMED_LABELS
    from astra_provider.science.payne import fit, train

    held = np.zeros(training.n_training, dtype=bool)
    held[:: args.holdout] = True
    started = time.perf_counter()
    model = train(
        training.labels[~held],
        training.flux[~held],
        training.ivar[~held],
        NAMED_LABELS,
        training.wavelength,
        hidden_sizes=hidden,
        max_iterations=args.max_iterations,
    )
    seconds = time.perf_counter() - started
    n_held = int(held.sum())
    print(f"  hidden {hidden}: {held.size - n_held} trained, {n_held} held out; train {seconds:.0f} s")
    for correction in args.correction:
        settings = _correction_settings(correction)
        result = fit(model, training.flux[held], training.ivar[held], **settings)
        residual = result.labels - training.labels[held]
        cells = ", ".join(
            f"{name} {np.nanmean(residual[:, k]):+.4g} ± {np.nanstd(residual[:, k]):.4g}"
            for k, name in enumerate(NAMED_LABELS)
        )
        print(f"    correction {correction}: held-out bias ± scatter: {cells}")


def _correction_settings(correction: str) -> dict:
    """``fit`` keywords of a ``--correction`` value: ``default``, ``off`` or a degree."""
    if correction == "default":
        return {}
    if correction == "off":
        return {"continuum_correction": False}
    return {"correction_deg": int(correction)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("training_table")
    parser.add_argument("--hidden", nargs="+", default=["64,9"])
    parser.add_argument("--holdout", type=int, default=5, help="hold out every N-th star")
    parser.add_argument("--max-iterations", type=int, default=2000)
    parser.add_argument("--tolerance", type=float, nargs="+", default=[0.005], help="pixel criterion")
    parser.add_argument("--correction", nargs="+", default=["default"], help="default, off, or a degree")
    args = parser.parse_args(argv)
    from astra_provider.contrib.label_tasks import NAMED_LABELS, read_training_set

    print(f"load average at start: {os.getloadavg()}")
    for tolerance in args.tolerance:
        started = time.perf_counter()
        training = read_training_set(
            args.training_table,
            NAMED_LABELS,
            2 * args.holdout,
            "cross-validation",
            deg=3,
            length_scale=1400.0,
            pixel_tolerance=tolerance,
        )
        pixels = int(training.continuum_pixels.sum())
        seconds = time.perf_counter() - started
        print(f"tolerance {tolerance}: {pixels} pixels; read + derive + normalise: {seconds:.0f} s")
        for setting in args.hidden:
            _cross_validate(training, tuple(int(h) for h in setting.split(",")), args)
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
