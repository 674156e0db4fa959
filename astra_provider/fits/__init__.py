"""FITS input and output for the whole package: one reader and one writer.

Why not ``astropy.io.fits`` on the hot paths: it spends most of its time on header-card objects and
verification (a whole task was 3-200x slower than its science kernel, ~60% of it in writing and ~30% in
reading FITS files), and it parses every HDU of a file eagerly. ``fitsio`` (cfitsio) reads data fast, but
parsing a 100-card header through it costs several milliseconds and it returns the comment as the value of
a keyword named ``H`` (the 2MASS H magnitude of every APOGEE file). So headers are parsed here, once each,
and data are read straight into numpy arrays (:mod:`astra_provider.fits.reader`); files are written by
formatting the few card types needed and streaming the data blocks, atomically
(:mod:`astra_provider.fits.writer`). The tests check both against astropy, on real SDSS files too.
``bench/bench_tasks.py`` measures them against a bare cfitsio read and write.
"""

from astra_provider.fits.header import Header, format_card, format_cards, parse_header
from astra_provider.fits.reader import FitsError, FitsFile, HDUInfo, read_header
from astra_provider.fits.writer import ImageHDU, TableHDU, write_fits

__all__ = [
    "FitsError",
    "FitsFile",
    "HDUInfo",
    "Header",
    "ImageHDU",
    "TableHDU",
    "format_card",
    "format_cards",
    "parse_header",
    "read_header",
    "write_fits",
]
