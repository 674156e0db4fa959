"""The result tables, one per analysis (``doppler``, ``thecannon``, ...), on :class:`OutputMixin`.

Every column carries its description and unit (:func:`result_column`), which the summary catalogues
(:mod:`astra_provider.catalogue`) write into their headers. The tables are re-exported by
:mod:`astra_provider.database.astradb`, where tasks import them from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Float, Integer, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, declared_attr, mapped_column

from astra_provider.database.declarative import Base, JSONType, PrimaryKey, foreign_key


def result_column(type_: Any, description: str, unit: str | None = None, **kwargs: Any) -> Any:
    """A column of a result table with its description and unit, kept in ``column.info`` for the summary
    catalogues (:mod:`astra_provider.catalogue`): define them once, here. The unit is a string that astropy
    parses and FITS allows (``"km / s"``, ``"K"``); logarithmic quantities (dex) have none, and say so in
    their description."""
    return mapped_column(type_, info={"description": description, "unit": unit}, **kwargs)


if TYPE_CHECKING:
    # every result table is ``class Results(OutputMixin, Base)``: typed as a ``Base`` subclass, the mixin has
    # the ``__tablename__`` and ``__table__`` the catalogue code reads
    class _ResultTableBase(Base):
        __abstract__ = True
else:
    _ResultTableBase = object


class OutputMixin(_ResultTableBase):
    """Columns every result table has: its ``output_interface`` key, the task and the data product.

    Declare a result table once, with the description and unit of each column (the summary catalogues
    write them into their headers)::

        class RandomNumberGenerator(OutputMixin, Base):
            __tablename__ = "random_number_generator"
            samples: Mapped[list[float]] = result_column(JSONType, "Samples drawn")

    and write rows from a task with :meth:`astra_provider.base.TaskInstance.add_result`. A table whose
    ``bitmask_flag`` holds the bits of an ``enum.IntFlag`` names it in ``flag_enum`` (dotted path): each bit
    becomes a boolean ``flag_<name>`` column of the catalogue.
    """

    flag_enum: str | None = None

    @declared_attr
    def output_pk(cls) -> Mapped[int]:
        return mapped_column(
            PrimaryKey,
            foreign_key("output_interface.pk", ondelete="RESTRICT"),
            primary_key=True,
            info={"description": "Unique key of the result, across all result tables"},
        )

    @declared_attr
    def task_pk(cls) -> Mapped[int]:
        return mapped_column(
            PrimaryKey,
            foreign_key("task.pk"),
            index=True,
            info={"description": "The task that wrote the result"},
        )

    @declared_attr
    def data_product_pk(cls) -> Mapped[int | None]:
        return mapped_column(
            PrimaryKey,
            foreign_key("data_product.pk", ondelete="SET NULL"),
            index=True,
            info={"description": "The data product (spectrum file) analysed"},
        )


# Result tables -----------------------------------------------------------------------------------------

_SNR = "Signal-to-noise ratio per pixel of the spectrum"
_ROW = "Row of the spectrum in its file (apStar: 0, 1 stacks, then the visits)"
_KMS = "km / s"


_FloatColumn = Mapped[float | None]


def _labels_and_uncertainties(
    of: str = "", column: Callable[..., Any] = result_column
) -> tuple[_FloatColumn, _FloatColumn, _FloatColumn, _FloatColumn, _FloatColumn, _FloatColumn]:
    """The columns teff, logg and fe_h, each followed by its uncertainty (named ``u_*`` or ``e_*`` by the
    table), made by ``column``; ``of`` ends the labels' descriptions (``" of the best template"``)."""
    return (
        column(Float, f"Effective temperature{of}", "K"),
        column(Float, "Uncertainty of teff", "K"),
        column(Float, f"Surface gravity log10(g / cm s-2){of}"),
        column(Float, "Uncertainty of logg (dex)"),
        column(Float, f"Metallicity [Fe/H] (dex){of}"),
        column(Float, "Uncertainty of fe_h (dex)"),
    )


class RandomNumberGenerator(OutputMixin, Base):
    """The user's guide example result table (``astra_provider.contrib.examples``)."""

    __tablename__ = "random_number_generator"

    samples: Mapped[list[float]] = result_column(
        JSON().with_variant(JSONB(), "postgresql"), "Random samples drawn by the task"
    )


class Continuum(OutputMixin, Base):
    """Sinusoidal pseudo-continuum fits; the normalised spectra are output data products."""

    __tablename__ = "continuum"

    row_index: Mapped[int] = result_column(Integer, _ROW, default=0)
    snr: Mapped[float | None] = result_column(Float, _SNR)
    n_continuum_pixels: Mapped[int | None] = result_column(Integer, "Continuum pixels used in the fit")
    rms_residual: Mapped[float | None] = result_column(
        Float, "RMS of (normalised flux - 1) / sigma over the continuum pixels"
    )
    bitmask_flag: Mapped[int] = result_column(Integer, "Flags: 1 = fit failed (too few pixels)", default=0)


class Doppler(OutputMixin, Base):
    """Radial velocity (and template labels) of one visit spectrum.

    One row per visit: an apVisit or BOSS file gives one (``row_index`` 0), an apStar file one per visit row
    (``row_index`` is the row of the file). ``vhelio = vrel + bc`` always; for BOSS, whose wavelengths are
    already heliocentric, ``bc = −HELIO_RV``. ``template_grid`` names the grid of the reported fit,
    ``model_mismatch`` the model error its χ² implies (fraction of the continuum), and ``bitmask_flag`` holds
    :class:`astra_provider.science.doppler.RVFlag` bits.
    """

    __tablename__ = "doppler"
    flag_enum = "astra_provider.science.flags.RVFlag"

    row_index: Mapped[int] = result_column(Integer, _ROW, default=0)
    vhelio: Mapped[float | None] = result_column(Float, "Heliocentric (barycentric) radial velocity", _KMS)
    vrel: Mapped[float | None] = result_column(Float, "Radial velocity in the observed frame", _KMS)
    u_vrel: Mapped[float | None] = result_column(Float, "Uncertainty of vrel (and vhelio)", _KMS)
    bc: Mapped[float | None] = result_column(
        Float, "Barycentric correction: vhelio = vrel + bc (BOSS: -HELIO_RV)", _KMS
    )
    teff, u_teff, logg, u_logg, fe_h, u_fe_h = _labels_and_uncertainties(" of the best template")
    chisq: Mapped[float | None] = result_column(Float, "Reduced chi-squared of the fit")
    ccf_peak: Mapped[float | None] = result_column(Float, "Height of the normalised cross-correlation peak")
    model_mismatch: Mapped[float | None] = result_column(
        Float, "Model error implied by the chi-squared (fraction of the continuum)"
    )
    template_grid: Mapped[str | None] = result_column(Text, "Template grid of the reported fit")
    snr: Mapped[float | None] = result_column(Float, _SNR)
    bitmask_flag: Mapped[int] = result_column(Integer, "Flags (RVFlag bits; 0 = good)", default=0)


def _label_column(type_: Any, description: str, unit: str | None = None, **kwargs: Any) -> Any:
    """A :func:`result_column` placed before the columns of the table's own class (``sort_order``)."""
    return result_column(type_, description, unit, sort_order=-1, **kwargs)


class LabelColumns:
    """The columns of a 3-label fit (teff, logg, fe_h) shared by :class:`TheCannon` and :class:`ThePayne`:
    the labels, their uncertainties and correlations, and the fit's chi-squared (first in the table, as
    they were declared in each table before this mixin existed)."""

    row_index: Mapped[int] = _label_column(Integer, _ROW, default=0)
    snr: Mapped[float | None] = _label_column(Float, _SNR)
    teff, e_teff, logg, e_logg, fe_h, e_fe_h = _labels_and_uncertainties("", _label_column)
    rho_teff_logg: Mapped[float | None] = _label_column(Float, "Correlation of teff and logg")
    rho_teff_fe_h: Mapped[float | None] = _label_column(Float, "Correlation of teff and fe_h")
    rho_logg_fe_h: Mapped[float | None] = _label_column(Float, "Correlation of logg and fe_h")
    chi_sq: Mapped[float | None] = _label_column(Float, "Chi-squared of the fit")
    reduced_chi_sq: Mapped[float | None] = _label_column(Float, "Reduced chi-squared of the fit")


class TheCannon(LabelColumns, OutputMixin, Base):
    """Labels from The Cannon for one spectrum (3-label model: teff, logg, fe_h).

    Models with other label sets store all labels in ``labels`` (JSON: name -> value, ``e_<name>``,
    ``rho_<a>_<b>``); the named columns are filled for the labels they name.
    """

    __tablename__ = "thecannon"
    flag_enum = "astra_provider.science.flags.CannonFlag"

    bitmask_flag: Mapped[int] = result_column(Integer, "Flags (CannonFlag bits; 0 = good)", default=0)
    labels: Mapped[dict[str, Any] | None] = result_column(
        JSONType, "All labels, uncertainties and correlations of the model (JSON)"
    )


class ThePayne(LabelColumns, OutputMixin, Base):
    """Labels from The Payne for one spectrum (3-label model: teff, logg, fe_h).

    Like :class:`TheCannon`: models with other label sets store all labels in ``labels`` (JSON: name ->
    value, ``e_<name>``, ``rho_<a>_<b>``, fit statistics); the named columns are filled for the labels they
    name. ``bitmask_flag`` holds :class:`~astra_provider.science.payne.PayneFlag` bits.
    """

    __tablename__ = "thepayne"
    flag_enum = "astra_provider.science.flags.PayneFlag"

    bitmask_flag: Mapped[int] = result_column(Integer, "Flags (PayneFlag bits; 0 = good)", default=0)
    labels: Mapped[dict[str, Any] | None] = result_column(
        JSONType, "All labels, uncertainties, correlations and fit statistics of the model (JSON)"
    )


__all__ = [
    "Continuum",
    "Doppler",
    "LabelColumns",
    "OutputMixin",
    "RandomNumberGenerator",
    "TheCannon",
    "ThePayne",
    "result_column",
]
