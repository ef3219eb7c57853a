"""Bit allocation: which bit width each layer (inter-layer) and each group (intra-layer) gets.

Everything is measured with the exact cost model of the packing format,
``tasa_ext.cost_bits`` (``csrc/include/tasa/format.h``): codes with column padding, fp16 scales,
fp16 zeros (asymmetric), the group table and the act-order permutation. "Average bits" always
means ``sum cost_bits / sum N*K``; a plan never exceeds its budget under that function.

Inter-layer (:func:`allocate_layers`)
-------------------------------------
A multiple-choice knapsack. Each *item* is a linear or a set of linears that must share one
width (e.g. a transformer block when sensitivity was measured per block); it picks one uniform
width ``b`` from ``widths`` (default ``(3, 4, 8)``, any subset of ``{2, 3, 4, 8}``) at exact cost
``cost_l(b) = sum_members cost_bits(N, K, G, [b]*n_groups, mode, act_order)`` and error ``e_l(b)``:

* measured errors where given (``errors[item][b]``), otherwise
* the noise model ``e_l(b) = max(s_l, 0) * 2^(-2 (b - ref_bits))`` with ``s_l`` the item's
  sensitivity measured at ``ref_bits`` (default 4). Rationale: a uniform quantizer's error
  variance is proportional to the step squared, ``Delta^2 ~ 4^-b``, and near a minimum the loss
  increase is (second-order Taylor) proportional to the weight-error energy, so the loss
  increase measured at ``ref_bits`` scales by ``4^-(b - ref_bits)``. Negative measured
  sensitivities (noise: quantizing made the loss slightly better) are clipped to 0 -- the
  model has no way to express "more bits hurt".

minimise ``sum_l e_l(b_l)`` s.t. ``sum_l cost_l(b_l) <= budget``,
``budget = floor(target_avg_bits * sum_l N_l K_l)`` bits (the target is read as a decimal:
``3.3`` means 33/10 exactly, not the nearest binary float).

Exact DP: subtract the all-narrowest cost (the fixed part), so the option costs are
``Delta_l(b) = cost_l(b) - cost_l(b_min) >= 0`` -- only the code bits differ between widths,
``(b - b_min) * K * N_pad`` per linear, which have a large common divisor on real shapes.
The DP runs over units of ``g = gcd(all Delta)``: with integer multiples of ``g``,
``sum Delta <= R  <=>  sum Delta/g <= floor(R/g)``, so the DP optimum is the exact optimum
(``O(L * units * |B|)``). Should that need more than ``max_units`` units, the unit is coarsened to
a multiple ``r`` of ``g`` with option costs rounded *up* (``ceil(Delta/r)``) and the capacity
rounded *down* -- every plan feasible in units is feasible in bits -- and a greedy pass then
spends the leftover exact slack on the single changes with the best error decrease. The result
records ``exact=True`` only when no coarsening happened. The chosen plan's cost is always
re-verified with ``tasa_ext.cost_bits``.

Intra-layer (:func:`allocate_groups`)
-------------------------------------
Within one linear with base width ``b`` (from the inter-layer step) each group of ``G`` input
rows picks a width among ``{lower(b), b, higher(b)}``, where lower/higher are the neighbouring
*supported* widths (``{2, 3, 4, 8}`` restricted to ``allowed``): 2 -> {2, 3}, 3 -> {2, 3, 4},
4 -> {3, 4, 8}, 8 -> {4, 8}. (4 -> 8 is a 4-bit step, paid for by four groups going 4 -> 3.)
Every group of a linear has the same shape, so only code bits vary: one group at width ``b``
costs ``b * G * N_pad`` bits, everything else (scales, zeros, table, permutation) is
independent of the widths. The layer keeps ``cost_bits <= budget`` (default: its uniform cost
at ``b``), solved exactly by the same DP (units of ``G * N_pad``; a few hundred groups at most).
Per-group errors are either given (e.g. :func:`group_rtn_errors`: the RTN error of the group at
each width weighted by ``diag(H)`` -- the GPTQ proxy ``sum_k H_kk ||W[:,k] - Q(W)[:,k]||^2``) or
derived from a scalar salience (e.g. :func:`group_salience`,
``sum_{k in group} H_kk ||W[:, k]||^2``) with the same ``4^-b`` noise model. With the noise
model, an optimal assignment is monotone in salience (exchange argument: swapping widths of two
groups with ``s_i > s_j``, ``b_i < b_j`` lowers the error at the same cost).

Plan (:func:`make_plan`)
------------------------
``{fqn: {"bits": [per logical group], "group_size": G, "mode": "asym"|"sym", "act_order": bool,
"cost_bits": int, "avg_bits": float}}`` -- JSON-ready; :func:`plan_average_bits` recomputes the
exact model-level average from a plan and the shapes, :func:`plan_summary` the statistics.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import reduce
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import tasa_ext
from tasa_ext.format import SUPPORTED_BITS, QuantMode

from . import defaults
from .quant import LayerSpec, rtn_fake_quant

__all__ = [
    "DEFAULT_WIDTHS", "COST_KINDS", "member_cost", "linear_spec", "LayerAllocation", "noise_model_error", "budget_from_avg_bits",
    "allocate_layers", "allocate_layers_bruteforce", "neighbour_widths", "group_salience",
    "group_rtn_errors", "allocate_groups", "make_plan", "plan_average_bits", "plan_summary",
]

DEFAULT_WIDTHS: Tuple[int, ...] = defaults.WIDTHS


# ---------------------------------------------------------------------------------------------
# shapes and costs
# ---------------------------------------------------------------------------------------------
def linear_spec(fqn: str, n_out: int, k_in: int, group_size: int = defaults.GROUP_SIZE,
                mode: str = defaults.MODE, act_order: bool = False) -> LayerSpec:
    """An allocation item's member: the linear ``fqn`` of shape ``[n_out, k_in]`` stored in
    groups of ``group_size`` input rows, widths still to be chosen (a :class:`LayerSpec` with a
    shape and no bits)."""
    return LayerSpec([], group_size, mode, act_order, name=fqn, n_out=n_out, k_in=k_in)


Items = Union[Mapping[str, Sequence[LayerSpec]], Sequence[LayerSpec]]


def _normalise_items(items: Items) -> Dict[str, Tuple[LayerSpec, ...]]:
    if isinstance(items, Mapping):
        out = {str(k): tuple(v) for k, v in items.items()}
    else:
        out = {}
        for s in items:
            if s.fqn in out:
                raise ValueError(f"duplicate linear {s.fqn!r}")
            out[s.fqn] = (s,)
    if not out:
        raise ValueError("no items to allocate")
    seen = set()
    for name, members in out.items():
        if not members:
            raise ValueError(f"item {name!r} has no linears")
        for m in members:
            if not isinstance(m, LayerSpec) or m.n_out is None:
                raise TypeError(f"item {name!r}: members must be LayerSpecs with a shape "
                                f"(linear_spec), got {type(m).__name__}")
            if m.fqn in seen:
                raise ValueError(f"linear {m.fqn!r} appears in two items")
            seen.add(m.fqn)
    return out


def budget_from_avg_bits(target_avg_bits: Union[float, str, Fraction], n_weights: int) -> int:
    """``floor(target * n_weights)`` with the target read as the decimal it prints as."""
    try:
        t = (target_avg_bits if isinstance(target_avg_bits, Fraction)
             else Fraction(str(target_avg_bits)))
    except (ValueError, OverflowError):
        raise ValueError(f"tasa: the bit budget must be a finite number, got "
                         f"{target_avg_bits!r}") from None
    if t <= 0:
        raise ValueError(f"target_avg_bits must be > 0, got {target_avg_bits}")
    return math.floor(t * int(n_weights))


def noise_model_error(sensitivity: float, bits: int, ref_bits: int = 4) -> float:
    """``max(s, 0) * 2^(-2 (bits - ref_bits))`` (module docstring)."""
    if not math.isfinite(sensitivity):
        raise ValueError(f"sensitivity must be finite, got {sensitivity}")
    return max(float(sensitivity), 0.0) * 4.0 ** (-(int(bits) - int(ref_bits)))


# ---------------------------------------------------------------------------------------------
# multiple-choice knapsack
# ---------------------------------------------------------------------------------------------
def _mckp(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], capacity: int) -> List[int]:
    """Exact multiple-choice knapsack over integer unit costs >= 0: minimise the summed error
    with summed cost <= capacity, one option per item. ``dp[u]`` = best error of the items so
    far using at most ``u`` units; on ties the earliest option of an item wins. Returns the
    option index per item (a feasible solution must exist)."""
    cap = int(capacity)
    if cap < 0:
        raise ValueError("negative capacity")
    dp = np.zeros(cap + 1)
    choice = np.zeros((len(costs), cap + 1), dtype=np.int8)
    for l, (c, e) in enumerate(zip(costs, errors)):
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int8)
        for j, (cj, ej) in enumerate(zip(c, e)):
            cj = int(cj)
            if cj > cap:
                continue
            cand = dp[: cap + 1 - cj] + float(ej)
            better = cand < new[cj:]
            new[cj:][better] = cand[better]
            arg[cj:][better] = j
        dp, choice[l] = new, arg
    if not np.isfinite(dp[cap]):
        raise ValueError("knapsack infeasible")  # callers check feasibility first
    picks, u = [], cap
    for l in range(len(costs) - 1, -1, -1):
        j = int(choice[l, u])
        picks.append(j)
        u -= int(costs[l][j])
    return picks[::-1]


@dataclass
class LayerAllocation:
    """Result of the inter-layer allocation."""

    bits: Dict[str, int]            # item name -> width
    linear_bits: Dict[str, int]     # linear fqn -> width
    cost_bits: int                  # exact, sum over linears of tasa_ext.cost_bits
    budget_bits: int
    n_weights: int
    error: float                    # sum of the items' (model) errors
    exact: bool                     # True: the DP optimum is the exact optimum
    resolution: int                 # DP unit in bits
    item_cost_bits: Dict[str, int] = field(default_factory=dict)
    kind: str = "storage"           # what cost_bits / budget_bits count (COST_KINDS)

    @property
    def avg_bits(self) -> float:
        return self.cost_bits / self.n_weights

    def to_dict(self) -> Dict[str, Any]:
        return {"bits": dict(self.bits), "linear_bits": dict(self.linear_bits),
                "cost_bits": self.cost_bits, "budget_bits": self.budget_bits,
                "n_weights": self.n_weights, "avg_bits": self.avg_bits, "error": self.error,
                "exact": self.exact, "resolution": self.resolution,
                "item_cost_bits": dict(self.item_cost_bits), "kind": self.kind}


COST_KINDS = ("storage", "code")


def member_cost(m: LayerSpec, bits, kind: str = "storage") -> int:
    """One linear's cost at ``bits`` under a budget ``kind``: ``"storage"`` = every stored bit
    (``tasa_ext.cost_bits``), ``"code"`` = the code bits alone (the paper's convention)."""
    if kind == "storage":
        return m.cost(bits)
    if kind == "code":
        return m.code_cost(bits)
    raise ValueError(f"tasa: budget kind must be one of {COST_KINDS}, got {kind!r}")


def _prepare(items, target_avg_bits, budget_bits, errors, sensitivities, widths, ref_bits,
             kind="storage"):
    items = _normalise_items(items)
    widths = tuple(sorted(set(int(b) for b in widths)))
    if not widths or any(b not in SUPPORTED_BITS for b in widths):
        raise ValueError(f"widths must be a non-empty subset of {SUPPORTED_BITS}, got {widths}")
    n_weights = sum(m.n_weights for ms in items.values() for m in ms)
    if (target_avg_bits is None) == (budget_bits is None):
        raise ValueError("give exactly one of target_avg_bits and budget_bits")
    budget = (budget_from_avg_bits(target_avg_bits, n_weights) if budget_bits is None
              else int(budget_bits))
    names = list(items)
    costs, errs = [], []
    for name in names:
        costs.append([sum(member_cost(m, b, kind) for m in items[name]) for b in widths])
        measured = None if errors is None else errors.get(name)
        row = []
        for b in widths:
            if measured is not None and b in measured:
                row.append(float(measured[b]))
            elif sensitivities is not None and name in sensitivities:
                row.append(noise_model_error(float(sensitivities[name]), b, ref_bits))
            else:
                raise ValueError(f"item {name!r}: no measured error for {b} bits and no sensitivity")
            if math.isnan(row[-1]):
                raise ValueError(f"item {name!r}: error for {b} bits is NaN")
        errs.append(row)
    min_cost = sum(min(c) for c in costs)
    if min_cost > budget:
        raise ValueError(
            f"budget infeasible: {budget} bits ({budget / n_weights:.6f} average bits) is below the "
            f"minimum achievable {min_cost} bits = {min_cost / n_weights:.6f} average bits "
            f"(every item at its cheapest width of {widths}, "
            + ("exact cost incl. scales/zeros/tables)" if kind == "storage" else "code bits)"))
    return items, widths, names, costs, errs, budget, n_weights


def _result(items, widths, names, costs, errs, picks, budget, n_weights, exact, res,
            kind="storage"):
    bits = {n: widths[j] for n, j in zip(names, picks)}
    linear_bits = {m.fqn: bits[n] for n in names for m in items[n]}
    item_cost = {n: sum(member_cost(m, bits[n], kind) for m in items[n]) for n in names}
    total = sum(item_cost.values())
    if total > budget:  # cannot happen; verified with the exact cost function regardless
        raise RuntimeError(f"internal error: plan costs {total} bits > budget {budget}")
    err = float(sum(errs[i][j] for i, j in enumerate(picks)))
    return LayerAllocation(bits, linear_bits, total, budget, n_weights, err, exact, res, item_cost,
                           kind)


def allocate_layers(items: Items, target_avg_bits: Union[float, str, Fraction, None] = None, *,
                    budget_bits: Optional[int] = None,
                    errors: Optional[Mapping[str, Mapping[int, float]]] = None,
                    sensitivities: Optional[Mapping[str, float]] = None,
                    widths: Sequence[int] = DEFAULT_WIDTHS, ref_bits: int = 4,
                    max_units: int = 200_000, kind: str = "storage") -> LayerAllocation:
    """Inter-layer allocation by exact multiple-choice knapsack DP (module docstring).

    ``items``: a list of :class:`LayerSpec` (each its own item, named by fqn) or
    ``{item name: [LayerSpec, ...]}`` (members share one width). Budget: ``target_avg_bits``
    (average over all weights, exact cost model) or ``budget_bits``. ``errors[item][b]``:
    measured error at width b (used where present); ``sensitivities[item]``: for the noise model
    elsewhere. ``kind``: what the budget counts (:func:`member_cost`: ``"storage"``, every
    stored bit, or ``"code"``, the code bits alone). Raises ``ValueError`` naming the minimum
    achievable average bits when the budget is below the all-narrowest cost.
    """
    items, widths, names, costs, errs, budget, n_weights = _prepare(
        items, target_avg_bits, budget_bits, errors, sensitivities, widths, ref_bits, kind)
    base = [min(c) for c in costs]
    deltas = [[c - b0 for c in cs] for cs, b0 in zip(costs, base)]
    R = budget - sum(base)
    g = reduce(math.gcd, (d for ds in deltas for d in ds if d > 0), 0)
    if g == 0:  # a single width: nothing to choose
        picks = [int(np.argmin(cs)) for cs in costs]
        return _result(items, widths, names, costs, errs, picks, budget, n_weights, True, 1, kind)
    max_total = sum(max(ds) for ds in deltas)
    need = min(R, max_total) // g
    res = g if need <= max_units else g * -(-need // max_units)
    exact = res == g
    unit_costs = [np.array([-(-d // res) for d in ds], dtype=np.int64) for ds in deltas]
    cap = min(R // res, int(sum(int(u.max()) for u in unit_costs)))
    picks = _mckp(unit_costs, [np.asarray(e) for e in errs], cap)
    if not exact:  # spend the leftover exact slack greedily
        used = sum(deltas[i][j] for i, j in enumerate(picks))
        while True:
            best = None
            for i in range(len(names)):
                for j in range(len(widths)):
                    extra = deltas[i][j] - deltas[i][picks[i]]
                    gain = errs[i][picks[i]] - errs[i][j]
                    if gain > 0 and used + extra <= R and (best is None or gain > best[0]):
                        best = (gain, i, j, extra)
            if best is None:
                break
            _, i, j, extra = best
            picks[i], used = j, used + extra
    return _result(items, widths, names, costs, errs, picks, budget, n_weights, exact, res, kind)


def allocate_layers_bruteforce(items: Items, target_avg_bits=None, *, budget_bits=None,
                               errors=None, sensitivities=None,
                               widths: Sequence[int] = DEFAULT_WIDTHS,
                               ref_bits: int = 4, kind: str = "storage") -> LayerAllocation:
    """Reference for tests only: enumerates all ``|B|^L`` combinations with exact costs.
    Ties in error go to the cheaper plan."""
    items, widths, names, costs, errs, budget, n_weights = _prepare(
        items, target_avg_bits, budget_bits, errors, sensitivities, widths, ref_bits, kind)
    if len(widths) ** len(names) > 2_000_000:
        raise ValueError("too many combinations for brute force")
    best = None
    for picks in itertools.product(range(len(widths)), repeat=len(names)):
        c = sum(costs[i][j] for i, j in enumerate(picks))
        if c > budget:
            continue
        e = sum(errs[i][j] for i, j in enumerate(picks))
        if best is None or (e, c) < best[0]:
            best = ((e, c), list(picks))
    return _result(items, widths, names, costs, errs, best[1], budget, n_weights, True, 1, kind)


# ---------------------------------------------------------------------------------------------
# intra-layer
# ---------------------------------------------------------------------------------------------
def neighbour_widths(base_bits: int, allowed: Sequence[int] = SUPPORTED_BITS) -> Tuple[int, ...]:
    """``(lower, base, higher)`` among the supported widths in ``allowed`` (lower/higher
    omitted at the ends): 2 -> (2, 3), 3 -> (2, 3, 4), 4 -> (3, 4, 8), 8 -> (4, 8)."""
    allowed = sorted(set(int(b) for b in allowed) & set(SUPPORTED_BITS))
    if int(base_bits) not in allowed:
        raise ValueError(f"base width {base_bits} not in the allowed supported widths {allowed}")
    i = allowed.index(int(base_bits))
    return tuple(allowed[max(i - 1, 0): i + 2])


def _to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _logical(W, h_diag, group_size, perm) -> Tuple[torch.Tensor, torch.Tensor]:
    """W (float32, or float64 if given so) and diag(H) in logical (act-order) row order, on W's
    device."""
    W = W.detach() if isinstance(W, torch.Tensor) else torch.as_tensor(np.asarray(W))
    if W.dtype != torch.float64:
        W = W.to(torch.float32)
    h = (h_diag.detach() if isinstance(h_diag, torch.Tensor)
         else torch.as_tensor(np.asarray(h_diag))).to(device=W.device, dtype=W.dtype).reshape(-1)
    if W.dim() != 2 or h.shape[0] != W.shape[1]:
        raise ValueError(f"W must be [N, K] and h_diag [K]; got {tuple(W.shape)} and {tuple(h.shape)}")
    K = W.shape[1]
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size {group_size} must divide K={K}")
    if perm is not None:
        p = torch.as_tensor(perm).to(device=W.device, dtype=torch.long).reshape(-1)
        if p.shape[0] != K or not torch.equal(torch.sort(p).values, torch.arange(K, device=W.device)):
            raise ValueError("perm is not a permutation of range(K)")
        W, h = W[:, p], h[p]
    return W, h


def group_salience(W, h_diag, group_size: int, perm=None) -> np.ndarray:
    """``s_g = sum_{k in logical group g} diag(H)_k * ||W[:, k]||^2`` (the expected output
    energy carried by the group's inputs). ``perm``: act-order permutation (logical row r is
    input channel ``perm[r]``), groups are formed over logical rows as in the format.
    Computed in W's precision (at least float32) on W's device; returned as float64 numpy."""
    W, h = _logical(W, h_diag, group_size, perm)
    col = (W * W).sum(dim=0).double() * h.double()
    return col.reshape(-1, group_size).sum(dim=1).cpu().numpy()


def group_rtn_errors(W, h_diag, group_size: int, widths: Sequence[int], mode: str = "asym",
                     perm=None) -> np.ndarray:
    """``E[g, j] = sum_{k in group g} diag(H)_k * sum_n (W - RTN_{widths[j]}(W))[n, k]^2``:
    the diag(H)-weighted round-to-nearest error of each logical group at each width
    (one scale/zero per (group, output column), as in the format), quantized by
    :func:`tasa.quant.rtn_fake_quant` -- the parameters of the quantizer that is applied
    (:func:`tasa.quant.rtn_params`: fp16-exact scales, asym range as min/max). Shape ``[n_groups, |widths|]``,
    float64 numpy; computed in W's precision (at least float32) on W's device.

    ``h_diag`` may also be ``[S, K]`` (several weightings of the same errors, e.g. the mixture's
    ``H_alpha``, ``H_gen`` and ones): the result is then ``[S, n_groups, |widths|]`` and the
    RTN is computed once."""
    h_in = h_diag.detach() if isinstance(h_diag, torch.Tensor) else torch.as_tensor(np.asarray(h_diag))
    stacked = h_in.dim() == 2
    H = h_in if stacked else h_in.reshape(1, -1)
    W0 = W.detach() if isinstance(W, torch.Tensor) else torch.as_tensor(np.asarray(W))
    pairs = [_logical(W0, H[i], group_size, perm) for i in range(H.shape[0])]
    Wl, hs = pairs[0][0], [h for _, h in pairs]
    N, K = Wl.shape
    Wg = Wl.reshape(N, K // group_size, group_size)
    hg = torch.stack(hs).reshape(len(hs), K // group_size, group_size).double()
    out = np.empty((len(hs), K // group_size, len(widths)))
    for j, b in enumerate(widths):
        if int(b) not in SUPPORTED_BITS:
            raise ValueError(f"unsupported width {b}")
        err = (Wg - rtn_fake_quant(Wg, int(b), QuantMode(mode) is QuantMode.SYM)).square_().sum(dim=0).double()   # [ng, G]
        out[:, :, j] = (err[None] * hg).sum(dim=2).cpu().numpy()
    return out if stacked else out[0]


def allocate_groups(spec: LayerSpec, base_bits: int, *, salience=None, errors=None,
                    error_widths: Optional[Sequence[int]] = None, budget_bits: Optional[int] = None,
                    allowed: Sequence[int] = SUPPORTED_BITS, ref_bits: int = 4) -> List[int]:
    """Per-logical-group widths for one linear around ``base_bits`` (module docstring).

    Give either ``salience`` (``[n_groups]``, noise model ``s_g * 4^-(b - ref_bits)``) or
    ``errors`` (``[n_groups, len(error_widths)]``, e.g. :func:`group_rtn_errors`; it must cover
    the candidate widths ``neighbour_widths(base_bits, allowed)``). ``budget_bits`` defaults to
    the uniform cost ``spec.cost(base_bits)``. Returns the widths; their exact cost is
    ``<= budget_bits`` (verified). Ties (e.g. zero salience everywhere) keep the base width.
    """
    cands = neighbour_widths(base_bits, allowed)
    ng = spec.n_groups
    if (salience is None) == (errors is None):
        raise ValueError("give exactly one of salience and errors")
    if salience is not None:
        s = _to_np(salience).ravel()
        if s.shape[0] != ng or not np.all(np.isfinite(s)):
            raise ValueError(f"{spec.fqn}: salience must be {ng} finite values")
        E = np.stack([np.maximum(s, 0.0) * 4.0 ** (-(b - ref_bits)) for b in cands], axis=1)
    else:
        E_all = _to_np(errors)
        ew = list(error_widths) if error_widths is not None else None
        if ew is None or E_all.shape != (ng, len(ew)):
            raise ValueError(f"{spec.fqn}: errors must be [n_groups={ng}, len(error_widths)]")
        missing = [b for b in cands if b not in ew]
        if missing:
            raise ValueError(f"{spec.fqn}: errors lack candidate widths {missing}")
        E = E_all[:, [ew.index(b) for b in cands]]
        if np.isnan(E).any():
            raise ValueError(f"{spec.fqn}: NaN errors")
    budget = spec.cost(base_bits) if budget_bits is None else int(budget_bits)
    lo = cands[0]
    floor_cost = spec.cost(lo)
    if floor_cost > budget:
        raise ValueError(f"{spec.fqn}: budget {budget} bits below the minimum {floor_cost} "
                         f"({floor_cost / spec.n_weights:.6f} average bits) at {lo} bits")
    unit = spec.group_size * spec.n_pad          # code bits of one group per bit of width
    cap = min((budget - floor_cost) // unit, ng * (cands[-1] - lo))
    # option order puts the base width first so that ties keep it
    order = [cands.index(base_bits)] + [j for j in range(len(cands)) if cands[j] != base_bits]
    oc = np.array([cands[j] - lo for j in order], dtype=np.int64)
    picks = _mckp([oc] * ng, [E[g, order] for g in range(ng)], cap)
    bits = [cands[order[j]] for j in picks]
    if spec.cost(bits) > budget:
        raise RuntimeError(f"internal error: {spec.fqn} group plan exceeds its budget")
    return bits


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
def _spec_map(specs) -> Dict[str, LayerSpec]:
    if isinstance(specs, Mapping):
        return dict(specs)
    return {s.fqn: s for s in specs}


def make_plan(specs: Union[Sequence[LayerSpec], Mapping[str, LayerSpec]],
              bits: Mapping[str, Union[int, Sequence[int]]]) -> Dict[str, Dict[str, Any]]:
    """The JSON-ready plan ``{fqn: {"bits", "group_size", "mode", "act_order", "cost_bits",
    "avg_bits"}}`` from per-linear widths (an int = uniform, or a per-logical-group list).
    Every linear of ``specs`` must have an entry in ``bits`` and vice versa."""
    sm = _spec_map(specs)
    if set(sm) != set(bits):
        raise ValueError(f"plan/spec mismatch: missing {sorted(set(sm) - set(bits))}, "
                         f"unknown {sorted(set(bits) - set(sm))}")
    plan = {}
    for fqn, s in sm.items():
        b = bits[fqn]
        gb = [int(b)] * s.n_groups if np.ndim(b) == 0 else [int(x) for x in b]
        c = s.cost(gb)
        plan[fqn] = {"bits": gb, "group_size": s.group_size, "mode": s.mode,
                     "act_order": s.act_order, "cost_bits": c, "avg_bits": c / s.n_weights}
    return plan


def _shape_of(v) -> Tuple[int, int]:
    if isinstance(v, LayerSpec):
        return v.n_out, v.k_in
    n, k = v
    return int(n), int(k)


def _plan_costs(plan, shapes):
    if set(plan) != set(shapes):
        raise ValueError(f"plan/shape mismatch: {sorted(set(plan) ^ set(shapes))}")
    for fqn, e in plan.items():
        n, k = _shape_of(shapes[fqn])
        c = tasa_ext.cost_bits(n, k, int(e["group_size"]), e["bits"], e["mode"],
                               bool(e.get("act_order", False)))
        yield fqn, n, k, c


def plan_average_bits(plan: Mapping[str, Mapping[str, Any]],
                      shapes: Mapping[str, Union[Tuple[int, int], LayerSpec]]) -> float:
    """Exact model-level average bits of ``plan``, recomputed with ``tasa_ext.cost_bits``:
    ``sum cost / sum N*K``. ``shapes``: ``{fqn: (n_out, k_in)}`` (or LayerSpec)."""
    c = w = 0
    for _, n, k, cost in _plan_costs(plan, shapes):
        c, w = c + cost, w + n * k
    return c / w


def plan_summary(plan: Mapping[str, Mapping[str, Any]],
                 shapes: Mapping[str, Union[Tuple[int, int], LayerSpec]]) -> Dict[str, Any]:
    """Totals of a plan: linears, weights, exact cost and average bits, the code-only average
    width (no scales/tables), and the fraction of weights stored at each width."""
    c = w = code = 0
    hist: Dict[int, int] = {}
    for fqn, n, k, cost in _plan_costs(plan, shapes):
        e = plan[fqn]
        c, w = c + cost, w + n * k
        G = int(e["group_size"])
        for b in e["bits"]:
            hist[int(b)] = hist.get(int(b), 0) + G * n
            code += int(b) * G * n
    return {"n_linears": len(plan), "n_weights": w, "cost_bits": c, "avg_bits": c / w,
            "code_avg_bits": code / w,
            "width_fraction": {b: hist[b] / w for b in sorted(hist)}}


def group_error_tables(weights: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec],
                       diags: Mapping[str, tuple], alpha: float, widths: Sequence[int],
                       mode: str) -> tuple:
    """The mixture stage's per-linear error tables from each linear's weight and the diagonals
    ``(diag H_gen, diag H_task)`` of its input Hessians: ``group_err[name][g][i]`` the RTN error
    of group ``g`` at ``widths[i]`` under ``diag(alpha H_gen + (1 - alpha) H_task)`` (the
    intra-layer step's table), and ``lin_err[name] = {"gen": [per width], "rel": [per width]}``:
    the whole linear's error under ``diag H_gen`` and its unweighted error relative to
    ``||W||^2`` (the HAWQ / HIGGS baselines of :mod:`tasa.scoring`)."""
    group_err, lin_err = {}, {}
    for name, spec in specs.items():
        dg, dt = diags[name]
        W = weights[name]
        h = torch.stack([alpha * dg + (1 - alpha) * dt, dg, torch.ones_like(dg)])
        E = group_rtn_errors(W, h, spec.group_size, list(widths), mode)
        group_err[name] = E[0].tolist()
        wn = float(W.detach().double().square().sum())
        lin_err[name] = {"gen": E[1].sum(0).tolist(),
                         "rel": (E[2].sum(0) / max(wn, 1e-30)).tolist()}
    return group_err, lin_err
