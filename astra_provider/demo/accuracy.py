"""The demo's accuracy against the truth: results matched to ``truth.csv`` (Doppler's by their apVisit data
products, The Cannon's through provenance to the apStar file), and the summary's tables of radial-velocity and
label bias and scatter, compared with the Cramér-Rao bounds of the truth model."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

#: (column, name, unit, format) of the labels compared with the truth.
LABELS = (
    ("teff", "Teff", "K", "{:+.1f}"),
    ("logg", "logg", "dex", "{:+.3f}"),
    ("fe_h", "[Fe/H]", "dex", "{:+.3f}"),
)
#: Edges of the visit S/N bins of the radial-velocity summary.
RV_SNR_EDGES = (0.0, 35.0, 60.0, 100.0, math.inf)


def rv_accuracy(astra_url: str, task_pks: list[int], truth: Any) -> dict[str, Any]:
    """Doppler results of these tasks matched to the truth by the data products' ``kwargs_hash``."""
    import numpy as np
    from sqlalchemy import select

    from astra_provider.database.astradb import DataProduct, Doppler
    from astra_provider.synthetic.model.bounds import crb_rv, differentiable_truth_model

    query = select(
        Doppler.task_pk,
        Doppler.output_pk,
        Doppler.vhelio,
        Doppler.u_vrel,
        Doppler.bitmask_flag,
        Doppler.chisq,
        DataProduct.kwargs_hash,
    ).join(DataProduct, DataProduct.pk == Doppler.data_product_pk)
    latest = _latest_results(astra_url, query, Doppler.task_pk, task_pks, truth)
    matched = [(v, u, f, t, c) for (v, u, f, c), t in latest.values() if t is not None and v is not None]
    if not matched:
        return {"n": 0, "n_results": len(latest)}
    measured = np.array([m[0] for m in matched])
    true = np.array([m[3]["vhelio_kms"] for m in matched])
    snr = np.array([m[3]["snr"] for m in matched])
    labels = np.array([[m[3]["teff"], m[3]["logg"], m[3]["fe_h"]] for m in matched])
    model = differentiable_truth_model(truth.parameters)
    crb = crb_rv(model, labels, snr, true - np.array([m[3]["bc_kms"] for m in matched]))
    return {
        "n": len(matched),
        "n_results": len(latest),
        "residual": measured - true,
        "u_vrel": np.array([m[1] if m[1] is not None else np.nan for m in matched]),
        "flag": np.array([m[2] for m in matched]),
        "chisq": np.array([m[4] if m[4] is not None else np.nan for m in matched]),
        "snr": snr,
        "crb": crb,
    }


def label_accuracy(astra_url: str, task_pks: list[int], truth: Any) -> dict[str, Any]:
    """The Cannon's labels matched to the truth through provenance: the normalised spectrum it fitted is
    the output of a continuum task, whose input apStar file has keywords in the truth table."""
    import numpy as np
    from sqlalchemy import select
    from sqlalchemy.orm import aliased

    from astra_provider.database.astradb import (
        DataProduct,
        TaskInputDataProduct,
        TaskOutputDataProduct,
        TheCannon,
    )
    from astra_provider.synthetic.model.bounds import crb_labels, differentiable_truth_model

    source = aliased(DataProduct)
    query = (
        select(
            TheCannon.task_pk,
            TheCannon.output_pk,
            TheCannon.teff,
            TheCannon.logg,
            TheCannon.fe_h,
            TheCannon.bitmask_flag,
            source.kwargs_hash,
        )
        .join(TaskOutputDataProduct, TaskOutputDataProduct.data_product_pk == TheCannon.data_product_pk)
        .join(TaskInputDataProduct, TaskInputDataProduct.task_pk == TaskOutputDataProduct.task_pk)
        .join(source, source.pk == TaskInputDataProduct.data_product_pk)
    )
    latest = _latest_results(astra_url, query, TheCannon.task_pk, task_pks, truth)
    matched = [
        ((teff, logg, fe_h), flag, row)
        for (teff, logg, fe_h, flag), row in latest.values()
        if row is not None and all(v is not None for v in (teff, logg, fe_h))
    ]
    if not matched:
        return {"n": 0, "n_results": len(latest)}
    fitted = np.array([m[0] for m in matched], dtype=float)
    true = np.array([[m[2]["teff"], m[2]["logg"], m[2]["fe_h"]] for m in matched])
    snr = np.array([m[2]["snr"] for m in matched])
    model = differentiable_truth_model(truth.parameters)
    return {
        "n": len(matched),
        "n_results": len(latest),
        "fitted": fitted,
        "true": true,
        "snr": snr,
        "flag": np.array([m[1] for m in matched]),
        "crb": crb_labels(model, true, snr, include_scatter=True),
    }


def print_accuracy(rv: dict[str, Any], labels: dict[str, Any], say: Callable[[str], None]) -> None:
    """The accuracy section of the summary: RV bias and scatter by visit S/N, then the labels'."""
    import numpy as np

    say("")
    say("Accuracy against the truth (results matched to truth.csv by the data products' kwargs_hash):")
    if not rv["n"]:
        say(f"  radial velocities: no Doppler result matched the truth ({rv['n_results']} results)")
    else:
        residual, snr, crb = rv["residual"], rv["snr"], rv["crb"]
        say(f"  Radial velocities (Doppler, vhelio - truth, km/s) of {rv['n']} apVisit spectra:")
        say(
            f"    {'visit S/N':<11} {'n':>5} {'bias':>9} {'± err':>7} {'scatter':>8} {'robust σ':>9} "
            f"{'median σ_formal':>16} {'CRB':>7} {'scatter/CRB':>12} {'median χ²':>10}"
        )
        bins = [
            (f"< {hi:g}" if lo == 0 else f">= {lo:g}" if hi == math.inf else f"{lo:g}-{hi:g}", lo, hi)
            for lo, hi in zip(RV_SNR_EDGES[:-1], RV_SNR_EDGES[1:], strict=True)
        ]
        for name, lo, hi in [*bins, ("all", 0.0, math.inf), ("unflagged", None, None)]:
            pick = rv["flag"] == 0 if lo is None else (snr >= lo) & (snr < hi)
            if not pick.any():
                continue
            r = residual[pick]
            rms_crb = float(np.sqrt(np.mean(crb[pick] ** 2)))
            scatter = float(np.std(r))
            say(
                f"    {name:<11} {pick.sum():>5} {np.mean(r):>+9.3f} "
                f"{scatter / np.sqrt(pick.sum()):>7.3f} "
                f"{scatter:>8.3f} {robust(r):>9.3f} {np.nanmedian(rv['u_vrel'][pick]):>16.3f} "
                f"{rms_crb:>7.3f} {scatter / rms_crb:>12.2f} {np.nanmedian(rv['chisq'][pick]):>10.2f}"
            )
        say(f"    flags: {flag_counts(rv['flag'], 'astra_provider.science.doppler', 'RVFlag')}")
        say(
            "    CRB: Cramér-Rao bound of the truth model for the visit S/N (synthetic.model.crb_rv: "
            "apStar grid, matched template), rms per bin"
        )
    say("")
    if not labels["n"]:
        say(f"  stellar labels: no Cannon result matched the truth ({labels['n_results']} results)")
        return
    say(f"  Stellar labels (The Cannon, fitted - truth) of {labels['n']} apStar spectra:")
    say(
        f"    {'label':<8} {'unit':<5} {'bias':>9} {'scatter':>9} {'robust σ':>9} {'CRB':>9}   "
        "scatter at S/N < 60 / >= 60"
    )
    low = labels["snr"] < 60
    for k, (_, name, unit, fmt) in enumerate(LABELS):
        d = labels["fitted"][:, k] - labels["true"][:, k]
        by_snr = " / ".join(
            fmt.format(float(np.std(d[pick]))).lstrip("+") if pick.any() else "-" for pick in (low, ~low)
        )
        say(
            f"    {name:<8} {unit:<5} {fmt.format(float(np.mean(d))):>9} "
            f"{fmt.format(float(np.std(d))).lstrip('+'):>9} {fmt.format(robust(d)).lstrip('+'):>9} "
            f"{fmt.format(float(np.sqrt(np.mean(labels['crb'][:, k] ** 2)))).lstrip('+'):>9}   {by_snr}"
        )
    say(f"    flags: {flag_counts(labels['flag'], 'astra_provider.science.cannon', 'CannonFlag')}")
    say("    CRB: Cramér-Rao bound of the truth model with its intrinsic scatter (crb_labels), rms")


def robust(values: Any) -> float:
    """The scatter from the median absolute deviation (a Gaussian's σ)."""
    import numpy as np

    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def flag_counts(flags: Any, module: str, name: str) -> str:
    """``"none"`` or ``"NOT_CONVERGED 12, LABELS_AT_EDGE 3 (of 400)"``: spectra per flag bit."""
    import importlib

    bits = getattr(importlib.import_module(module), name)
    counts = [(bit.name, int(sum((int(f) & bit.value) != 0 for f in flags))) for bit in bits]
    text = ", ".join(f"{bit} {n}" for bit, n in counts if n)
    return f"{text} (of {len(flags)})" if text else "none"


def _latest_results(
    astra_url: str, query: Any, task_pk_column: Any, task_pks: list[int], truth: Any
) -> dict[int, tuple[tuple[Any, ...], dict[str, Any] | None]]:
    """Each task's last result (largest output pk) of ``query``, whose rows are ``(task_pk, output_pk,
    *values, kwargs_hash)``: its values, and the truth row of its data product (``None`` if not in the truth).
    """
    from astra_provider.database import session_scope
    from astra_provider.database.recording import select_in

    by_key = truth_by_keywords(truth)
    with session_scope(astra_url) as session:
        rows = select_in(session, query, task_pk_column, task_pks)
    latest = {}
    for task_pk, _, *values, key in sorted(rows, key=lambda r: r[1]):
        latest[task_pk] = (tuple(values), by_key.get(key))
    return latest


def truth_by_keywords(truth: Any) -> dict[str, dict[str, Any]]:
    """The truth rows by ``kwargs_hash``: the identity of their files as data products."""
    return {row["kwargs_hash"]: row for row in truth.rows}
