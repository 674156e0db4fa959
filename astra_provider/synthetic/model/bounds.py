"""Cramér–Rao bounds on the labels and the radial velocity of a truth model's spectra."""

from __future__ import annotations

from typing import Any

import numpy as np

from astra_provider.sdss.apogee import APOGEE_NPIX, apogee_detector_mask
from astra_provider.synthetic.model.spectrum_model import SpectrumModel

__all__ = ["crb_labels", "crb_rv", "differentiable_truth_model"]


def differentiable_truth_model(parameters: dict[str, Any]) -> SpectrumModel:
    """The truth model of a survey (``survey.json`` parameters), for its Cramér–Rao bounds.

    :raises TypeError: if that model has no derivatives.
    """
    from astra_provider.synthetic.truth_model import truth_model_from_survey

    model = truth_model_from_survey(parameters)
    if not isinstance(model, SpectrumModel):
        raise TypeError(f"the survey's truth model {type(model).__name__} has no derivatives for the bounds")
    return model


def _pixel_weights(
    model: SpectrumModel, snr: float | np.ndarray, n: int, include_scatter: bool
) -> np.ndarray:
    """Inverse variances (n, P) on the normalised flux for white noise σ = 1/SNR; zero off-detector."""
    snr_arr = np.broadcast_to(np.asarray(snr, dtype=float), (n,))
    scatter = model.intrinsic_scatter() if include_scatter else None
    variance = 1.0 / snr_arr[:, None] ** 2 + (0.0 if scatter is None else scatter**2)
    return np.where(apogee_detector_mask(), 1.0 / np.broadcast_to(variance, (n, APOGEE_NPIX)), 0.0)


def crb_labels(
    model: SpectrumModel,
    labels: np.ndarray,
    snr: float | np.ndarray,
    include_scatter: bool = False,
) -> np.ndarray:
    """Cramér–Rao bounds (n, 3) on (teff, logg, fe_h) for spectra at rest with σ = 1/SNR per detector pixel.

    ``sqrt(diag((Jᵀ W J)⁻¹))`` with J = ∂F/∂ℓ; ``include_scatter`` adds s_p² to the per-pixel variance.
    ``model`` is a truth model with derivatives (a :class:`~.spectrum_model.SpectrumModel`):
    :class:`~.lines.TruthModel` or :class:`~astra_provider.synthetic.independent.IndependentTruthModel`.
    """
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    jacobian = model.label_jacobian(labels)
    weights = _pixel_weights(model, snr, labels.shape[0], include_scatter)
    fisher = np.einsum("npk,np,npl->nkl", jacobian, weights, jacobian)
    return np.sqrt(np.diagonal(np.linalg.inv(fisher), axis1=1, axis2=2))


def crb_rv(
    model: SpectrumModel,
    labels: np.ndarray,
    snr: float | np.ndarray,
    rv_kms: float | np.ndarray = 0.0,
    marginalize_labels: bool = False,
) -> np.ndarray:
    """Cramér–Rao bound on the radial velocity (km/s), (n,), for σ = 1/SNR per detector pixel.

    Default is the matched-template bound ``[Σ (∂F/∂v)²/σ²]^−½``; ``marginalize_labels=True`` fits the
    three labels jointly with v (4×4 Fisher matrix). ``model`` as in :func:`crb_labels` (it also needs
    ``velocity_derivative``).
    """
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    n = labels.shape[0]
    weights = _pixel_weights(model, snr, n, include_scatter=False)
    dv = model.velocity_derivative(labels, rv_kms)
    if not marginalize_labels:
        return 1.0 / np.sqrt(np.einsum("np,np,np->n", dv, weights, dv))
    jacobian = np.concatenate([dv[..., None], model.label_jacobian(labels, rv_kms)], axis=2)
    fisher = np.einsum("npk,np,npl->nkl", jacobian, weights, jacobian)
    return np.sqrt(np.linalg.inv(fisher)[:, 0, 0])
