"""Benchmark The Payne (astra_provider.science.payne) against The Cannon on the same data, in the same run.

Usage::

    .venv/bin/python bench/bench_payne.py [--source truth-model] [--n-train 1250] [--n-test 300]
        [--snr 25 50 100] [--continuum] [--hidden 64 9] [--skip-cannon]

What it does:

1. Builds a :class:`BenchData` with a *data source*: a function ``(n_train, n_test, snrs, seed, continuum) ->
   BenchData`` (see :data:`DATA_SOURCES`). The default ``truth-model`` source draws normalised synthetic
   apStar spectra from ``astra_provider.synthetic.model`` (training at S/N 150 with intrinsic scatter, test
   stars at each S/N) and their Cramér-Rao bounds (with the scatter), like ``bench/bench_cannon.py``;
   ``--continuum`` multiplies them by a random continuum and normalises them with the Sinusoidal method
   (deg 3, L = 1400 Å) as the pipeline does. Another survey plugs in as another source.
2. Trains The Payne and The Cannon on the same training spectra (wall and CPU time), then fits every test
   spectrum in one batch (ms/star, best of two).
3. Prints timings, the Payne/Cannon ratios, and per label and S/N: rms, bias and median formal error
   against the bound, and the targets (rms <= 1.5 bounds at S/N 25 and 50, <= 2 at 100; |bias| <= 0.3 rms),
   with the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

TRAIN_SNR = 150.0
#: Targets: rms / bound at each S/N (other S/N: the S/N 100 target), and |bias| / rms.
RMS_TARGETS = {25.0: 1.5, 50.0: 1.5, 100.0: 2.0}
BIAS_TARGET = 0.3


@dataclass
class BenchData:
    """Training and test spectra with their true labels and the Cramér-Rao bounds of the test labels."""

    description: str
    label_names: tuple[str, ...]
    wavelength: np.ndarray
    train_labels: np.ndarray
    train_flux: np.ndarray
    train_ivar: np.ndarray
    test_labels: np.ndarray
    test_flux: np.ndarray
    test_ivar: np.ndarray
    test_snr: np.ndarray
    test_bound: np.ndarray


def truth_model_data(
    n_train: int, n_test: int, snrs: Sequence[float], seed: int = 2024, continuum: bool = False
) -> BenchData:
    """Spectra of the synthetic line-list truth model (``astra_provider.synthetic.model``)."""
    from astra_provider.science.continuum import continuum_normalize, load_continuum_pixels
    from astra_provider.synthetic.model import (
        TruthModel,
        apogee_wavelength,
        crb_labels,
        draw_labels,
        make_spectra,
    )

    truth = TruthModel.default(seed=0)
    rng = np.random.default_rng(seed)
    wavelength = apogee_wavelength()
    mask = load_continuum_pixels()

    def spectra(labels: np.ndarray, snr) -> tuple[np.ndarray, np.ndarray]:
        made = make_spectra(truth, labels, snr, rng=rng, continuum=continuum)
        if not continuum:
            return made.flux, made.ivar
        flux, ivar, _ = continuum_normalize(wavelength, made.flux, made.ivar, mask, on_failure="nan")
        return flux, ivar

    train_labels = draw_labels(n_train, rng)
    train_flux, train_ivar = spectra(train_labels, TRAIN_SNR)
    test_labels = draw_labels(n_test * len(snrs), rng)
    test_snr = np.repeat(np.asarray(snrs, dtype=float), n_test)
    test_flux, test_ivar = spectra(test_labels, test_snr)
    return BenchData(
        description=(
            f"synthetic truth model (TruthModel seed 0), {'Sinusoidal-' if continuum else ''}normalised "
            f"spectra; train S/N {TRAIN_SNR:g} with intrinsic scatter"
        ),
        label_names=("teff", "logg", "fe_h"),
        wavelength=wavelength,
        train_labels=train_labels,
        train_flux=train_flux,
        train_ivar=train_ivar,
        test_labels=test_labels,
        test_flux=test_flux,
        test_ivar=test_ivar,
        test_snr=test_snr,
        test_bound=crb_labels(truth, test_labels, test_snr, include_scatter=True),
    )


#: Data sources by name: functions ``(n_train, n_test, snrs, seed=..., continuum=...) -> BenchData``.
DATA_SOURCES: dict[str, Callable[..., BenchData]] = {"truth-model": truth_model_data}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} CPUs"


def run_method(name: str, data: BenchData, hidden: Sequence[int] | None) -> dict:
    """Train and test one method; timings and the fitted labels."""
    if name == "payne":
        from astra_provider.science.payne import fit, train

        def do_train():
            return train(
                data.train_labels,
                data.train_flux,
                data.train_ivar,
                data.label_names,
                data.wavelength,
                hidden_sizes=hidden,
            )
    else:
        from astra_provider.science.cannon import fit, train

        def do_train():
            return train(
                data.train_labels, data.train_flux, data.train_ivar, data.label_names, data.wavelength
            )

    load_before = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    model = do_train()
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    best, result = np.inf, None
    for _ in range(2):
        start = time.perf_counter()
        result = fit(model, data.test_flux, data.test_ivar)
        best = min(best, time.perf_counter() - start)
    return {
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu,
        "test_ms_per_star": 1e3 * best / len(data.test_flux),
        "load": (load_before, os.getloadavg()[0]),
        "result": result,
        "model": model,
    }


def accuracy(data: BenchData, result) -> dict[float, dict[str, np.ndarray]]:
    """Per test S/N: rms, bias and median formal error of each label, and the rms bound."""
    out = {}
    for snr in np.unique(data.test_snr):
        rows = data.test_snr == snr
        error = result.labels[rows] - data.test_labels[rows]
        out[float(snr)] = {
            "rms": np.sqrt(np.nanmean(error**2, axis=0)),
            "bias": np.nanmean(error, axis=0),
            "formal": np.nanmedian(result.e_labels[rows], axis=0),
            "bound": np.sqrt(np.mean(data.test_bound[rows] ** 2, axis=0)),
            "rchi2": float(np.nanmedian(result.reduced_chi_sq[rows])),
            "flagged": int(np.count_nonzero(result.flags[rows])),
            "n": int(rows.sum()),
        }
    return out


def print_report(data: BenchData, runs: dict[str, dict]) -> bool:
    """Print the tables; returns whether The Payne met every accuracy target."""
    p = data.train_flux.shape[1]
    print(f"\n== {data.description}: {len(data.train_flux)} training x {p} px, {len(data.test_flux)} test ==")
    print(f"{'method':<8}{'train [s]':>11}{'CPU [s]':>10}{'test ms/star':>14}   load (start -> end)")
    for name, run in runs.items():
        print(
            f"{name:<8}{run['train_seconds']:>11.1f}{run['train_cpu_seconds']:>10.1f}"
            f"{run['test_ms_per_star']:>14.3f}   {run['load'][0]:.1f} -> {run['load'][1]:.1f}"
        )
    if {"payne", "cannon"} <= set(runs):
        payne, cannon = runs["payne"], runs["cannon"]
        print(
            f"Payne / Cannon: training time x{payne['train_seconds'] / cannon['train_seconds']:.1f}, "
            f"test time x{payne['test_ms_per_star'] / cannon['test_ms_per_star']:.2f}"
        )
    history = runs["payne"]["model"].metadata["history"] if "payne" in runs else []
    for index, round_ in enumerate(history):
        print(
            f"Payne round {index + 1}: {round_['n_components']} components, {round_['iterations']} "
            f"iterations (best {round_['best_iteration']}), {round_['seconds']:.1f} s in the optimiser"
        )
    tables = {name: accuracy(data, run["result"]) for name, run in runs.items()}
    met = True
    print("\n== Labels: rms / bias / median formal error, rms in bounds (CRB with the intrinsic scatter) ==")
    for snr in sorted(next(iter(tables.values()))):
        bound = next(iter(tables.values()))[snr]["bound"]
        cells = "  ".join(f"{n} {b:.4g}" for n, b in zip(data.label_names, bound, strict=True))
        rms_target = RMS_TARGETS.get(snr, RMS_TARGETS[100.0])
        print(f"-- S/N {snr:g} ({tables[next(iter(tables))][snr]['n']} stars): bound {cells}")
        for name, table in tables.items():
            row = table[snr]
            ratio, bias_ratio = row["rms"] / row["bound"], np.abs(row["bias"]) / row["rms"]
            cells = "  ".join(
                f"{n} {r:.4g}/{b:+.2g}/{f:.3g} ({q:.2f} CRB, |bias| {bq:.2f} rms)"
                for n, r, b, f, q, bq in zip(
                    data.label_names, row["rms"], row["bias"], row["formal"], ratio, bias_ratio, strict=True
                )
            )
            ok = bool(np.all(ratio <= rms_target) and np.all(bias_ratio <= BIAS_TARGET))
            if name == "payne":
                met &= ok
            verdict = (
                "meets" if ok else "MISSES"
            ) + f" targets (rms <= {rms_target:g} CRB, |bias| <= 0.3 rms)"
            print(f"   {name:<7}{cells}  rchi2 {row['rchi2']:.3f}, {row['flagged']} flagged; {verdict}")
        if {"payne", "cannon"} <= set(tables):
            ratio = tables["payne"][snr]["rms"] / tables["cannon"][snr]["rms"]
            print(
                "   rms Payne / Cannon: " + "  ".join(f"{n} {r:.2f}" for n, r in zip(data.label_names, ratio))
            )
    return met


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=sorted(DATA_SOURCES), default="truth-model")
    parser.add_argument("--n-train", type=int, default=1250)
    parser.add_argument("--n-test", type=int, default=300, help="test stars per S/N")
    parser.add_argument("--snr", type=float, nargs="+", default=[25.0, 50.0, 100.0])
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--continuum", action="store_true", help="add a continuum and normalise it away")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="Payne hidden-layer widths")
    parser.add_argument("--skip-cannon", action="store_true")
    args = parser.parse_args(argv)

    print(f"generating data ({args.source}) ... {load()}", flush=True)
    start = time.perf_counter()
    data = DATA_SOURCES[args.source](
        args.n_train, args.n_test, args.snr, seed=args.seed, continuum=args.continuum
    )
    print(f"data ready in {time.perf_counter() - start:.0f} s", flush=True)
    runs = {}
    for name in ("payne",) if args.skip_cannon else ("payne", "cannon"):
        print(f"running {name} ... {load()}", flush=True)
        runs[name] = run_method(name, data, args.hidden)
    met = print_report(data, runs)
    print(f"\n({load()} at the end; numpy {np.__version__}, Python {sys.version.split()[0]})")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
