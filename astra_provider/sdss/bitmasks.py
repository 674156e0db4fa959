"""APOGEE bitmasks (pixel mask and STARFLAG) as plain dicts; no third-party imports."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = [
    "APOGEE_PIXEL_BITS",
    "APOGEE_BAD_PIXEL_BITS",
    "APOGEE_BAD_PIXEL_MASK",
    "APOGEE_BAD_ERROR",
    "APOGEE_STARFLAG_BITS",
    "APOGEE_BAD_STARFLAG_MASK",
    "bit_mask",
    "decode_bits",
]

#: APOGEE DRP pixel mask (``PixelBitMask``): bit number -> name.
APOGEE_PIXEL_BITS: dict[int, str] = {
    0: "BADPIX",
    1: "CRPIX",
    2: "SATPIX",
    3: "UNFIXABLE",
    4: "BADDARK",
    5: "BADFLAT",
    6: "BADERR",
    7: "NOSKY",
    8: "LITTROW_GHOST",
    9: "PERSIST_HIGH",
    10: "PERSIST_MED",
    11: "PERSIST_LOW",
    12: "SIG_SKYLINE",
    13: "SIG_TELLURIC",
    14: "NOT_ENOUGH_PSF",
    16: "FERRE_MASK",
}
#: Pixel bits that make a pixel unusable (bits 0-7 and 14).
APOGEE_BAD_PIXEL_BITS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 14)
#: ``sum(1 << b for b in APOGEE_BAD_PIXEL_BITS)`` == 16639.
APOGEE_BAD_PIXEL_MASK: int = 16639
#: Error value the APOGEE DRP writes for unusable pixels; readers treat sigma >= this as ivar = 0.
APOGEE_BAD_ERROR: float = 1e10

#: APOGEE ``STARFLAG`` (``StarBitMask``): bit number -> name.
APOGEE_STARFLAG_BITS: dict[int, str] = {
    0: "BAD_PIXELS",
    1: "COMMISSIONING",
    2: "BRIGHT_NEIGHBOR",
    3: "VERY_BRIGHT_NEIGHBOR",
    4: "LOW_SNR",
    9: "PERSIST_HIGH",
    10: "PERSIST_MED",
    11: "PERSIST_LOW",
    12: "PERSIST_JUMP_POS",
    13: "PERSIST_JUMP_NEG",
    16: "SUSPECT_RV_COMBINATION",
    17: "SUSPECT_BROAD_LINES",
    18: "BAD_RV_COMBINATION",
    19: "RV_REJECT",
    20: "RV_SUSPECT",
    21: "MULTIPLE_SUSPECT",
    22: "RV_FAIL",
}
#: STARFLAG bits that exclude a visit (bits 0, 3, 18, 22).
APOGEE_BAD_STARFLAG_MASK: int = (1 << 0) | (1 << 3) | (1 << 18) | (1 << 22)


def bit_mask(names: Iterable[str], bits: Mapping[int, str] = APOGEE_PIXEL_BITS) -> int:
    """Integer mask with the named bits set (names are case-insensitive)."""
    by_name = {name.upper(): bit for bit, name in bits.items()}
    mask = 0
    for name in names:
        try:
            mask |= 1 << by_name[name.upper()]
        except KeyError:
            raise ValueError(f"unknown bit name {name!r}; known: {sorted(by_name)}") from None
    return mask


def decode_bits(value: int, bits: Mapping[int, str] = APOGEE_PIXEL_BITS) -> list[str]:
    """Names of the bits set in ``value`` (unknown bits appear as ``"BIT<n>"``)."""
    value = int(value)
    names = []
    bit = 0
    while value >> bit:
        if (value >> bit) & 1:
            names.append(bits.get(bit, f"BIT{bit}"))
        bit += 1
    return names


assert sum(1 << b for b in APOGEE_BAD_PIXEL_BITS) == APOGEE_BAD_PIXEL_MASK
