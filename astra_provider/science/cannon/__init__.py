"""The Cannon: a data-driven, polynomial-in-labels model of normalised stellar spectra (numpy/scipy only).

Model (Ness et al. 2015; Casey et al. 2016), for star ``n`` and pixel ``j``::

    y_nj = v(x_n) . theta_j + e_nj,        e_nj ~ N(0, 1/ivar_nj + s2_j)

* ``x = (label - offset) / scale`` are *scaled* labels. Offsets are the training-set medians; scales are
  ``(p97.5 - p2.5) / 4`` (TheCannon 0.7.3; about one standard deviation for a Gaussian), so the test-step
  starts 0 and +-1 sit at the centre and at +-1 sigma of the training set. Both are saved with the model.
* ``v`` is a polynomial vectorizer of any order. The default quadratic term order is
  ``[1, x1..xK, x1^2, x1*x2, ..., x1*xK, x2^2, ..., xK^2]`` (i <= j; the AnniesLasso / TheCannon order),
  saved as strings such as ``"teff^2"`` and ``"teff*logg"`` so that a saved model is self-describing; a cubic
  model (``order=3``, 20 terms for three labels) appends the cubic terms in the same order.
* ``s2`` is the per-pixel intrinsic variance, fitted by maximum likelihood; it enters everywhere through the
  adjusted inverse variance ``ivar / (1 + ivar * s2)``.

Modules: :mod:`~astra_provider.science.cannon.vectorizer` (terms, design matrix and derivative),
:mod:`~astra_provider.science.cannon.model` (the model and its label scaling),
:mod:`~astra_provider.science.cannon.io` (``.npz`` and FITS model files; never pickle),
:mod:`~astra_provider.science.cannon.train` (training, batched across pixels),
:mod:`~astra_provider.science.cannon.solvers` (its per-pixel kernels),
:mod:`~astra_provider.science.cannon.fit` (the test step, batched across stars) and
:mod:`~astra_provider.science.cannon.batching` (chunks, threads, batched Gram matrices).
The names below are re-exported here; import them from ``astra_provider.science.cannon``.
"""

from astra_provider.science.cannon.fit import CannonResult, fit
from astra_provider.science.cannon.io import FORMAT_VERSION, MODEL_KIND
from astra_provider.science.cannon.model import PERCENTILE_LEVELS, CannonModel, label_offsets_and_scales
from astra_provider.science.cannon.train import train
from astra_provider.science.cannon.vectorizer import PolynomialVectorizer, polynomial_terms
from astra_provider.science.flags import CannonFlag

__all__ = [
    "MODEL_KIND",
    "FORMAT_VERSION",
    "PERCENTILE_LEVELS",
    "CannonFlag",
    "CannonModel",
    "CannonResult",
    "PolynomialVectorizer",
    "polynomial_terms",
    "label_offsets_and_scales",
    "train",
    "fit",
]
