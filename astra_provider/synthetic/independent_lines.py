"""The physics of the independent truth model (:mod:`astra_provider.synthetic.independent`): its line list
and how each line's strength and width follow from the labels (Teff, log g, [Fe/H]).

Nothing here is derived from :class:`~astra_provider.synthetic.model.TruthModel`: the line list has its own
recipe and its own random streams (``SeedSequence([INDEPENDENT_STREAM_TAG, seed])``). The label dependence is
deliberately *not* polynomial; it is a cartoon of a stellar photosphere at 1.6 µm, with the right kind of
non-linearity rather than the right numbers:

- **atmosphere proxies** per star, with θ = 5040/Teff: electron pressure
  ``log Pe = 0.35 + 0.55 (log g − 2.5) + 0.45 [Fe/H] + 7 log10(Teff/4700)``; continuum opacity (H⁻)
  ``log κ = log Pe + 2.5 log10 θ + 0.754 θ``;
- **abundances**: ``[X/H] = [Fe/H] + [X/Fe]([Fe/H])`` with smooth (tanh) trends: α elements +0.25 dex at
  low metallicity, Mn −0.3 dex, Al and K ±0.1 dex;
- **atomic lines** of ten neutral species: Saha neutral fraction ``1 / (1 + 10^(2.5 log10 T − θ χ_ion −
  log Pe − 0.1762))``, Boltzmann factor ``10^(−θ χ_exc)``, so the centre optical depth is
  ``log τ0 = log τ_ref + Δ([X/H] + log f_neutral − θ χ_exc − log κ)`` relative to a reference star
  (Teff, log g, [Fe/H]) = (4700, 2.5, −0.2), where the recipe fixes ``τ_ref``; Doppler width from thermal
  and microturbulent velocities (ξ falls with log g); damping ∝ Pe^0.3;
- **molecular bands** (CO-like, Δv = 3): band heads with ~60 rotational lines each on a Fortrat parabola
  (lines pile up at the head and spread redward), rotational populations ``(2J+1) exp(−2.77 J(J+1)/Teff)``,
  the band strength from a dissociation equilibrium ``N ∝ 10^[C/H] x/(1 + x)``, ``log x ∝ [O/H] +
  0.5 log g + 11.1 θ − 1.5 log10 Teff`` (strong in cool giants, fading fast with Teff), and a vibrational
  Boltzmann factor per band;
- **hydrogen Brackett lines** (n → 4, n = 11…21, at their vacuum Rydberg wavelengths), broad and
  pressure-broadened (width ∝ Pe^(2/3)), with strength ∝ 10^(−12.75 θ) / κ: the broad features of warmer
  stars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from astra_provider.sdss.apogee import APOGEE_CDELT1, APOGEE_CRVAL1

__all__ = [
    "BRACKETT_UPPER_LEVELS",
    "INDEPENDENT_STREAM_TAG",
    "REFERENCE_LABELS",
    "SPECIES",
    "LineList",
    "StarPhysics",
    "brackett_optical_depths",
    "brackett_wavelengths",
    "draw_independent_labels",
    "star_physics",
    "u_of_wavelength",
]

INDEPENDENT_STREAM_TAG = 0x1D_E9_E0_DE_27
"""First entropy word of every random stream of the independent model (its seed is the second)."""

REFERENCE_LABELS = np.array([4700.0, 2.5, -0.2])
"""(Teff, log g, [Fe/H]) at which the recipe fixes each line's optical depth ``τ_ref``."""

#: (name, ionisation potential eV, mass amu, abundance-trend family, share of the atomic lines)
SPECIES: tuple[tuple[str, float, float, str, float], ...] = (
    ("Fe", 7.90, 55.8, "iron", 0.32),
    ("Ni", 7.64, 58.7, "iron", 0.07),
    ("Cr", 6.77, 52.0, "iron", 0.05),
    ("Mn", 7.43, 54.9, "manganese", 0.05),
    ("Mg", 7.65, 24.3, "alpha", 0.09),
    ("Si", 8.15, 28.1, "alpha", 0.13),
    ("Ca", 6.11, 40.1, "alpha", 0.07),
    ("Ti", 6.83, 47.9, "alpha", 0.09),
    ("Al", 5.99, 27.0, "odd", 0.08),
    ("K", 4.34, 39.1, "odd", 0.05),
)
BRACKETT_UPPER_LEVELS = tuple(range(11, 22))
"""Upper levels n of the Brackett lines (n → 4) inside the APOGEE range (16,811 Å … 15,264 Å)."""

_RYDBERG_H_PER_CM = 109_677.58  # Rydberg constant for hydrogen (vacuum wavenumbers)
_K_OVER_AMU = 8.314462618e-3  # (km/s)² per K per amu: thermal σ² = (k/m) T
_CO_DISSOCIATION_EV = 11.09
_CO_ROTATION_K = 2.77  # B/k of CO
_CO_VIBRATION_EV = 0.266  # vibrational quantum of CO (lower level v'' of band k is k)
_BRACKETT_EXCITATION_EV = 12.75  # n = 4 of hydrogen
_LN_STEP = APOGEE_CDELT1 * math.log(10.0)
_LN_START = APOGEE_CRVAL1 * math.log(10.0)


def brackett_wavelengths() -> np.ndarray:
    """Vacuum wavelengths (Å) of the Brackett lines n → 4, n in :data:`BRACKETT_UPPER_LEVELS`."""
    n = np.array(BRACKETT_UPPER_LEVELS, dtype=float)
    return 1e8 / (_RYDBERG_H_PER_CM * (1.0 / 16.0 - 1.0 / n**2))


def draw_independent_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, 3)`` labels of the independent model's population (red giants and the red clump).

    Teff ~ N(4750, 330) clipped to [3900, 5500]; log g = 2.45 + 1.6·(Teff − 4750)/1000 + N(0, 0.3) clipped to
    [0.9, 3.6]; [Fe/H] ~ N(−0.25, 0.32) clipped to [−1.6, 0.45].
    """
    teff = np.clip(rng.normal(4750.0, 330.0, n), 3900.0, 5500.0)
    logg = np.clip(2.45 + 1.6e-3 * (teff - 4750.0) + rng.normal(0.0, 0.3, n), 0.9, 3.6)
    fe_h = np.clip(rng.normal(-0.25, 0.32, n), -1.6, 0.45)
    return np.column_stack([teff, logg, fe_h])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _abundance_offsets(fe_h: np.ndarray) -> dict[str, np.ndarray]:
    """[X/Fe] per abundance-trend family as a function of [Fe/H] (n,)."""
    return {
        "iron": np.zeros_like(fe_h),
        "alpha": 0.25 * _sigmoid(-(fe_h + 0.5) / 0.2),
        "manganese": -0.3 * _sigmoid(-(fe_h + 0.6) / 0.25),
        "odd": 0.1 * np.tanh((fe_h + 0.3) / 0.4),
    }


@dataclass(frozen=True)
class StarPhysics:
    """Per-star quantities (each (n,), or (n, S) per species) that set the line strengths and widths."""

    theta: np.ndarray  # 5040 / Teff
    log_pe: np.ndarray  # electron pressure proxy
    log_kappa: np.ndarray  # continuum opacity proxy
    log_species: np.ndarray  # (n, S): [X/H] + log10(neutral fraction) of every species
    microturbulence: np.ndarray  # km/s
    macroturbulence: np.ndarray  # km/s (Gaussian σ, applied with the LSF)
    log_co: np.ndarray  # log10 of the CO column proxy
    teff: np.ndarray


def star_physics(labels: np.ndarray) -> StarPhysics:
    """The atmosphere proxies, abundances and ionisation of stars with ``labels`` (n, 3)."""
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    teff, logg, fe_h = labels.T
    theta = 5040.0 / teff
    log_pe = 0.35 + 0.55 * (logg - 2.5) + 0.45 * fe_h + 7.0 * np.log10(teff / 4700.0)
    log_kappa = log_pe + 2.5 * np.log10(theta) + 0.754 * theta
    trends = _abundance_offsets(fe_h)
    columns = []
    for _, ionisation, _, family, _ in SPECIES:
        log_ionised_over_neutral = 2.5 * np.log10(teff) - theta * ionisation - log_pe - 0.1762
        log_neutral_fraction = -np.logaddexp(0.0, log_ionised_over_neutral * math.log(10.0)) / math.log(10)
        columns.append(fe_h + trends[family] + log_neutral_fraction)
    log_oxygen = fe_h + trends["alpha"]
    log_x = 0.3 + log_oxygen + 0.5 * (logg - 2.5) + _CO_DISSOCIATION_EV * (theta - 5040.0 / 4700.0)
    log_x -= 1.5 * np.log10(teff / 4700.0)
    log_co = (fe_h - 0.1) - np.logaddexp(0.0, -log_x * math.log(10.0)) / math.log(10.0)
    microturbulence = 0.9 + 0.9 * _sigmoid(-(logg - 2.2) / 0.6)
    macroturbulence = 1.5 + 2.5 * _sigmoid(-(logg - 2.0) / 0.5) + 1.2 * _sigmoid((teff - 5000.0) / 250.0)
    return StarPhysics(
        theta=theta,
        log_pe=log_pe,
        log_kappa=log_kappa,
        log_species=np.column_stack(columns),
        microturbulence=microturbulence,
        macroturbulence=macroturbulence,
        log_co=log_co,
        teff=teff,
    )


@dataclass(frozen=True, eq=False)
class LineList:
    """Lines in apStar pixel units of ln λ (``u``; apStar pixel i is at u = i), atomic and molecular alike.

    ``kind`` is the species index (0…S−1) for atomic lines and −1 for molecular band lines; for band lines
    ``band`` is the band index (vibrational lower level) and ``rotational_j`` the rotational quantum number.
    """

    center: np.ndarray  # (L,) u
    kind: np.ndarray  # (L,) int
    excitation_ev: np.ndarray  # (L,) (0 for band lines)
    log_tau_ref: np.ndarray  # (L,) log10 centre optical depth at REFERENCE_LABELS (atomic lines)
    log_damping_ref: np.ndarray  # (L,) log10 damping parameter a at the reference star
    band: np.ndarray  # (L,) int, −1 for atomic lines
    rotational_j: np.ndarray  # (L,) (0 for atomic lines)
    band_log_tau_ref: np.ndarray  # (B,) log10 band strength at the reference star
    mass_amu: np.ndarray  # (L,)

    @property
    def n_lines(self) -> int:
        return self.center.size

    @classmethod
    def draw(
        cls,
        seed: int,
        n_atomic: int,
        n_bands: int,
        u_range: tuple[float, float],
        lines_per_band: int = 60,
    ) -> LineList:
        """The recipe: atomic lines (three quarters uniform in ln λ, a quarter blended with a neighbour
        within ~1 pixel), excitation potentials U(0.5, 7) eV, log τ_ref from a mix of weak (U(−1.6, 0.6),
        90%) and strong, saturated lines (U(0.6, 2.6), 10%), log damping U(−3.5, −2); band heads spread over
        the range, each with ``lines_per_band`` rotational lines ``u = head + 0.04 J²``."""
        rng = np.random.default_rng([INDEPENDENT_STREAM_TAG, seed])
        lo, hi = u_range
        n_blend = n_atomic // 4
        first = rng.uniform(lo, hi, n_atomic - n_blend)
        partners = first[rng.integers(0, first.size, n_blend)] + rng.normal(0.0, 0.8, n_blend)
        center = np.concatenate([first, np.clip(partners, lo, hi)])
        shares = np.array([s[4] for s in SPECIES])
        kind = rng.choice(len(SPECIES), n_atomic, p=shares / shares.sum())
        excitation = rng.uniform(0.5, 7.0, n_atomic)
        strong = rng.random(n_atomic) < 0.1
        log_tau = np.where(strong, rng.uniform(0.6, 2.6, n_atomic), rng.uniform(-1.6, 0.6, n_atomic))
        log_damping = rng.uniform(-3.5, -2.0, n_atomic)
        mass = np.array([SPECIES[k][2] for k in kind])

        span = (hi - lo) / n_bands
        heads = lo + span * (np.arange(n_bands) + 0.5) + rng.uniform(-0.3, 0.3, n_bands) * span
        j = np.tile(np.arange(lines_per_band, dtype=float), n_bands)
        band = np.repeat(np.arange(n_bands), lines_per_band)
        band_center = heads[band] + 0.04 * j**2
        band_log_tau = rng.uniform(-0.8, 0.0, n_bands)
        n_band_lines = band.size
        return cls(
            center=np.concatenate([center, band_center]),
            kind=np.concatenate([kind, np.full(n_band_lines, -1)]),
            excitation_ev=np.concatenate([excitation, np.zeros(n_band_lines)]),
            log_tau_ref=np.concatenate([log_tau, np.zeros(n_band_lines)]),
            log_damping_ref=np.concatenate([log_damping, np.full(n_band_lines, -3.0)]),
            band=np.concatenate([np.full(n_atomic, -1), band]),
            rotational_j=np.concatenate([np.zeros(n_atomic), j]),
            band_log_tau_ref=band_log_tau,
            mass_amu=np.concatenate([mass, np.full(n_band_lines, 28.0)]),
        )

    def centre_optical_depths(self, physics: StarPhysics) -> np.ndarray:
        """Centre optical depth τ0 of every line for every star, (n, L)."""
        reference = star_physics(REFERENCE_LABELS[None])
        atomic = self.kind >= 0
        species = np.where(atomic, self.kind, 0)
        log_tau = np.empty((physics.theta.size, self.n_lines))
        delta_species = physics.log_species[:, species] - reference.log_species[:, species]
        delta_boltzmann = -np.outer(physics.theta - reference.theta, self.excitation_ev)
        delta_kappa = (physics.log_kappa - reference.log_kappa)[:, None]
        log_tau[:] = self.log_tau_ref + delta_species + delta_boltzmann - delta_kappa
        # Molecular band lines: band strength × rotational population (peak-normalised at the reference).
        band_lines = ~atomic
        j = self.rotational_j[band_lines]
        band = self.band[band_lines]
        rotation = np.log10(2.0 * j + 1.0) - np.outer(
            _CO_ROTATION_K / physics.teff, j * (j + 1.0)
        ) / math.log(10)
        rotation_ref = np.log10(2.0 * j + 1.0) - _CO_ROTATION_K / 4700.0 * j * (j + 1.0) / math.log(10)
        vibration = -np.outer(physics.theta, band * _CO_VIBRATION_EV)
        vibration_ref = -reference.theta * band * _CO_VIBRATION_EV
        log_tau[:, band_lines] = (
            self.band_log_tau_ref[band]
            + (physics.log_co - reference.log_co)[:, None]
            - delta_kappa
            + rotation
            - rotation_ref.max()
            + vibration
            - vibration_ref
        )
        return 10.0**log_tau

    def doppler_widths_kms(self, physics: StarPhysics) -> np.ndarray:
        """Gaussian σ (km/s) of every line's intrinsic profile for every star, (n, L): thermal and
        microturbulent velocities in quadrature."""
        thermal = _K_OVER_AMU * np.outer(physics.teff, 1.0 / self.mass_amu)
        return np.sqrt(thermal + (physics.microturbulence**2)[:, None])

    def damping(self, physics: StarPhysics) -> np.ndarray:
        """Damping parameter a (Lorentzian HWHM in units of the Doppler σ) of every line, (n, L)."""
        reference = star_physics(REFERENCE_LABELS[None])
        return 10.0 ** (self.log_damping_ref + 0.3 * (physics.log_pe - reference.log_pe)[:, None])


def brackett_optical_depths(physics: StarPhysics) -> tuple[np.ndarray, np.ndarray]:
    """Centre optical depth (n, B) and Lorentzian half width in km/s (n, B) of the Brackett lines.

    At the reference star the strongest (n = 11) has τ0 = 0.02 and a half width of 60 km/s; higher series
    members are weaker (∝ n⁻³) and broader (∝ n²/121).
    """
    reference = star_physics(REFERENCE_LABELS[None])
    upper = np.array(BRACKETT_UPPER_LEVELS, dtype=float)
    log_strength = -_BRACKETT_EXCITATION_EV * (physics.theta - reference.theta) - (
        physics.log_kappa - reference.log_kappa
    )
    tau = 0.02 * (11.0 / upper) ** 3 * 10.0 ** log_strength[:, None]
    width = 60.0 * (upper / 11.0) ** 2 * 10.0 ** (2.0 / 3.0 * (physics.log_pe - reference.log_pe))[:, None]
    return tau, width


def u_of_wavelength(wavelength: np.ndarray) -> np.ndarray:
    """Position (apStar pixel units of ln λ) of vacuum wavelengths in Å."""
    return (np.log(np.asarray(wavelength, dtype=float)) - _LN_START) / _LN_STEP
