"""Synthetic APOGEE-like spectra from an exactly-quadratic line-list truth model.

Everything here is pure numpy and batch-first: spectra are arrays of shape ``(n_spectra, n_pixels)``.

The truth model (:class:`~astra_provider.synthetic.model.lines.TruthModel`) is a list of Gaussian absorption
lines whose depths are exactly quadratic in the scaled labels, so the normalised flux on a fixed grid *is* a
quadratic Cannon model with known coefficients (``TruthModel.theta``). Line positions and widths are stored
in "apStar pixel units of ln λ", ``u = (ln λ − ln λ_0) / Δ`` with ``Δ = CDELT1·ln 10``, so the apStar grid
sits at ``u = 0, 1, …, 8574`` exactly and a Doppler shift is the analytic offset ``ln(1 + v/c) / Δ`` (no
interpolation).

Modules: :mod:`~astra_provider.synthetic.model.labels` (the label population and the quadratic label
vector), :mod:`~astra_provider.synthetic.model.profiles` (sums of Gaussian line profiles on a pixel grid),
:mod:`~astra_provider.synthetic.model.lines` (the truth model),
:mod:`~astra_provider.synthetic.model.spectrum_model` (the flux and derivative methods of every truth model),
:mod:`~astra_provider.synthetic.model.continuum` (random smooth continua),
:mod:`~astra_provider.synthetic.model.spectra` (noisy spectra) and
:mod:`~astra_provider.synthetic.model.bounds` (Cramér–Rao bounds). The names below, and the APOGEE
constants of :mod:`astra_provider.sdss.apogee`, are re-exported here; import them from
``astra_provider.synthetic.model``.
"""

from astra_provider.sdss.apogee import (
    APOGEE_CDELT1,
    APOGEE_CHIPS_PIXELS,
    APOGEE_CRVAL1,
    APOGEE_LSF_RESOLUTION,
    APOGEE_NPIX,
    APOGEE_REGIONS_AA,
    apogee_detector_mask,
    apogee_wavelength,
    velocity_per_pixel,
)
from astra_provider.synthetic.model.bounds import crb_labels, crb_rv
from astra_provider.synthetic.model.continuum import draw_continuum
from astra_provider.synthetic.model.labels import (
    LABEL_NAMES,
    LABEL_OFFSETS,
    LABEL_SCALES,
    draw_labels,
    quadratic_label_vector,
)
from astra_provider.synthetic.model.lines import C_KMS, TruthModel, derive_continuum_pixels
from astra_provider.synthetic.model.spectra import APOGEE_BAD_PIXEL_BITMASK, SyntheticSpectra, make_spectra

__all__ = [
    "APOGEE_BAD_PIXEL_BITMASK",
    "APOGEE_CDELT1",
    "APOGEE_CHIPS_PIXELS",
    "APOGEE_CRVAL1",
    "APOGEE_LSF_RESOLUTION",
    "APOGEE_NPIX",
    "APOGEE_REGIONS_AA",
    "C_KMS",
    "LABEL_NAMES",
    "LABEL_OFFSETS",
    "LABEL_SCALES",
    "SyntheticSpectra",
    "TruthModel",
    "apogee_detector_mask",
    "apogee_wavelength",
    "crb_labels",
    "crb_rv",
    "derive_continuum_pixels",
    "draw_continuum",
    "draw_labels",
    "make_spectra",
    "quadratic_label_vector",
    "velocity_per_pixel",
]
