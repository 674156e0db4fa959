"""The demo's diagnostic plots (matplotlib, imported only here and only when plotting, with the Agg
backend): The Cannon's labels one-to-one with the truth, radial-velocity residuals against S/N, and one
continuum fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from astra_provider.demo.accuracy import LABELS
from astra_provider.demo.surveys import Surveys


def write_plots(
    rv: dict[str, Any],
    labels: dict[str, Any],
    surveys: Surveys,
    output_dir: Path,
    folder: Path,
    say: Callable[[str], None],
    model_path: Path | None = None,
) -> list[Path]:
    """The plots in ``folder`` (those there is data for); without matplotlib, ``say`` why there are none."""
    try:
        import matplotlib
    except ImportError:
        say("")
        say(
            "Plots: skipped, matplotlib is not installed (pip install -e '.[demo]', or re-run "
            "bash scripts/demo.sh which installs it)"
        )
        return []
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if labels["n"]:
        written.append(plot_labels(plt, labels, folder / "cannon_labels.png"))
    if rv["n"]:
        written.append(plot_rv(plt, rv, folder / "rv_residuals.png"))
    example = plot_continuum(plt, surveys, output_dir, folder / "continuum_example.png", model_path)
    if example is not None:
        written.append(example)
    return written


def plot_labels(plt: Any, labels: dict[str, Any], path: Path) -> Path:
    """The Cannon's labels against the truth, one panel per label, coloured by S/N."""
    import numpy as np

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    for k, (_, name, unit, fmt) in enumerate(LABELS):
        ax = axes[k]
        true, fitted = labels["true"][:, k], labels["fitted"][:, k]
        points = ax.scatter(true, fitted, c=labels["snr"], s=10, cmap="viridis", norm=log_norm(labels["snr"]))
        lo, hi = np.nanmin([true.min(), fitted.min()]), np.nanmax([true.max(), fitted.max()])
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        d = fitted - true
        bias, scatter = fmt.format(float(np.mean(d))), fmt.format(float(np.std(d))).lstrip("+")
        ax.set_title(f"{name}: bias {bias}, scatter {scatter} {unit}")
        ax.set_xlabel(f"true {name} ({unit})")
        ax.set_ylabel(f"The Cannon {name} ({unit})")
    figure.colorbar(points, ax=axes, label="apStar S/N")
    figure.suptitle(f"The Cannon one-to-one: {labels['n']} synthetic apStar spectra")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_rv(plt: Any, rv: dict[str, Any], path: Path) -> Path:
    """RV residuals against visit S/N, with the Cramér-Rao bound and the formal error."""
    import numpy as np

    figure, ax = plt.subplots(figsize=(8, 5))
    ax.scatter(rv["snr"], rv["residual"], s=8, alpha=0.7, label="vhelio - truth")
    # Both scale as 1/SNR: draw them for the median star, smoothly
    grid = np.geomspace(rv["snr"].min(), rv["snr"].max(), 100)
    crb = np.nanmedian(rv["crb"] * rv["snr"]) / grid
    formal = np.nanmedian(rv["u_vrel"] * rv["snr"]) / grid
    for sign in (1, -1):
        ax.plot(
            grid,
            sign * crb,
            color="k",
            lw=1,
            label="± Cramér-Rao bound (median star)" if sign > 0 else None,
        )
        ax.plot(
            grid,
            sign * formal,
            color="C3",
            lw=1,
            ls="--",
            label="± formal error (median)" if sign > 0 else None,
        )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("visit S/N per pixel")
    ax.set_ylabel("RV residual (km/s)")
    residual = rv["residual"]
    ax.set_title(
        f"Doppler on {rv['n']} apVisit spectra: bias {np.mean(residual):+.3f}, "
        f"scatter {np.std(residual):.3f} km/s"
    )
    ax.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_continuum(
    plt: Any, surveys: Surveys, output_dir: Path, path: Path, model_path: Path | None = None
) -> Path | None:
    """The continuum fit of a median-S/N apStar spectrum, if it was normalised into ``output_dir``, with the
    continuum pixels of the Cannon model at ``model_path`` (those the pipeline normalised with)."""
    import numpy as np

    from astra_provider.contrib.continuum import find_normalized
    from astra_provider.science.cannon.continuum_pixels import resolve_continuum_pixels
    from astra_provider.sdss.spectrum import read_spectrum

    rows = sorted(surveys.survey.of_filetype("apStar"), key=lambda row: row["snr"])
    if not rows:
        return None
    row = rows[len(rows) // 2]  # a median-S/N star
    source = surveys.survey_root / row["path"]
    fit = find_normalized(output_dir, source)
    if fit is None:
        return None
    observed = read_spectrum(source)
    wavelength = observed.wavelength
    has_model = model_path is not None and Path(model_path).exists()
    mask, _ = resolve_continuum_pixels(wavelength, model_path if has_model else None)
    flux = np.where(observed.ivar[0] > 0, observed.flux[0], np.nan)
    continuum = np.where(observed.ivar[0] > 0, fit.extras["continuum"][0], np.nan)
    figure, axes = plt.subplots(2, 1, figsize=(13, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    axes[0].plot(wavelength, flux, lw=0.4, color="0.4", label="observed flux (apStar, first row)")
    axes[0].plot(
        wavelength[mask],
        flux[mask],
        ".",
        ms=1.5,
        color="C1",
        label=f"continuum pixels ({int(mask.sum())})",
    )
    axes[0].plot(wavelength, continuum, lw=1.2, color="C0", label="fitted continuum (deg 3, L 1400 Å)")
    axes[0].set_ylabel("flux (1e-17 erg/s/cm²/Å)")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title(f"Continuum fit: {Path(row['path']).name} (S/N {row['snr']:.0f})")
    axes[1].plot(wavelength, np.where(observed.ivar[0] > 0, fit.flux[0], np.nan), lw=0.4, color="0.2")
    axes[1].axhline(1.0, color="C0", lw=0.8)
    axes[1].set_ylim(0.4, 1.2)
    axes[1].set_ylabel("normalised flux")
    axes[1].set_xlabel("wavelength (Å, vacuum)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def log_norm(values: Any) -> Any:
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=max(float(values.min()), 1.0), vmax=max(float(values.max()), 2.0))
