"""Choose The Payne's network and continuum-pixel tolerance by cross-validation on a training set alone
(never on test scores).

Usage::

    .venv/bin/python bench/payne_cv.py TRAINING_TABLE [--hidden 64,9 64,19 128,19] [--holdout 5]
        [--folds 5] [--tolerance 0.002 0.005] [--correction default off 0 1 2 3]
        [--train "" n_rounds=3 patience=400,max_iterations=4000]

Reads the training table and its spectra the way ``TrainThePayne`` does
(:func:`astra_provider.contrib.label_tasks.read_training_set`: continuum pixels derived from the training
set with each ``--tolerance`` of the pixel criterion, Sinusoidal normalisation), holds out every
``--holdout``-th star, trains one emulator per ``--hidden`` setting on the others and fits the held-out
stars; with ``--folds`` k, k times with the held-out stars shifted by one (``--folds 5 --holdout 5``:
every star held out once), pooling the residuals. Prints per setting the training time and the bias and
scatter of the held-out labels against their *training-table* labels, with the load average; per
``--correction`` setting of the test step's joint continuum correction (``default``, ``off``, or its
degree); per ``--train`` setting (other keywords of :func:`~astra_provider.science.payne.train`,
``name=value[,name=value]``; empty for the defaults). At the training S/N that scatter is the emulator's
error plus the effect of each held-out spectrum's continuum noise. (The continuum pixels are derived from
all the training stars, held-out ones included.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _cross_validate(training, hidden: tuple[int, ...], args, extra: dict) -> None:
    """For each of ``args.folds`` folds, train on all but every ``args.holdout``-th star (from the fold's
    offset) and fit those; print the label residuals pooled over the folds."""
    from astra_provider.contrib.label_tasks import NAMED_LABELS
    from astra_provider.science.payne import fit, train

    residuals: dict[str, list[np.ndarray]] = {correction: [] for correction in args.correction}
    seconds = []
    for offset in range(args.folds):
        held = np.zeros(training.n_training, dtype=bool)
        held[offset :: args.holdout] = True
        started = time.perf_counter()
        model = train(
            training.labels[~held],
            training.flux[~held],
            training.ivar[~held],
            NAMED_LABELS,
            training.wavelength,
            hidden_sizes=hidden,
            **{**({} if args.max_iterations is None else {"max_iterations": args.max_iterations}), **extra},
        )
        seconds.append(time.perf_counter() - started)
        for correction in args.correction:
            result = fit(model, training.flux[held], training.ivar[held], **_correction_settings(correction))
            residuals[correction].append(result.labels - training.labels[held])
    n_held = sum(len(r) for r in residuals[args.correction[0]])
    print(
        f"  hidden {hidden} {extra or ''}: {args.folds} fold(s), {n_held} held out in all; "
        f"train {np.mean(seconds):.0f} s per fold"
    )
    for correction, parts in residuals.items():
        residual = np.concatenate(parts)
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


def _train_settings(text: str) -> dict:
    """``train`` keywords of a ``--train`` value: ``name=value[,name=value]`` (numbers), or empty."""
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {name: float(value) if "." in value or "e" in value else int(value) for name, value in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("training_table")
    parser.add_argument("--hidden", nargs="+", default=["64,14"])
    parser.add_argument("--holdout", type=int, default=5, help="hold out every N-th star")
    parser.add_argument("--folds", type=int, default=1, help="folds (offsets of the held-out stars)")
    parser.add_argument("--max-iterations", type=int, help="train's max_iterations (default: its own)")
    parser.add_argument("--tolerance", type=float, nargs="+", default=[0.005], help="pixel criterion")
    parser.add_argument("--correction", nargs="+", default=["default"], help="default, off, or a degree")
    parser.add_argument("--train", nargs="+", default=[""], help="train keywords: name=value[,name=value]")
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
            for extra in args.train:
                hidden = tuple(int(h) for h in setting.split(","))
                _cross_validate(training, hidden, args, _train_settings(extra))
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
