"""Doppler radial velocities as a task, bundled on ``model_path``.

Each task reads one apVisit file. The model (a Cannon model from ``TrainTheCannon``) is loaded once per
bundle, and the whole bundle is measured in one batch by
:func:`astra_provider.science.doppler.measure_visit_radial_velocities`: pseudo-continuum on the observed
pixels that fall on the rest-frame continuum pixels, FFT cross-correlation (on a resampled copy) against
templates from the model for a starting velocity, then a joint Gauss-Newton fit of velocity and labels
with the model evaluated at the visit's own pixels (the data are never resampled for the fit, so their
noise stays independent and the uncertainties are honest). The barycentric correction comes from
the file header (``BC``, km/s): ``vhelio = vrel + bc``. One ``astra.doppler`` row per visit; ``bitmask_flag``
holds :class:`astra_provider.science.doppler.RVFlag` bits.
"""

from __future__ import annotations

from astra_provider.base import Parameter, TaskInstance
from astra_provider.database.astradb import Doppler


class DopplerRadialVelocity(TaskInstance):
    """Radial velocity and template labels of apVisit spectra."""

    model_path = Parameter(
        type=str, bundled=True, description="A Cannon model file (templates for the CCF and fit)."
    )
    max_velocity = Parameter(
        default=1000.0, type=float, bundled=True, description="Largest |velocity| searched (km/s)."
    )

    def pre_execute(self):
        from astra_provider.science.cannon import CannonModel

        self.model = CannonModel.load(self.model_path)

    def execute(self):
        import numpy as np

        from astra_provider.science.doppler import measure_visit_radial_velocities
        from astra_provider.sdss.spectrum import read_spectrum

        def read(path: str):
            visit = read_spectrum(path)
            if not np.isfinite(float(visit.meta.get("bc", np.nan))):
                raise ValueError(f"{path}: no barycentric correction (BC) in the header")
            return visit

        inputs = self.read_inputs(read)
        if not inputs:
            return []
        visits = [visit for _, _, visit in inputs]
        result = measure_visit_radial_velocities(
            [visit.wavelength for visit in visits],
            [visit.flux[0] for visit in visits],
            [visit.ivar[0] for visit in visits],
            self.model,
            max_velocity=float(self.max_velocity),
        )
        outputs = {}
        for index, (task, data_product, visit) in enumerate(inputs):
            bc, snr = float(visit.meta["bc"]), float(visit.snr[0])
            row = {
                "vrel": result.vrel[index],
                "u_vrel": result.u_vrel[index],
                "bc": bc,
                "vhelio": result.vrel[index] + bc,
                "chisq": result.chisq[index],
                "ccf_peak": result.ccf_peak[index],
                "snr": snr,
                "bitmask_flag": int(result.flag[index]),
            }
            for name in ("teff", "logg", "fe_h"):
                row[name] = getattr(result, name)[index]
                row[f"u_{name}"] = getattr(result, f"u_{name}")[index]
            row = {
                key: (float(value) if np.isfinite(value) else None) if key != "bitmask_flag" else value
                for key, value in row.items()
            }
            self.add_result(task, Doppler, data_product=data_product, **row)
            outputs[task.pk] = {"vhelio": row["vhelio"], "u_vrel": row["u_vrel"], "flag": row["bitmask_flag"]}
        return [outputs.get(task.pk) for task, _ in self.iterable()]
