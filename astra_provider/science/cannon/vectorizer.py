"""Polynomial vectorizer of The Cannon: scaled labels -> design matrix (and its derivative), any order.

Terms are strings such as ``"1"``, ``"teff"``, ``"teff^2"``, ``"teff*logg"`` or ``"logg*teff^2"`` (factors in
any order), so that a saved model describes itself. The full polynomial of a given order lists its terms in
the AnniesLasso / TheCannon order (:func:`polynomial_terms`); any other set of terms (e.g. the 20 cubic terms
of a Doppler template grid, in that grid's order) is accepted, and the design-matrix columns follow it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations_with_replacement

import numpy as np

__all__ = [
    "PolynomialVectorizer",
    "polynomial_terms",
    "validate_label_names",
]

_LABEL_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\[\]/.\-]*$")


def validate_label_names(label_names: Sequence[str]) -> tuple[str, ...]:
    """Label names as a tuple of strings.

    :param label_names: the names, e.g. ``["teff", "logg", "fe_h"]``.
    :returns: the names as a tuple.
    :raises ValueError: if there are none, a name repeats, or a name is not a term-safe identifier (letters,
        digits, ``_[]/.-``, starting with a letter or ``_``).
    """
    names = tuple(str(name) for name in label_names)
    if len(names) == 0:
        raise ValueError("at least one label name is required")
    if len(set(names)) != len(names):
        raise ValueError(f"label names must be unique: {names}")
    for name in names:
        if not _LABEL_NAME_PATTERN.match(name):
            raise ValueError(
                f"label name {name!r} is not allowed: use letters, digits, '_', '[', ']', '/', '.', '-' "
                "and start with a letter or '_'"
            )
    return names


def _format_term(term: tuple[int, ...], label_names: Sequence[str]) -> str:
    """Term string of a sorted tuple of label indices (one index per factor); ``()`` is ``"1"``."""
    if not term:
        return "1"
    factors = []
    for index in sorted(set(term)):
        power = term.count(index)
        factors.append(label_names[index] if power == 1 else f"{label_names[index]}^{power}")
    return "*".join(factors)


def _parse_term(text: str, label_names: Sequence[str]) -> tuple[int, ...]:
    """Sorted tuple of label indices (one per factor) of a term string such as ``"logg*teff^2"``."""
    text = text.strip()
    if text == "1":
        return ()
    lookup = {name: i for i, name in enumerate(label_names)}
    indices: list[int] = []
    for factor in text.split("*"):
        name, _, power = factor.strip().partition("^")
        if name not in lookup:
            raise ValueError(f"term {text!r} uses unknown label {name!r} (labels: {list(label_names)})")
        exponent = int(power) if power else 1
        if exponent < 1:
            raise ValueError(f"term {text!r} has a non-positive exponent")
        indices.extend([lookup[name]] * exponent)
    return tuple(sorted(indices))


def polynomial_terms(label_names: Sequence[str], order: int = 2) -> list[str]:
    """Term strings of the full polynomial of ``order`` in the labels, in the saved (AnniesLasso) order.

    For three labels and ``order=2``: ``1, teff, logg, fe_h, teff^2, teff*logg, teff*fe_h, logg^2, logg*fe_h,
    fe_h^2`` (10 terms); ``order=3`` appends the 10 cubic terms ``teff^3, teff^2*logg, ..., fe_h^3`` (20).

    :param label_names: the K label names.
    :param order: the polynomial order (total degree), >= 1.
    :returns: the (K + order)! / (K! order!) term strings, by degree, then lexicographically in the label
        indices.
    :raises ValueError: for a bad label name or ``order < 1``.
    """
    names = validate_label_names(label_names)
    if order < 1:
        raise ValueError("order must be >= 1")
    terms = []
    for degree in range(order + 1):
        for combo in combinations_with_replacement(range(len(names)), degree):
            terms.append(_format_term(combo, names))
    return terms


class PolynomialVectorizer:
    """Maps scaled labels ``x`` (N, K) to the design matrix (N, D) and its derivative (N, D, K).

    ``terms`` is a list of strings (``"1"``, ``"teff"``, ``"teff^2"``, ``"teff*logg"``); any polynomial
    (e.g. a cubic Doppler template model) is accepted, but the column order is exactly the order of ``terms``.

    :param label_names: the K label names.
    :param terms: the D term strings.
    :raises ValueError: for an unknown label in a term, or a term given twice.
    """

    def __init__(self, label_names: Sequence[str], terms: Sequence[str]):
        self.label_names = validate_label_names(label_names)
        self.terms = tuple(str(t) for t in terms)
        self.term_indices = tuple(_parse_term(t, self.label_names) for t in self.terms)
        if len(set(self.term_indices)) != len(self.term_indices):
            raise ValueError(f"duplicate terms in {self.terms}")
        # Group the terms by degree so that each group is evaluated with a few vectorised products.
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []
        for degree in sorted({len(t) for t in self.term_indices}):
            columns = np.array(
                [d for d, t in enumerate(self.term_indices) if len(t) == degree], dtype=np.intp
            )
            factors = np.array([self.term_indices[d] for d in columns], dtype=np.intp).reshape(
                len(columns), degree
            )
            self._groups.append((columns, factors))

    @classmethod
    def full_polynomial(cls, label_names: Sequence[str], order: int) -> PolynomialVectorizer:
        """The vectorizer of all :func:`polynomial_terms` of ``order`` (D = (K + order)! / (K! order!))."""
        return cls(label_names, polynomial_terms(label_names, order))

    @classmethod
    def quadratic(cls, label_names: Sequence[str]) -> PolynomialVectorizer:
        """The standard quadratic vectorizer (D = (K+1)(K+2)/2)."""
        return cls.full_polynomial(label_names, order=2)

    @property
    def n_labels(self) -> int:
        """Number of labels K."""
        return len(self.label_names)

    @property
    def n_terms(self) -> int:
        """Number of terms D (design-matrix columns)."""
        return len(self.terms)

    @property
    def order(self) -> int:
        """Polynomial order: the highest total degree of a term (2 for the standard quadratic Cannon)."""
        return max(len(term) for term in self.term_indices) if self.term_indices else 0

    @property
    def linear_term_columns(self) -> np.ndarray:
        """Column of the linear term of each label (-1 if the label has no linear term)."""
        columns = np.full(self.n_labels, -1, dtype=np.intp)
        for d, term in enumerate(self.term_indices):
            if len(term) == 1:
                columns[term[0]] = d
        return columns

    def exponents(self) -> np.ndarray:
        """Integer exponent matrix (D, K): term d is prod_k x_k ** exponents[d, k]."""
        out = np.zeros((self.n_terms, self.n_labels), dtype=int)
        for d, term in enumerate(self.term_indices):
            for k in term:
                out[d, k] += 1
        return out

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_labels:
            raise ValueError(f"expected scaled labels of shape (N, {self.n_labels}), got {x.shape}")
        return x

    def design_matrix(self, x: np.ndarray) -> np.ndarray:
        """Design matrix (N, D) for scaled labels ``x`` (N, K)."""
        x = self._check(x)
        out = np.empty((x.shape[0], self.n_terms))
        for columns, factors in self._groups:
            if factors.shape[1] == 0:
                out[:, columns] = 1.0
                continue
            block = x[:, factors[:, 0]]
            for m in range(1, factors.shape[1]):
                block = block * x[:, factors[:, m]]
            out[:, columns] = block
        return out

    def design_matrix_and_derivative(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Design matrix (N, D) and its derivative with respect to the scaled labels (N, D, K)."""
        x = self._check(x)
        design = self.design_matrix(x)
        derivative = np.zeros((x.shape[0], self.n_terms, self.n_labels))
        for columns, factors in self._groups:
            degree = factors.shape[1]
            for m in range(degree):
                others = [f for f in range(degree) if f != m]
                if others:
                    block = x[:, factors[:, others[0]]]
                    for f in others[1:]:
                        block = block * x[:, factors[:, f]]
                else:
                    block = np.ones((x.shape[0], len(columns)))
                # (column, label) pairs are unique within one m, so fancy-index accumulation is exact.
                derivative[:, columns, factors[:, m]] += block
        return design, derivative
