"""Moved to :mod:`astra_provider.fits` (the package's one FITS writer); kept so that old imports work."""

from astra_provider.fits import ImageHDU, TableHDU, format_card, write_fits
from astra_provider.fits.writer import Card

__all__ = ["Card", "ImageHDU", "TableHDU", "format_card", "write_fits"]
