"""Run TheCannon 0.7.3 (annayqho, PyPI ``thecannon``, module ``TheCannon``) on arrays from an ``.npz`` file.

Executed by ``bench/bench_cannon.py`` with the interpreter of the separate benchmark venv
(``.venv-bench-thecannon``), so it imports only numpy and TheCannon, never astra_provider.

Usage: ``python thecannon_worker.py INPUT.npz OUTPUT.npz``. INPUT holds ``wavelength``, ``train_labels``,
``train_flux``, ``train_ivar``, ``test_flux``, ``test_ivar`` (float64). OUTPUT gets the inferred labels,
their formal errors (TheCannon returns them in scaled units; converted here with the model scales), chi2,
theta and scatter. One JSON line with timings and peak memory goes to stdout.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import time

import numpy as np


def current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def reset_peak_rss() -> None:
    """Reset the peak-RSS counter (Linux >= 4.0), so that the peak measured is that of training."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak RSS (MB) of this address space: Linux VmHWM (not inherited across fork + exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    with np.load(source, allow_pickle=False) as data:
        arrays = {key: np.array(data[key]) for key in data.files}
    rss_data_mb = current_rss_mb()
    reset_peak_rss()

    import matplotlib

    matplotlib.use("Agg")
    from TheCannon import dataset, model

    n_train, n_test = len(arrays["train_labels"]), len(arrays["test_flux"])
    chatter = io.StringIO()  # TheCannon prints progress; keep stdout for the JSON result
    with contextlib.redirect_stdout(chatter):
        ds = dataset.Dataset(
            arrays["wavelength"],
            np.arange(n_train).astype(str),
            arrays["train_flux"],
            arrays["train_ivar"],
            arrays["train_labels"],
            np.arange(n_test).astype(str),
            arrays["test_flux"],
            arrays["test_ivar"],
        )
        ds.set_label_names(["teff", "logg", "fe_h"])
        cannon = model.CannonModel(2, useErrors=False)
        start, cpu = time.perf_counter(), time.process_time()
        cannon.train(ds)
        train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
        train_peak_mb = peak_rss_mb()
        start = time.perf_counter()
        errors_scaled, chi_sq = cannon.infer_labels(ds)
        test_seconds = time.perf_counter() - start

    np.savez(
        target,
        labels=np.asarray(ds.test_label_vals),
        e_labels=np.asarray(errors_scaled) * np.asarray(cannon.scales),
        chi_sq=np.asarray(chi_sq),
        theta=np.asarray(cannon.coeffs),
        scatter=np.asarray(cannon.scatters),
        offsets=np.asarray(cannon.pivots),
        scales=np.asarray(cannon.scales),
    )
    print(
        json.dumps(
            {
                "n_train": n_train,
                "n_test": n_test,
                "train_seconds": train_seconds,
                "train_cpu_seconds": train_cpu,
                "test_ms_per_star": 1e3 * test_seconds / n_test,
                "peak_rss_mb": train_peak_mb,
                "rss_after_loading_data_mb": rss_data_mb,
                "numpy": np.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
