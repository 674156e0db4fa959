"""Convert a trained AnniesLasso (``thecannon`` 0.2.x) model, as pickled by Doppler's template grids, into a
:class:`~astra_provider.science.cannon.CannonModel`.

What the source stores (a plain dict, read with :func:`~astra_provider.templates.restricted_pickle.
load_restricted_pickle`): ``theta`` (P, D), ``s2`` (P,), ``dispersion`` (P,) Å, ``training_set_labels``
(N, K), ``vectorizer = ("PolynomialVectorizer", {"label_names", "terms"})``, ``wavevac``, ``fwhm``,
``censors``, ``regularization``, ``continuum`` (a Cannon model of the continuum, not needed for normalised
templates) and ``metadata``.

How AnniesLasso evaluates it (``thecannon/model.py`` and ``vectorizer/polynomial.py`` of annieslasso 0.2.93,
which wrote these files), reproduced exactly here:

* labels are scaled as ``x = (ℓ − fiducial) / scale`` with ``fiducial = percentile(training_labels, 50)`` and
  ``scale = ptp(percentile(training_labels, [2.5, 97.5]))`` (p97.5 − p2.5, **not** divided by 4 as in this
  project's own training; the values are stored with the model, so both conventions coexist);
* the label vector is ``[1, term_1(x), …, term_{D−1}(x)]``: a leading constant, then the stored terms in
  their stored order, each term a list of ``(label_index, power)`` pairs multiplied together;
* flux = ``theta @ label_vector``.

The terms are rewritten as this project's term strings (``"teff^2"``, ``"teff*logg"``) in the same column
order, so ``theta`` is copied unchanged. Label names become the project's (``TEFF`` → ``teff``, ``LOGG`` →
``logg``, ``FEH`` → ``fe_h``); the source names are kept in the metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from astra_provider.science.air_vacuum import AIR_VACUUM_FORMULAS, Formula, air_to_vacuum
from astra_provider.science.cannon import PERCENTILE_LEVELS, CannonModel, polynomial_terms

__all__ = ["PROJECT_LABEL_NAMES", "annieslasso_label_scaling", "annieslasso_terms", "cannon_model_from_state"]

PROJECT_LABEL_NAMES = {"TEFF": "teff", "LOGG": "logg", "FEH": "fe_h", "[FE/H]": "fe_h", "M_H": "m_h"}
"""Source label name (upper case) → this project's label name."""


def annieslasso_terms(terms: Any, label_names: tuple[str, ...]) -> list[str]:
    """Project term strings for AnniesLasso terms (lists of ``(label_index, power)``), constant first.

    :raises ValueError: for a term with an unknown label index or a non-integer or non-positive power.
    """
    out = ["1"]
    for term in terms:
        indices: list[int] = []
        for index, power in term:
            if not 0 <= int(index) < len(label_names):
                raise ValueError(f"term {term!r} uses label index {index}; there are {len(label_names)}")
            if float(power) != int(power) or int(power) < 1:
                raise ValueError(f"term {term!r} has power {power!r}; only positive integers are supported")
            indices.extend([int(index)] * int(power))
        # Same format as polynomial_terms: labels in index order, "name^k" for powers.
        factors = []
        for index in sorted(set(indices)):
            count = indices.count(index)
            factors.append(label_names[index] if count == 1 else f"{label_names[index]}^{count}")
        out.append("*".join(factors))
    return out


def annieslasso_label_scaling(training_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fiducials, scales)`` as AnniesLasso 0.2.x: median and p97.5 − p2.5 of the training labels."""
    labels = np.asarray(training_labels)
    fiducials = np.percentile(labels, 50, axis=0)
    scales = np.ptp(np.percentile(labels, [2.5, 97.5], axis=0), axis=0)
    return np.asarray(fiducials, dtype=np.float64), np.asarray(scales, dtype=np.float64)


def _require(state: Mapping[str, Any], key: str) -> Any:
    if key not in state or state[key] is None:
        raise ValueError(f"not an AnniesLasso Cannon model: {key!r} is missing")
    return state[key]


def cannon_model_from_state(
    state: Mapping[str, Any],
    *,
    provenance: Mapping[str, Any] | None = None,
    formula: Formula = "ciddor1996",
) -> CannonModel:
    """A :class:`CannonModel` from an unpickled AnniesLasso model dict, in **vacuum** wavelengths.

    :param state: the dict read from the pickle.
    :param provenance: source description stored in ``metadata`` (``source``, ``source_version``,
        ``source_sha256`` ...).
    :param formula: air-to-vacuum formula for air grids (see :mod:`astra_provider.science.air_vacuum`).
    :returns: the model; ``metadata["wavelength_medium"]`` is ``"vacuum"``.
    :raises ValueError: if ``state`` is not a trained polynomial AnniesLasso model.
    """
    theta, s2, dispersion, training_labels, source_names, names, terms = _checked_state(state)
    in_vacuum = bool(state.get("wavevac", False))
    wavelength = dispersion if in_vacuum else air_to_vacuum(dispersion, formula)
    offsets, scales = annieslasso_label_scaling(training_labels)
    labels64 = training_labels.astype(np.float64)
    metadata = _conversion_metadata(state, provenance, formula, in_vacuum, source_names, names, terms)
    finite = np.all(np.isfinite(theta), axis=1) & np.isfinite(s2)
    theta = np.where(finite[:, None], theta, np.eye(1, theta.shape[1])[0])
    return CannonModel(
        label_names=names,
        terms=tuple(terms),
        offsets=offsets,
        scales=scales,
        theta=theta,
        s2=np.where(finite, s2, 0.0),
        wavelength=wavelength,
        pixel_mask=~finite,
        training_label_min=labels64.min(axis=0),
        training_label_max=labels64.max(axis=0),
        training_label_percentiles=np.percentile(labels64, PERCENTILE_LEVELS, axis=0),
        n_training=int(training_labels.shape[0]),
        regularization=float(np.asarray(state.get("regularization") or 0.0).ravel()[0]),
        metadata=metadata,
    )


def _checked_state(
    state: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...], list[str]]:
    """``theta``, ``s2``, ``dispersion``, the training labels, the source's and the project's label names and
    the terms of an AnniesLasso model dict, checked.

    :raises ValueError: if ``state`` is not a trained polynomial AnniesLasso model.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"not an AnniesLasso Cannon model: the pickle holds a {type(state).__name__}")
    theta = np.asarray(_require(state, "theta"), dtype=np.float64)
    s2 = np.asarray(_require(state, "s2"), dtype=np.float64).reshape(-1)
    dispersion = np.asarray(_require(state, "dispersion"), dtype=np.float64).reshape(-1)
    training_labels = np.asarray(_require(state, "training_set_labels"))
    vectorizer = _require(state, "vectorizer")
    pair = isinstance(vectorizer, tuple | list) and len(vectorizer) == 2
    if not (pair and isinstance(vectorizer[1], Mapping)):
        raise ValueError(f"not an AnniesLasso Cannon model: vectorizer is {type(vectorizer).__name__}")
    kind, settings = vectorizer
    if kind != "PolynomialVectorizer":
        raise ValueError(f"unsupported vectorizer {kind!r}; only PolynomialVectorizer models convert")
    source_names = tuple(str(name) for name in settings["label_names"])
    names = tuple(PROJECT_LABEL_NAMES.get(name.upper(), name.lower()) for name in source_names)
    terms = annieslasso_terms(settings["terms"], names)
    if theta.ndim != 2 or theta.shape[1] != len(terms) or theta.shape[0] != dispersion.size:
        raise ValueError(
            f"theta has shape {theta.shape}; expected ({dispersion.size}, {len(terms)}) for "
            f"{dispersion.size} pixels and {len(terms)} terms"
        )
    if training_labels.ndim != 2 or training_labels.shape[1] != len(names):
        raise ValueError(f"training_set_labels has shape {training_labels.shape}, expected (N, {len(names)})")
    if np.any(np.diff(dispersion) <= 0):
        raise ValueError("dispersion is not strictly increasing")
    return theta, s2, dispersion, training_labels, source_names, names, terms


def _conversion_metadata(
    state: Mapping[str, Any],
    provenance: Mapping[str, Any] | None,
    formula: Formula,
    in_vacuum: bool,
    source_names: tuple[str, ...],
    names: tuple[str, ...],
    terms: list[str],
) -> dict[str, Any]:
    """The converted model's ``metadata``: provenance, wavelength medium and the source model's details."""
    degree = _degree(terms)
    source_metadata = dict(state.get("metadata") or {})
    source_fwhm = state.get("fwhm")
    return {
        **dict(provenance or {}),
        "wavelength_medium": "vacuum",
        "source_wavelength_medium": "vacuum" if in_vacuum else "air",
        "air_to_vacuum": (
            None if in_vacuum else {"formula": formula, "reference": AIR_VACUUM_FORMULAS[formula]}
        ),
        "source_fwhm_aa": None if source_fwhm is None else float(source_fwhm),
        "lsf": None,
        "source_label_names": list(source_names),
        "label_scaling": "AnniesLasso 0.2.x: offset = median, scale = p97.5 - p2.5 of the training labels",
        "source_model": {
            "format": "AnniesLasso (thecannon) CannonModel pickle",
            "version": str(source_metadata.get("version", "")),
            "training_set_hash": str(source_metadata.get("training_set_hash", "")),
            "modified": str(source_metadata.get("modified", "")),
            "regularization": float(np.asarray(state.get("regularization") or 0.0).ravel()[0]),
            "degree": degree,
            "is_full_polynomial": terms == polynomial_terms(names, order=degree),
        },
    }


def _degree(terms: list[str]) -> int:
    degree = 0
    for term in terms:
        if term == "1":
            continue
        degree = max(degree, sum(int(f.partition("^")[2] or 1) for f in term.split("*")))
    return max(degree, 1)
