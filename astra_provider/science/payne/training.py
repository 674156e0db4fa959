"""Training The Payne's emulator on labelled, continuum-normalised spectra (batch-first numpy/scipy).

The flux of pixel ``p`` is linear in the network's features, ``f_p(x) = a(x) . theta_p``, so the problem
separates (variable projection, Golub & Pereyra 1973):

1. **Hidden layers** (:mod:`.projection`). For fixed hidden layers the best output layer is a linear
   least-squares solution, so only the hidden layers (a few thousand parameters) are optimised, by
   L-BFGS-B on the full batch, with the output layer eliminated exactly at every step. The fit uses weights
   factorised as ``star weight x pixel weight`` so that all pixels share one design matrix; the whitened,
   centred training spectra are compressed to their singular components clearly above the noise (N, R),
   so every step is independent of the number of pixels. A held-out validation set stops the optimisation
   when its loss stops improving (The Payne's early stopping).
2. **Output layer** (:mod:`.linear`). With the hidden layers fixed, every pixel's ``theta_p`` (D,) is
   solved exactly with its own weights ``ivar / (1 + ivar s2)``: per-pixel Gram matrices from one GEMM,
   then a batched solve.
3. **Intrinsic scatter.** ``s2_p`` is fitted by maximum likelihood (Fisher scoring) to the training
   residuals, corrected for the D degrees of freedom used per pixel, and the output layer is solved again.

Steps 1-3 run ``n_rounds`` times: later rounds re-weight step 1 with the fitted scatter and fill missing
pixels with the previous model's prediction instead of a linear-in-labels estimate.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from astra_provider.science.cannon import PERCENTILE_LEVELS, label_offsets_and_scales
from astra_provider.science.labels import training_arrays, training_label_summary, training_metadata
from astra_provider.science.payne.linear import fit_scatter as fit_pixel_scatter
from astra_provider.science.payne.linear import solve_output_layer
from astra_provider.science.payne.model import PayneModel
from astra_provider.science.payne.network import Network
from astra_provider.science.payne.projection import compress, fit_hidden

__all__ = ["TrainingSettings", "default_hidden_sizes", "minimum_training_size", "train"]

_MAX_START_LABELS = 256
#: Singular components of the training spectra are kept when this far above the estimated noise edge.
_SIGNAL_TO_NOISE_EDGE = 1.15


def default_hidden_sizes(n_labels: int) -> tuple[int, int]:
    """Default hidden-layer widths for ``n_labels`` labels: ``(max(64, H), H)``, ``H = (K+1)(K+2)/2 + K + 1``.

    The last width sets the D = H + 1 coefficients fitted per pixel to noisy training spectra: for three
    labels D = 15, the quadratic Cannon's (K+1)(K+2)/2 = 10 plus K + 2, chosen by 5-fold cross-validation
    on training stars among H = 9, 11, 14 and 19 (``bench/payne_cv.py``, docs/science.md); for other K the
    same margin is an extrapolation. The features are learned functions of the labels rather than fixed
    monomials. (The Payne's 300-unit layers suit noise-free model grids: fitted to noisy spectra, D = 301
    coefficients per pixel would put noise of ~sqrt(D/N) times the training noise into every pixel.) The
    wider first layer gives the features their flexibility.
    """
    last = (n_labels + 1) * (n_labels + 2) // 2 + n_labels + 1
    return (max(64, last), last)


def minimum_training_size(hidden_sizes: Sequence[int], validation_fraction: float = 0.1) -> int:
    """Fewest training spectra for a network whose last hidden layer has ``hidden_sizes[-1]`` units.

    Every pixel's output layer has D = H_L + 1 coefficients fitted to the training spectra; like the
    Cannon's default of 2 D stars per pixel, at least 2 D spectra are required outside the validation set.
    """
    n_features = int(hidden_sizes[-1]) + 1
    return int(np.ceil(2 * n_features / (1.0 - validation_fraction)))


def _check_inputs(
    labels: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    label_names: Sequence[str],
    wavelength: np.ndarray,
    hidden_sizes: Sequence[int],
    validation_fraction: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], np.ndarray]:
    names = tuple(str(name) for name in label_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"label names must be unique and non-empty, got {names}")
    labels, flux, ivar, wavelength = training_arrays(labels, flux, ivar, wavelength, len(names))
    if not 0.0 < validation_fraction < 0.5:
        raise ValueError(f"validation_fraction must be in (0, 0.5), got {validation_fraction}")
    if len(hidden_sizes) == 0 or any(int(h) < 1 for h in hidden_sizes):
        raise ValueError(f"hidden_sizes must be positive layer widths, got {tuple(hidden_sizes)}")
    needed = minimum_training_size(hidden_sizes, validation_fraction)
    if labels.shape[0] < needed:
        n_free = Network.initialise(len(names), hidden_sizes, np.random.default_rng(0)).n_parameters
        raise ValueError(
            f"training set too small: {labels.shape[0]} spectra for a network with hidden layers "
            f"{tuple(int(h) for h in hidden_sizes)} ({int(hidden_sizes[-1]) + 1} output coefficients per "
            f"pixel and {n_free} hidden-layer parameters); need at least {needed} spectra "
            f"(2 per output coefficient, plus a {validation_fraction:.0%} validation set), or a smaller "
            "last hidden layer"
        )
    return labels, flux, ivar, names, wavelength


def _start_labels(x: np.ndarray, n: int) -> np.ndarray:
    """Farthest-point sample of ``n`` rows of the scaled labels ``x``, starting nearest the centre."""
    n = min(n, x.shape[0])
    chosen = [int(np.argmin(np.einsum("nk,nk->n", x, x)))]
    distance = np.einsum("nk,nk->n", x - x[chosen[0]], x - x[chosen[0]])
    for _ in range(n - 1):
        chosen.append(int(np.argmax(distance)))
        step = x - x[chosen[-1]]
        distance = np.minimum(distance, np.einsum("nk,nk->n", step, step))
    return x[np.array(chosen)]


@dataclass(frozen=True)
class TrainingSettings:
    """The settings of one training run (stored in the model's metadata); see :func:`train`."""

    hidden_sizes: tuple[int, ...]
    n_rounds: int
    max_iterations: int
    patience: int
    n_components: int
    validation_fraction: float
    ridge: float
    weight_decay: float
    fit_scatter: bool
    min_stars_per_pixel: int
    seed: int


def _fit_emulator(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, settings: TrainingSettings
) -> tuple[Network, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Hidden layers, output layer (P, D), scatter (P,), pixel mask (P,) and per-round summaries.

    ``y`` and ``w`` (N, P) are float64 with 0 where there is no data; ``x`` (N, K) are scaled labels.
    """
    rng = np.random.default_rng(settings.seed)
    n_stars, n_pixels = y.shape
    network = Network.initialise(x.shape[1], settings.hidden_sizes, rng)
    pixel_bad = np.count_nonzero(w, axis=0) < settings.min_stars_per_pixel
    order = rng.permutation(n_stars)
    n_valid = max(1, int(round(settings.validation_fraction * n_stars)))
    valid_rows, fit_rows = np.sort(order[:n_valid]), np.sort(order[n_valid:])
    # Missing values are filled for the compression by a linear-in-labels estimate in the first round.
    fill_features = np.concatenate([np.ones((n_stars, 1)), x], axis=1)
    s2 = np.zeros(n_pixels)
    fill_theta, _ = solve_output_layer(fill_features, y, w, s2, pixel_bad, settings.ridge)
    history = []
    for _ in range(settings.n_rounds):
        components, edge, sqrt_star = compress(
            y, w, s2, pixel_bad, fill_features, fill_theta, settings.n_components, rng
        )
        # Only components clearly above the noise carry label information; the rest would make the
        # validation loss measure noise.
        strength = np.sqrt(np.einsum("nr,nr->r", components, components))
        n_signal = max(int(np.count_nonzero(strength > _SIGNAL_TO_NOISE_EDGE * edge)), x.shape[1])
        network, summary = fit_hidden(
            network,
            x,
            components[:, :n_signal],
            sqrt_star,
            fit_rows,
            valid_rows,
            max_iterations=settings.max_iterations,
            patience=settings.patience,
            ridge=settings.ridge,
            weight_decay=settings.weight_decay,
        )
        features = network.features(x)
        theta, bad = solve_output_layer(features, y, w, s2, pixel_bad, settings.ridge)
        if settings.fit_scatter:
            s2 = fit_pixel_scatter(features, theta, y, w, bad)
            theta, bad = solve_output_layer(features, y, w, s2, pixel_bad, settings.ridge)
        fill_features, fill_theta = features, theta
        summary.update(
            n_components=n_signal,
            n_validation=n_valid,
            singular_values=strength[: n_signal + 3].tolist(),
            noise_edge=edge,
        )
        history.append(summary)
    return network, theta, s2, bad, history


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------


def train(
    labels: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    label_names: Sequence[str],
    wavelength: np.ndarray,
    *,
    hidden_sizes: Sequence[int] | None = None,
    n_rounds: int = 2,
    max_iterations: int = 4000,
    patience: int = 400,
    n_components: int = 64,
    validation_fraction: float = 0.1,
    ridge: float = 1e-6,
    weight_decay: float = 0.0,
    fit_scatter: bool = True,
    min_stars_per_pixel: int | None = None,
    seed: int = 0,
    metadata: Mapping[str, Any] | None = None,
    continuum_pixels: np.ndarray | None = None,
) -> PayneModel:
    """Train a Payne emulator on continuum-normalised spectra.

    :param labels: (N, K) physical training labels (finite).
    :param flux: (N, P) normalised flux; non-finite flux or ivar, and ivar <= 0, mean "no data".
    :param ivar: (N, P) inverse variance of ``flux``.
    :param label_names: K label names, in the order of the ``labels`` columns.
    :param wavelength: (P,) wavelengths, stored with the model (the test step checks them).
    :param hidden_sizes: hidden-layer widths (default :func:`default_hidden_sizes`); the last sets the
        D = H_L + 1 coefficients per pixel.
    :param n_rounds: rounds of (hidden layers, output layer, scatter); later rounds use the fitted scatter.
    :param max_iterations: L-BFGS-B iterations per round for the hidden layers.
    :param patience: stop a round when the validation loss has not improved for this many iterations.
    :param n_components: at most this many singular components of the training spectra are computed; the
        hidden layers are fitted to those clearly above the noise (at least K).
    :param validation_fraction: fraction of the spectra held out to stop the hidden-layer optimisation (the
        output layer and the scatter then use all spectra).
    :param ridge: relative ridge on the output-layer least squares.
    :param weight_decay: L2 penalty on the hidden-layer weights (not the biases).
    :param fit_scatter: fit the per-pixel intrinsic variance (otherwise 0).
    :param min_stars_per_pixel: pixels with fewer usable stars are masked (default 2 D).
    :param seed: seed of the initial weights, the validation split and the randomised SVD.
    :param metadata: extra JSON-serialisable metadata stored with the model (e.g. continuum settings).
    :param continuum_pixels: (P,) bool, the continuum pixels the training spectra were normalised with;
        stored with the model (``PayneModel.continuum_pixels``).
    :returns: the trained :class:`PayneModel`.
    :raises ValueError: on inconsistent shapes or a training set too small for the network, before any work.
    """
    # Over 80 lines only because the docstring documents 18 parameters; the body is 45 lines.
    if hidden_sizes is None:
        hidden_sizes = default_hidden_sizes(len(label_names))
    labels, flux, ivar, names, wavelength = _check_inputs(
        labels, flux, ivar, label_names, wavelength, hidden_sizes, validation_fraction
    )
    settings = TrainingSettings(
        hidden_sizes=tuple(int(h) for h in hidden_sizes),
        n_rounds=int(n_rounds),
        max_iterations=int(max_iterations),
        patience=int(patience),
        n_components=int(n_components),
        validation_fraction=float(validation_fraction),
        ridge=float(ridge),
        weight_decay=float(weight_decay),
        fit_scatter=bool(fit_scatter),
        min_stars_per_pixel=(
            2 * (int(hidden_sizes[-1]) + 1) if min_stars_per_pixel is None else int(min_stars_per_pixel)
        ),
        seed=int(seed),
    )
    started = time.perf_counter()
    offsets, scales = label_offsets_and_scales(labels)
    x = (labels - offsets) / scales
    y, w = _usable_data(flux, ivar)
    # One BLAS thread: the optimiser's products are small (N x D x R), and the QR, SVD and batched solves
    # call BLAS many times on small blocks; with two threads on a loaded 2-core machine every call waits
    # for a descheduled thread (measured: 93 ms instead of 11 ms per loss evaluation, a 1250 x 80 QR 1.4 s).
    with threadpool_limits(limits=1, user_api="blas"):
        network, theta, s2, bad, history = _fit_emulator(x, y, w, settings)
    info = _training_info(settings, history, time.perf_counter() - started)
    info.update(dict(metadata or {}))
    return PayneModel(
        label_names=names,
        offsets=offsets,
        scales=scales,
        network=network,
        theta=theta,
        s2=s2,
        wavelength=wavelength,
        pixel_mask=bad,
        start_labels=offsets + scales * _start_labels(x, _MAX_START_LABELS),
        **training_label_summary(labels, PERCENTILE_LEVELS),
        metadata=info,
        continuum_pixels=continuum_pixels,
    )


def _usable_data(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``flux`` and ``ivar`` in float64 with 0 for both where there is no data."""
    y = np.array(flux, dtype=np.float64)
    w = np.array(ivar, dtype=np.float64)
    unusable = ~(np.isfinite(y) & np.isfinite(w) & (w > 0))
    y[unusable], w[unusable] = 0.0, 0.0
    return y, w


def _training_info(settings: TrainingSettings, history: list, seconds: float) -> dict[str, Any]:
    """The metadata of a trained model: method, settings, per-round history, time and versions."""
    return training_metadata(
        method="The Payne (Ting+2019) emulator; hidden layers by variable projection, output layer by "
        "per-pixel weighted least squares",
        **asdict(settings),
        scatter=(
            "maximum likelihood (Fisher scoring, dof-corrected)" if settings.fit_scatter else "fixed at 0"
        ),
        history=history,
        train_seconds=seconds,
    )
