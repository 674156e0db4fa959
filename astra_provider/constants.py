"""Physical constants used across the package (one definition each)."""

SPEED_OF_LIGHT_KMS = 299792.458
"""Speed of light in vacuum, km/s (exact, SI definition)."""

__all__ = ["SPEED_OF_LIGHT_KMS"]
