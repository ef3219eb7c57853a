"""The knapsack's error table: how much each unit loses at each width, from a measurement.

:func:`unit_errors` turns the measured probes (or, for the non-task-aware baselines HIGGS and
HAWQ, the per-linear errors of the mixture stage) into ``errors[unit][bits]`` for
:func:`tasa.alloc.allocate_layers`. Mathematics only: it reads a measurement object (duck-typed:
``sensitivity``, ``units``, ``mixture``) and imports nothing but numpy and the defaults.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from . import defaults

__all__ = ["SCORINGS", "unit_errors", "error_shape"]

SCORINGS = ("tasa", "higgs", "hawq")


def unit_errors(measurement, beta: float = defaults.BETA,
                widths: Sequence[int] = defaults.WIDTHS, scoring: str = "tasa") -> tuple:
    """The knapsack's ``errors[unit][b]`` for every width of ``widths``, and
    ``(scores, dropped objectives)`` for the report.

    * ``"tasa"``: per objective ``k`` and measured width ``b``, the clipped loss increase
      ``max(delta_k[u](b), 0) / Z_k`` with ``Z_k`` the objective's summed clipped increase at
      the lowest measured width (one scale per objective, shared by its widths), aggregated as
      ``beta * ppl + (1 - beta) * mean over tasks`` (:func:`tasa.stats.aggregate`). Widths
      that were not probed come from the nearest lower width ``b'``: by the unit's own
      error ratio ``e(b) = e(b') E_u(b) / E_u(b')`` where the measurement recorded the probes'
      quantizer's output error ``E_u`` at both widths (``sensitivity.unit_error``, see
      :func:`error_shape`), else by the noise model ``e(b) = e(b') 4^-(b - b')`` (a
      measurement with one probe width and no ``unit_error`` is exactly the older noise-model
      allocation); 8 bits is extrapolated from the 4-bit value (~1/256 of it, near zero).
      Then ``e`` is made non-increasing in the width (``e(b) = min(e(b), e(b'))`` for
      ``b' < b``): a wider probe that measured worse is noise, and must not make the DP pay to
      lose quality.
    * ``"higgs"`` (not task-aware; HIGGS's dynamic bit-width allocation, arXiv 2411.17525): by
      its linearity theorem the perplexity increase is ``sum_l a_l t_l(b)^2`` with ``t_l`` the
      relative l2 error of linear ``l``. ``t_l(b)^2`` is measured for every width
      (``mixture.linear_errors["rel"]``, the RTN that is applied); the coefficient per unit is
      calibrated on its general-text probe, ``a_u = max(delta_ppl[u](b0), 0) / T_u(b0)`` with
      ``T_u = sum_{l in u} t_l^2`` (HIGGS calibrates ``a_l`` by injecting noise; the RTN probe is
      such a perturbation of known size).
    * ``"hawq"`` (not task-aware, no probes): GPTQ's output-error proxy on general text,
      ``sum_{l in u} sum_k diag(H_gen)_k ||W_k - RTN_b(W)_k||^2`` (``linear_errors["gen"]``).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"tasa: scoring must be one of {SCORINGS}, got {scoring!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"tasa: beta must be in [0, 1], got {beta}")
    sens = measurement.sensitivity
    units = measurement.units
    names = list(units)
    widths = sorted(int(b) for b in widths)
    dropped: List[str] = []
    if scoring in ("higgs", "hawq"):
        mix = measurement.mixture
        if not mix.linear_errors:
            raise ValueError(f"tasa: scoring {scoring!r} needs the per-linear errors of the "
                             f"mixture stage (a measurement from before they were recorded)")
        ew = [int(b) for b in mix.group_error_widths]
        key = "rel" if scoring == "higgs" else "gen"
        T = {u: {b: sum(mix.linear_errors[f][key][ew.index(b)] for f in units[u]["linears"])
                 for b in set(widths) | {int(sens.bits)}} for u in names}
        if scoring == "hawq":
            err = {u: {b: T[u][b] for b in widths} for u in names}
        else:
            if "ppl" not in sens.objectives:
                raise ValueError("tasa: scoring 'higgs' calibrates on the ppl objective; the "
                                 "measurement has none")
            b0 = int(sens.bits)
            err = {}
            for u in names:
                a = max(float(sens.delta[u]["ppl"]), 0.0) / max(T[u][b0], 1e-300)
                err[u] = {b: a * T[u][b] for b in widths}
        scores = np.array([err[u][widths[0]] for u in names])
        return err, scores, dropped
    measured = [b for b in sens.widths if all(u in sens.deltas(b) for u in names)]
    b0 = measured[0]
    prof = {b: {k: np.array(v, dtype=np.float64) for k, v in sens.profile(names, b).items()}
            for b in measured}
    # an objective whose probes never increased its loss carries no ranking information (e.g.
    # an untrained model): it is left out of the aggregate, and the report says so
    dropped = sorted(k for k, v in prof[b0].items() if not (v > 0).any())
    objs = [k for k in sens.objectives if k not in dropped]
    tasks = [k for k in objs if k != "ppl"]
    if not objs:
        w: Dict[str, float] = {}
    elif "ppl" not in objs:
        if beta > 0 and "ppl" not in dropped:
            raise ValueError("tasa: beta > 0 needs the ppl objective in the measurement")
        w = {k: 1.0 / len(tasks) for k in tasks}
    elif not tasks:
        w = {"ppl": 1.0}
    else:
        w = {"ppl": float(beta), **{k: (1.0 - float(beta)) / len(tasks) for k in tasks}}
    Z = {k: float(np.maximum(prof[b0][k], 0.0).sum()) for k in w}
    e_meas = {}
    for b in measured:
        if not w:
            e_meas[b] = np.full(len(names), 1.0 / len(names)) * 4.0 ** -(b - b0)
        else:
            e_meas[b] = sum(wk * np.maximum(prof[b][k], 0.0) / Z[k] for k, wk in w.items())
    shape = error_shape(sens, names)
    col: Dict[int, np.ndarray] = {}      # every allowed and measured width, ascending
    prev = None
    for b in sorted(set(widths) | set(measured)):
        if b in e_meas:
            e = e_meas[b]
        else:      # from the nearest lower width, as clipped below (else the lowest measured)
            lower = [m for m in col if m < b]
            src = max(lower) if lower else min(measured)
            base = col[src] if lower else e_meas[src]
            noise_model = 4.0 ** -(b - src)
            if b in shape and src in shape:
                # the unit's own error ratio under the probes' quantizer (a unit whose error
                # shrinks less than 4x from 3 to 4 bits keeps more of its probe)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where(shape[src] > 0, shape[b] / shape[src], noise_model)
                e = base * ratio
            else:
                e = base * noise_model
        col[b] = e if prev is None else np.minimum(e, prev)
        prev = col[b]
    err = {u: {b: float(col[b][i]) for b in widths} for i, u in enumerate(names)}
    return err, e_meas[b0], dropped


def error_shape(sens, names: Sequence[str]) -> Dict[int, np.ndarray]:
    """``{b: [E_u(b) for u in names]}`` for every width at which ``sens.unit_error`` holds all
    of ``names`` (finite, >= 0); ``{}`` for a measurement without it."""
    out: Dict[int, np.ndarray] = {}
    for b, per_unit in (getattr(sens, "unit_error", None) or {}).items():
        if all(u in per_unit for u in names):
            v = np.array([float(per_unit[u]) for u in names], dtype=np.float64)
            if np.isfinite(v).all() and (v >= 0).all():
                out[int(b)] = v
    return out
