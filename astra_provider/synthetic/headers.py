"""Header-card values shared by the synthetic apStar, apVisit and specFull files."""

from __future__ import annotations

import datetime
import math

__all__ = ["SDSS_FLUX_UNIT", "SYNTHETIC_CARD", "iso_date"]

SDSS_FLUX_UNIT = "1e-17 erg/s/cm^2/Ang"
"""``BUNIT`` of SDSS flux arrays."""

SYNTHETIC_CARD = ("SYNTHETC", True, "synthetic astra-provider survey")
"""Marks every synthetic file (an invented card, not in real SDSS files)."""


def iso_date(jd: float) -> str:
    """ISO date-time (UTC, no leap seconds, milliseconds) of a Julian date, as in ``DATE-OBS`` cards."""
    mjd = jd - 2400000.5
    days = math.floor(mjd)
    seconds = (mjd - days) * 86400.0
    stamp = datetime.datetime(1858, 11, 17) + datetime.timedelta(days=days, seconds=seconds)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
