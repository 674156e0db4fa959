"""Benchmark The Cannon (astra_provider.science.cannon) against TheCannon 0.7.3 on the synthetic survey.

Usage::

    .venv/bin/python bench/bench_cannon.py [--n-train 10000] [--n-compare 1000] [--n-test 300]
        [--snr 25 50 100] [--threads N] [--skip-thecannon] [--thecannon-full] [--workdir DIR]

What it does (every measurement runs in its own subprocess, so the peak RSS is that of one step):

1. Generates (once, cached in ``--workdir``) normalised synthetic apStar spectra from
   ``astra_provider.synthetic.model``: ``--n-train`` training stars at S/N 150 with intrinsic scatter, and
   ``--n-test`` test stars at each ``--snr``, plus their Cramér–Rao bounds (with the scatter).
2. Trains our model on the first ``--n-compare`` and on all ``--n-train`` stars (float64 inputs) and reports
   wall time, CPU time and the peak RSS during training (Linux VmHWM, reset after loading the data, so it
   includes the resident input arrays, whose RSS is shown separately), then fits all test stars in one batch
   (ms/star, best of two).
3. Runs TheCannon 0.7.3 on exactly the same arrays (the first ``--n-compare`` training stars, the same test
   set), passed as ``.npz`` to ``bench/thecannon_worker.py`` in a separate venv ``.venv-bench-thecannon``
   (created on first use: ``thecannon==0.7.3`` + matplotlib + astropy, same numpy/scipy/astropy versions
   as this venv).
   ``--thecannon-full`` also trains it on all ``--n-train`` stars (≈ 640 s and 10.6 GB at 10,000).
4. Prints timings, the speed ratio, the scatter recovery and the label accuracy (rms, bias, median formal
   error) against the CRB side by side.

The truth is itself a quadratic Cannon model and the spectra are truth-normalised: the bound is exact for a
correct implementation, which is the point here (the maths and the comparison with TheCannon). Accuracy on a
truth that chose none of the method's settings is ``bench/bench_labels.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH_VENV = REPO / ".venv-bench-thecannon"
THECANNON_VERSION = "0.7.3"
TRAIN_SNR = 150.0
SEED = 2024


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


def prepare_data(workdir: Path, n_train: int, n_test: int, snrs: list[float]) -> None:
    """Write train/test arrays as .npy files in ``workdir`` unless an identical set is already there."""
    from astra_provider.synthetic.model import (
        TruthModel,
        apogee_wavelength,
        crb_labels,
        draw_labels,
        make_spectra,
    )

    spec = {"n_train": n_train, "n_test": n_test, "snrs": snrs, "seed": SEED, "train_snr": TRAIN_SNR}
    stamp = workdir / "data.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    start = time.perf_counter()
    truth = TruthModel.default(seed=0)
    rng = np.random.default_rng(SEED)
    train_labels = draw_labels(n_train, rng)
    n_pixels = truth.theta.shape[0]
    flux = np.lib.format.open_memmap(workdir / "train_flux.npy", "w+", np.float64, (n_train, n_pixels))
    ivar = np.lib.format.open_memmap(workdir / "train_ivar.npy", "w+", np.float64, (n_train, n_pixels))
    for first in range(0, n_train, 1000):
        part = slice(first, min(first + 1000, n_train))
        spectra = make_spectra(truth, train_labels[part], TRAIN_SNR, rng=rng, continuum=False)
        flux[part], ivar[part] = spectra.flux, spectra.ivar
    flux.flush()
    ivar.flush()
    del flux, ivar
    test_labels = draw_labels(n_test * len(snrs), rng)
    snr = np.repeat(np.asarray(snrs, dtype=float), n_test)
    test = make_spectra(truth, test_labels, snr, rng=rng, continuum=False)
    np.save(workdir / "train_labels.npy", train_labels)
    np.save(workdir / "test_labels.npy", test_labels)
    np.save(workdir / "test_snr.npy", snr)
    np.save(workdir / "test_flux.npy", test.flux)
    np.save(workdir / "test_ivar.npy", test.ivar)
    np.save(workdir / "test_crb.npy", crb_labels(truth, test_labels, snr, include_scatter=True))
    np.save(workdir / "true_scatter.npy", truth.intrinsic_scatter())
    np.save(workdir / "wavelength.npy", apogee_wavelength())
    stamp.write_text(json.dumps(spec))
    print(f"generated synthetic data in {workdir} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)


def load_rows(path: Path, n: int) -> np.ndarray:
    """The first ``n`` rows of a .npy file, as an in-memory float64 array."""
    rows = np.load(path, mmap_mode="r")
    if n >= rows.shape[0]:
        return np.load(path).astype(np.float64, copy=False)
    return np.array(rows[:n], dtype=np.float64)


# ------------------------------------------------------------------------------------------------------------
# Workers (run in subprocesses)
# ------------------------------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB).

    Linux ``VmHWM`` belongs to the current address space, so unlike ``ru_maxrss`` it does not inherit the
    parent's peak across fork + exec; ``ru_maxrss`` is the fallback elsewhere.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_train(workdir: Path, n: int, threads: int | None) -> dict:
    from astra_provider.science.cannon import train

    labels = load_rows(workdir / "train_labels.npy", n)
    flux = load_rows(workdir / "train_flux.npy", n)
    ivar = load_rows(workdir / "train_ivar.npy", n)
    wavelength = np.load(workdir / "wavelength.npy")
    rss_data = current_rss_mb()
    reset_peak_rss()  # the peak below is that of training (with the data resident), not of loading
    start = time.perf_counter()
    cpu = time.process_time()
    model = train(labels, flux, ivar, ["teff", "logg", "fe_h"], wavelength, n_threads=threads)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    peak = peak_rss_mb()
    model.save(workdir / f"model_{n}.npz", overwrite=True)
    return {
        "n_train": n,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu,
        "peak_rss_mb": peak,
        "rss_after_loading_data_mb": rss_data,
    }


def worker_test(workdir: Path, n: int, threads: int | None) -> dict:
    from astra_provider.science.cannon import CannonModel, fit

    model = CannonModel.load(workdir / f"model_{n}.npz")
    flux, ivar = np.load(workdir / "test_flux.npy"), np.load(workdir / "test_ivar.npy")
    best, result = np.inf, None
    for _ in range(2):
        start = time.perf_counter()
        result = fit(model, flux, ivar, n_threads=threads)
        best = min(best, time.perf_counter() - start)
    np.savez(
        workdir / f"result_{n}.npz",
        labels=result.labels,
        e_labels=result.e_labels,
        reduced_chi_sq=result.reduced_chi_sq,
        flags=result.flags,
        scatter=np.sqrt(model.s2),
    )
    return {"n_test": len(flux), "test_ms_per_star": 1e3 * best / len(flux), "peak_rss_mb": peak_rss_mb()}


def run_worker(args: list[str]) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    completed = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------
# TheCannon 0.7.3
# ------------------------------------------------------------------------------------------------------------


def bench_python() -> Path:
    """Interpreter of the TheCannon benchmark venv, created on first use."""
    python = BENCH_VENV / "bin" / "python"
    probe = [str(python), "-c", "import TheCannon.model, matplotlib"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    import astropy
    import scipy

    print(f"creating {BENCH_VENV} with thecannon=={THECANNON_VERSION} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    packages = [
        f"thecannon=={THECANNON_VERSION}",
        "matplotlib",
        f"numpy=={np.__version__}",
        f"scipy=={scipy.__version__}",
        f"astropy=={astropy.__version__}",  # TheCannon imports astropy.io.fits
    ]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    return python


def run_thecannon(workdir: Path, n: int) -> dict:
    source = workdir / f"thecannon_input_{n}.npz"
    if not source.exists():
        np.savez(
            source,
            wavelength=np.load(workdir / "wavelength.npy"),
            train_labels=load_rows(workdir / "train_labels.npy", n),
            train_flux=load_rows(workdir / "train_flux.npy", n),
            train_ivar=load_rows(workdir / "train_ivar.npy", n),
            test_flux=np.load(workdir / "test_flux.npy"),
            test_ivar=np.load(workdir / "test_ivar.npy"),
        )
    target = workdir / f"thecannon_result_{n}.npz"
    worker = Path(__file__).resolve().parent / "thecannon_worker.py"
    command = [str(bench_python()), str(worker), str(source), str(target)]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def accuracy(workdir: Path, result_file: Path, snrs: list[float]) -> dict[float, dict[str, np.ndarray]]:
    truth, snr = np.load(workdir / "test_labels.npy"), np.load(workdir / "test_snr.npy")
    crb = np.load(workdir / "test_crb.npy")
    with np.load(result_file) as result:
        labels, e_labels = result["labels"], result["e_labels"]
        reduced = result["reduced_chi_sq"] if "reduced_chi_sq" in result.files else None
    out = {}
    for value in snrs:
        select = snr == value
        error = labels[select] - truth[select]
        out[value] = {
            "rms": np.sqrt(np.nanmean(error**2, axis=0)),
            "bias": np.nanmean(error, axis=0),
            "formal": np.nanmedian(e_labels[select], axis=0),
            "crb": np.sqrt(np.mean(crb[select] ** 2, axis=0)),
            "rchi2": np.nanmedian(reduced[select]) if reduced is not None else np.nan,
        }
    return out


def scatter_error(workdir: Path, result_file: Path) -> float:
    true = np.load(workdir / "true_scatter.npy")
    with np.load(result_file) as result:
        fitted = np.abs(result["scatter"])
    detector = np.load(workdir / "test_ivar.npy", mmap_mode="r")[0] > 0
    return float(np.median(np.abs(fitted - true)[detector]))


def print_report(workdir: Path, snrs: list[float], runs: dict[str, dict], results: dict[str, Path]) -> None:
    print("\n== Training (P = 8575 px, K = 3 labels, D = 10 terms, float64 inputs) ==")
    columns = ("N", "wall [s]", "CPU [s]", "peak RSS [GB]", "(data [GB])", "test ms/star")
    widths = (7, 10, 9, 15, 13, 14)
    print(f"{'implementation':<26}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    for name, run in runs.items():
        train_run = run["train"]
        values = (
            f"{train_run['n_train']}",
            f"{train_run['train_seconds']:.1f}",
            f"{train_run.get('train_cpu_seconds', np.nan):.1f}",
            f"{train_run['peak_rss_mb'] / 1024:.2f}",
            f"{train_run['rss_after_loading_data_mb'] / 1024:.2f}",
            f"{run.get('test', train_run).get('test_ms_per_star', np.nan):.2f}",
        )
        print(f"{name:<26}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True)))
    ours = [k for k in runs if k.startswith("astra-provider")]
    theirs = [k for k in runs if k.startswith("TheCannon")]
    for mine in ours:
        for other in theirs:
            if runs[mine]["train"]["n_train"] == runs[other]["train"]["n_train"]:
                ratio_train = runs[other]["train"]["train_seconds"] / runs[mine]["train"]["train_seconds"]
                ratio_test = runs[other]["train"]["test_ms_per_star"] / runs[mine]["test"]["test_ms_per_star"]
                print(
                    f"speed ratio at N = {runs[mine]['train']['n_train']}: training {ratio_train:.0f}x, "
                    f"test step {ratio_test:.0f}x faster than TheCannon {THECANNON_VERSION}"
                )
    print("\n== Intrinsic scatter recovery: median |s_fit - s_true| over detector pixels ==")
    for name, path in results.items():
        print(f"{name:<26}{scatter_error(workdir, path):.2e}")
    print("\n== Test-step label accuracy (rms / bias / median formal error; CRB includes the scatter) ==")
    names = ("Teff [K]", "logg", "[Fe/H]")
    tables = {name: accuracy(workdir, path, snrs) for name, path in results.items()}
    for value in snrs:
        crb = next(iter(tables.values()))[value]["crb"]
        print(f"-- S/N {value:g}: CRB " + "  ".join(f"{n} {c:.4g}" for n, c in zip(names, crb, strict=True)))
        for name, table in tables.items():
            row = table[value]
            cells = "  ".join(
                f"{n} {r:.4g}/{b:+.2g}/{f:.3g} ({r / c:.2f} CRB)"
                for n, r, b, f, c in zip(
                    names, row["rms"], row["bias"], row["formal"], row["crb"], strict=True
                )
            )
            rchi2 = "" if np.isnan(row["rchi2"]) else f"  median rchi2 {row['rchi2']:.3f}"
            print(f"   {name:<24}{cells}{rchi2}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument(
        "--n-compare", type=int, default=1_000, help="training size for the TheCannon comparison"
    )
    parser.add_argument("--n-test", type=int, default=300, help="test stars per S/N")
    parser.add_argument("--snr", type=float, nargs="+", default=[25.0, 50.0, 100.0])
    parser.add_argument("--threads", type=int, default=None, help="n_threads for train/fit (default: auto)")
    parser.add_argument("--skip-thecannon", action="store_true")
    parser.add_argument("--thecannon-full", action="store_true", help="also run TheCannon at --n-train")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/astra-bench-cannon"))
    parser.add_argument("--worker", choices=["prepare", "train", "test"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "prepare":
        prepare_data(args.workdir, args.n_train, args.n_test, args.snr)
        print(json.dumps({}))
        return
    if args.worker:
        work = worker_train if args.worker == "train" else worker_test
        print(json.dumps(work(args.workdir, args.n, args.threads)))
        return

    # Data generation runs in a subprocess too, so that this parent process stays small.
    snrs = [str(value) for value in args.snr]
    prepare = ["--worker", "prepare", "--n-train", str(args.n_train), "--n-test", str(args.n_test)]
    run_worker([*prepare, "--snr", *snrs, "--workdir", str(args.workdir)])
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    common = ["--workdir", str(args.workdir), *threads]
    runs: dict[str, dict] = {}
    results: dict[str, Path] = {}
    sizes = sorted({min(args.n_compare, args.n_train), args.n_train})
    for n in sizes:
        name = f"astra-provider N={n}"
        print(f"running {name} ...", flush=True)
        runs[name] = {
            "train": run_worker(["--worker", "train", "--n", str(n), *common]),
            "test": run_worker(["--worker", "test", "--n", str(n), *common]),
        }
        results[name] = args.workdir / f"result_{n}.npz"
    if not args.skip_thecannon:
        tc_sizes = sorted(
            {min(args.n_compare, args.n_train)} | ({args.n_train} if args.thecannon_full else set())
        )
        for n in tc_sizes:
            name = f"TheCannon {THECANNON_VERSION} N={n}"
            print(f"running {name} ...", flush=True)
            runs[name] = {"train": run_thecannon(args.workdir, n)}
            results[name] = args.workdir / f"thecannon_result_{n}.npz"
    print_report(args.workdir, args.snr, runs, results)
    print(f"\n(machine load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
