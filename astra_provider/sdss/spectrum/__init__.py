"""One in-memory spectrum container and readers for SDSS apStar, apVisit and BOSS specFull files.

:func:`.read_spectrum` dispatches on the file type (given, parsed from the path with
:func:`astra_provider.sdss.paths.parse_path`, or guessed from the file-name prefix). Every problem with a file
raises :class:`.SpectrumReadError` (a ``ValueError``) whose message starts with the file path.

Conventions of the returned :class:`.Spectrum`:

* ``wavelength`` (P,) vacuum Å, strictly increasing; ``flux``/``ivar``/``pixel_flags`` (n, P).
* ``ivar`` is 0 for unusable pixels: non-finite or non-positive σ (or σ ≥ 1e10, the APOGEE "bad error"),
  non-finite flux (whose flux is set to 0), and for APOGEE pixels with any bit of
  ``APOGEE_BAD_PIXEL_MASK`` (16639) set. BOSS ``IVAR`` is used as is (the pipeline already zeroes bad pixels;
  ``AND_MASK`` is returned as ``pixel_flags``).
* Flux units are SDSS's 1e-17 erg s⁻¹ cm⁻² Å⁻¹.
* ``meta`` holds file-level values under lower-case keys (``path``, ``filetype``, ``kwargs``, ``header``,
  ``ra``, ``dec``, ``objid``, ``catalogid``, ``mjd``, ``telescope``, ``bc`` ...) and per-spectrum values as
  **1-D numpy arrays of length n** (``snr``, ``row_kind`` ...); :meth:`.Spectrum.select` slices exactly those.

Modules: :mod:`~astra_provider.sdss.spectrum.container` (:class:`.Spectrum`, :class:`.SpectrumReadError`),
:mod:`~astra_provider.sdss.spectrum.dispatch` (:func:`.read_spectrum`), one reader a file type
(:mod:`~astra_provider.sdss.spectrum.apstar`, :mod:`~astra_provider.sdss.spectrum.apvisit`,
:mod:`~astra_provider.sdss.spectrum.specfull`) and what they share
(:mod:`~astra_provider.sdss.spectrum.reading`). The names below are re-exported here; import them from
``astra_provider.sdss.spectrum``.
"""

from astra_provider.sdss.spectrum.apstar import read_apstar
from astra_provider.sdss.spectrum.apvisit import read_apvisit
from astra_provider.sdss.spectrum.container import FLUX_UNIT, Spectrum, SpectrumReadError
from astra_provider.sdss.spectrum.dispatch import READERS, infer_filetype, read_spectrum
from astra_provider.sdss.spectrum.reading import sigma_to_ivar
from astra_provider.sdss.spectrum.specfull import read_specfull

__all__ = [
    "FLUX_UNIT",
    "Spectrum",
    "SpectrumReadError",
    "READERS",
    "read_spectrum",
    "read_apstar",
    "read_apvisit",
    "read_specfull",
    "infer_filetype",
    "sigma_to_ivar",
]
