"""Label accuracy on a truth that chose none of the method's settings: the independent survey, whole tasks.

Usage::

    .venv/bin/python bench/bench_labels.py [--workdir DIR] [--n-train 1250] [--n-test 1250]
        [--snr 25 50 100]

What it does (one run prints everything, with the load average):

1. Makes (once; cached in ``--workdir``) the independent survey
   (:func:`astra_provider.synthetic.independent_survey.independent_survey`): ``--n-train`` stars at S/N 150
   and the same ``--n-test`` stars at each ``--snr``, apStar files from
   :class:`~astra_provider.synthetic.independent.IndependentTruthModel`, with their Cramér–Rao bounds.
2. Runs each *method* on it. A method is a function ``(survey, scratch) -> MethodResult`` (labels of the
   test stars per S/N, in the survey's star order); :data:`METHODS` lists them:

   - ``cannon``: The Cannon through the tasks, on an SQLite astra database in the scratch directory:
     ``TrainTheCannon`` (continuum pixels derived from the training set), ``SinusoidalContinuum`` with the
     model's pixels (``model_path``), ``TestTheCannon``; read + science + write + record;
   - ``cannon-truth-continuum``: the same quadratic Cannon (``science.cannon.train`` / ``fit``) on
     truth-normalised spectra (flux divided by the true continuum): what a perfect continuum would give.

   Another label method (e.g. The Payne) is one more entry in :data:`METHODS`.
3. Prints per label and S/N: bias, scatter (std), the rms Cramér–Rao bound and scatter/bound for every
   method; the ratio of the first two methods' scatters (the cost of the continuum; target <= 1.15); and the
   continuum accuracy: rms over detector pixels and stars of (task-normalised flux / truth-normalised flux
   - 1), times S/N (target <= 0.3).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LABELS = (("teff", "K", "{:.1f}"), ("logg", "dex", "{:.4f}"), ("fe_h", "dex", "{:.4f}"))


@dataclass
class MethodResult:
    """Fitted labels (n_test, 3) per S/N, in the survey's star order, and what else a method reports."""

    labels: dict[float, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    normalised_paths: dict[float, list[str]] = field(default_factory=dict)


def run_cannon_tasks(survey, scratch: Path) -> MethodResult:
    """The Cannon through its three tasks (see the module docstring)."""
    from astra_provider import database
    from astra_provider.contrib.continuum import SinusoidalContinuum
    from astra_provider.contrib.thecannon import TestTheCannon, TrainTheCannon
    from astra_provider.science.cannon import CannonModel

    database.configure(f"sqlite:///{scratch / 'astra.db'}")
    model_path = scratch / "cannon.npz"
    seconds = {}
    started = time.perf_counter()
    TrainTheCannon(input_data_products=str(survey.training_table), output_path=str(model_path)).execute()
    seconds["TrainTheCannon"] = time.perf_counter() - started
    model = CannonModel.load(model_path)
    info = model.metadata["continuum_pixels"]
    notes = [
        f"derived continuum pixels: {info['n_pixels']} ({'/'.join(map(str, info['n_per_region']))} per "
        f"region; {info['n_passing_thresholds']} passed the threshold), set {info['id']}"
    ]
    labels, normalised = {}, {}
    for snr in survey.snrs:
        paths = [str(p) for p in survey.test_paths(snr)]
        started = time.perf_counter()
        continuum = SinusoidalContinuum(
            input_data_products=paths, output_dir=str(scratch / f"norm-{snr:g}"), model_path=str(model_path)
        )
        continuum.execute()
        seconds[f"SinusoidalContinuum S/N {snr:g}"] = time.perf_counter() - started
        outputs = [task.output_data_products[0].path for task in continuum.tasks]
        started = time.perf_counter()
        fitted = TestTheCannon(input_data_products=outputs, model_path=str(model_path)).execute()
        seconds[f"TestTheCannon S/N {snr:g}"] = time.perf_counter() - started
        labels[snr] = np.array([[row[name] for name, _, _ in LABELS] for row in fitted], dtype=float)
        normalised[snr] = outputs
    database.configure(None)
    return MethodResult(labels, seconds, notes, normalised)


def run_cannon_truth_continuum(survey, scratch: Path) -> MethodResult:
    """The quadratic Cannon on truth-normalised spectra (no continuum error)."""
    from astra_provider.science.cannon import fit, train
    from astra_provider.synthetic.independent_survey import truth_labels, truth_normalized

    started = time.perf_counter()
    wavelength, flux, ivar = truth_normalized(survey.training)
    model = train(truth_labels(survey.training), flux, ivar, [n for n, _, _ in LABELS], wavelength)
    labels = {}
    for snr in survey.snrs:
        _, flux, ivar = truth_normalized(survey.tests[snr])
        labels[snr] = fit(model, flux, ivar).labels
    return MethodResult(labels, {"read + train + fit": time.perf_counter() - started})


#: (name, description, function) of every method in the table. The first two define the continuum ratio.
METHODS: list[tuple[str, str, Callable]] = [
    ("cannon", "The Cannon, tasks, data-driven continuum pixels", run_cannon_tasks),
    ("cannon-truth", "same quadratic Cannon, truth-normalised spectra", run_cannon_truth_continuum),
]


def continuum_accuracy(survey, result: MethodResult) -> dict[float, tuple[float, float]]:
    """Per S/N: (bias, rms) over usable pixels and stars of normalised flux / truth-normalised flux − 1."""
    from astra_provider.contrib.continuum import read_normalized
    from astra_provider.synthetic.independent_survey import truth_normalized

    out = {}
    for snr, paths in result.normalised_paths.items():
        _, truth_flux, truth_ivar = truth_normalized(survey.tests[snr])
        spectra = [read_normalized(path) for path in paths]
        flux = np.array([spectrum.flux[0] for spectrum in spectra])
        ivar = np.array([spectrum.ivar[0] for spectrum in spectra])
        good = (ivar > 0) & (truth_ivar > 0) & (np.abs(truth_flux) > 0.05)
        ratio = flux[good] / truth_flux[good] - 1.0
        out[snr] = (float(ratio.mean()), float(np.sqrt(np.mean(ratio**2))))
    return out


def print_table(survey, results: dict[str, MethodResult], names: list[str]) -> None:
    truth = survey.test_labels()
    print(f"\nlabels of {len(truth)} test stars per S/N (fitted - truth); bound = rms Cramér-Rao bound")
    head = f"{'label':<6} {'S/N':>4} " + " ".join(
        f"| {name + ' bias':>18} {'scatter':>8} {'/bound':>7}" for name in names
    )
    print(f"{head} | {'bound':>8} | {names[0]}/{names[1]}")
    for k, (label, unit, fmt) in enumerate(LABELS):
        for snr in survey.snrs:
            bound = float(np.sqrt(np.mean(survey.bound(snr)[:, k] ** 2)))
            cells, scatters = [], []
            for name in names:
                residual = results[name].labels[snr][:, k] - truth[:, k]
                residual = residual[np.isfinite(residual)]
                scatter = float(np.std(residual))
                scatters.append(scatter)
                cells.append(
                    f"| {fmt.format(np.mean(residual)):>18} {fmt.format(scatter):>8} {scatter / bound:>7.1f}"
                )
            ratio = scatters[0] / scatters[1]
            print(f"{label:<6} {snr:>4g} {' '.join(cells)} | {fmt.format(bound):>8} | {ratio:.2f}  ({unit})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench-cache" / "labels")
    parser.add_argument("--n-train", type=int, default=1250)
    parser.add_argument("--n-test", type=int, default=1250)
    parser.add_argument("--snr", type=float, nargs="+", default=[25.0, 50.0, 100.0])
    parser.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS], help="names in METHODS")
    args = parser.parse_args(argv)
    from astra_provider.synthetic.independent_survey import independent_survey

    print(f"load average at start: {os.getloadavg()}")
    started = time.perf_counter()
    survey = independent_survey(
        args.workdir / f"survey-{args.n_train}-{args.n_test}", args.n_train, args.n_test, tuple(args.snr)
    )
    print(f"survey ready in {time.perf_counter() - started:.0f} s: {survey.root}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-labels-"))
    os.environ["ASTRA_HOME"] = str(scratch)
    results = {}
    try:
        for name, description, method in METHODS:
            if name not in args.methods:
                continue
            started = time.perf_counter()
            results[name] = method(survey, scratch)
            timing = ", ".join(f"{k} {v:.1f} s" for k, v in results[name].seconds.items())
            print(f"{name} ({description}): {time.perf_counter() - started:.0f} s [{timing}]")
            for note in results[name].notes:
                print(f"  {note}")
        names = [name for name, _, _ in METHODS if name in results]
        if len(names) >= 2:
            print_table(survey, results, names)
        if "cannon" in results:
            print("\ncontinuum: normalised flux / truth-normalised flux - 1 over usable pixels and stars")
            for snr, (bias, rms) in continuum_accuracy(survey, results["cannon"]).items():
                print(
                    f"  S/N {snr:>4g}: bias {bias:+.5f}, rms {rms:.5f} = {rms * snr:.3f}/SNR (target 0.3/SNR)"
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
