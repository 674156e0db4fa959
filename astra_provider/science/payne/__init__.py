"""The Payne (Ting, Conroy, Rix & Cargile 2019, ApJ 879, 69): a neural-network emulator of normalised
spectra as a function of labels, trained on labelled spectra (:func:`train`) and fitted to new spectra
(:func:`fit`). Pure numpy/scipy, batch-first; see :mod:`.network`, :mod:`.train`, :mod:`.fit`, :mod:`.model`.
"""

from astra_provider.science.flags import PayneFlag
from astra_provider.science.payne.fitting import (
    PayneResult,
    check_wavelength,
    continuum_correction_factor,
    fit,
)
from astra_provider.science.payne.model import FORMAT_VERSION, MODEL_KIND, PayneModel, describe_grid
from astra_provider.science.payne.network import ACTIVATION, Network
from astra_provider.science.payne.training import default_hidden_sizes, minimum_training_size, train

__all__ = [
    "ACTIVATION",
    "FORMAT_VERSION",
    "MODEL_KIND",
    "Network",
    "PayneFlag",
    "PayneModel",
    "PayneResult",
    "check_wavelength",
    "continuum_correction_factor",
    "default_hidden_sizes",
    "describe_grid",
    "fit",
    "minimum_training_size",
    "train",
]
