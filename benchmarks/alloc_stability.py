"""Does the knapsack lower a unit's width when the budget grows, and would either fix help?

Reads the measurements of the paper suite (no model, no evaluation: seconds) and writes
``results/alloc_stability.md``:

1. the noise of every probe: the per-unit loss increase ``d = sum_i x_i / sum_i t_i`` over an
   objective's items and its standard error (ratio estimator over the items), and how many
   units' probes lie within 2 standard errors of zero;
2. the budget sweep's plans (storage bits, widths {3, 4, 8}, the default beta) from the exact
   DP as tasa allocates, counting units whose width goes *down* between neighbouring budgets,
   against the same DP on probes shrunk toward zero by z standard errors (soft threshold,
   ``sign(d) max(|d| - z se, 0)``) -- the fix the Gemma notes proposed;
3. a nested allocation: greedy upgrades along each unit's lower convex hull of (cost, error),
   in order of error saved per bit, stopping at the first that does not fit -- its plans can
   only grow with the budget (no unit ever goes down) -- and what it costs in modelled error
   against the DP optimum.

    python benchmarks/alloc_stability.py [--models gemma3-270m,qwen2.5-coder-0.5b]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import numpy as np

from common import RESULTS, git_commit
from tasa import alloc
from tasa.measurement import Measurement
from tasa.pipeline import stages

WIDTHS = (3, 4, 8)
BUDGETS = (3.375, 3.5, 3.625, 3.75, 3.875, 4.0, 4.125, 4.25)


def probe_se(X: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Standard error of each row's ratio ``sum(X) / sum(t)`` over the items (columns)."""
    n, T = X.shape[1], t.sum()
    d = X.sum(1) / T
    r = X - d[:, None] * t[None, :]
    return np.sqrt(n / (n - 1) * (r ** 2).sum(1)) / T


def shrunk(m: Measurement, z: float) -> Measurement:
    m2 = copy.deepcopy(m)
    s, units = m2.sensitivity, list(m2.units)
    for b in s.widths:
        ip, D = s.item_profile(units, b), s.deltas(b)
        for k in s.objectives:
            X, t = np.asarray(ip[k], float), np.asarray(s.item_tokens[k], float)
            d = X.sum(1) / t.sum()
            v = np.sign(d) * np.maximum(np.abs(d) - z * probe_se(X, t), 0.0)
            for i, u in enumerate(units):
                D[u][k] = float(v[i])
    return m2


def hull_steps(c, e) -> list:
    """The upgrades along one unit's lower convex hull: ``[(error saved per bit, from, to)]``."""
    cur = min(range(len(c)), key=lambda j: (c[j], e[j]))
    steps = []
    while True:
        best = None
        for j in range(len(c)):
            if c[j] > c[cur] and e[j] < e[cur]:
                s = (e[cur] - e[j]) / (c[j] - c[cur])
                if best is None or s > best[0]:
                    best = (s, j)
        if best is None:
            return steps
        steps.append((best[0], cur, best[1]))
        cur = best[1]


def nested_greedy(costs, errs, budget: int) -> list:
    picks = [min(range(len(c)), key=lambda j: (c[j], errs[i][j])) for i, c in enumerate(costs)]
    used = sum(c[j] for c, j in zip(costs, picks))
    steps = sorted(((-s, i, a, b) for i, (c, e) in enumerate(zip(costs, errs))
                    for s, a, b in hull_steps(c, e)))
    for _, i, a, b in steps:
        if picks[i] != a:
            continue
        extra = costs[i][b] - costs[i][a]
        if used + extra > budget:
            break        # stop, do not skip: a later, smaller step would break nesting
        picks[i], used = b, used + extra
    return picks


def model_report(name: str, path: Path) -> list:
    m = Measurement.load(path)
    s, units = m.sensitivity, list(m.units)
    L = [f"## {name}", "", f"measurement: `{path.relative_to(RESULTS.parent.parent)}` "
         f"({len(units)} units)", "",
         "| width | objective | items | mean probe (nats/token) | units within 2 se of 0 |",
         "|---|---|---|---|---|"]
    for b in s.widths:
        ip = s.item_profile(units, b)
        for k in s.objectives:
            X, t = np.asarray(ip[k], float), np.asarray(s.item_tokens[k], float)
            d, se = X.sum(1) / t.sum(), probe_se(X, t)
            L.append(f"| {b} | {k} | {X.shape[1]} | {d.mean():+.4f} | "
                     f"{int((np.abs(d) < 2 * se).sum())}/{len(units)} |")
    L += ["", "Units whose width goes down from the previous budget (DP plans), and modelled "
          "error (sum over units of the aggregated errors the knapsack minimises, unshrunk):", "",
          "| budget | DP | DP, probes shrunk 1 se | DP, shrunk 2 se | nested greedy | "
          "nested greedy modelled error vs DP |", "|---|---|---|---|---|---|"]
    lin = m.linears
    specs = {f: alloc.linear_spec(f, v["n_out"], v["k_in"], v["group_size"], v["mode"])
             for f, v in lin.items()}
    items = {u: [specs[f] for f in m.units[u]["linears"]] for u in units}
    nw = sum(sp.n_weights for sp in specs.values())
    errors, _, _ = stages.unit_errors(m, widths=WIDTHS)
    costs = [[sum(sp.cost(b) for sp in items[u]) for b in WIDTHS] for u in units]
    errs = [[errors[u][b] for b in WIDTHS] for u in units]
    variants = {"dp": m, "z1": shrunk(m, 1.0), "z2": shrunk(m, 2.0)}
    prev: dict = {}
    for B in BUDGETS:
        try:
            plans = {k: [WIDTHS.index(stages.allocate(mv, B, widths=WIDTHS, intra=False)
                                      ["item_bits"][u]) for u in units]
                     for k, mv in variants.items()}
        except ValueError:       # below the all-3-bit minimum
            continue
        plans["greedy"] = nested_greedy(costs, errs, alloc.budget_from_avg_bits(B, nw))
        e_dp = sum(errs[i][j] for i, j in enumerate(plans["dp"]))
        e_g = sum(errs[i][j] for i, j in enumerate(plans["greedy"]))
        g_bits = sum(costs[i][j] for i, j in enumerate(plans["greedy"])) / nw

        def down(k):
            if k not in prev:
                return "-"
            return str(sum(WIDTHS[a] < WIDTHS[b] for a, b in zip(plans[k], prev[k])))
        L.append(f"| {B:.3f} | {down('dp')} | {down('z1')} | {down('z2')} | {down('greedy')} "
                 f"({g_bits:.4f} bits) | {100 * (e_g / e_dp - 1):+.1f}% |")
        prev = plans
    return L + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gemma3-270m,qwen2.5-coder-0.5b")
    ap.add_argument("--dir", default=str(RESULTS / "reproduction_paper"))
    ap.add_argument("--out", default=str(RESULTS / "alloc_stability.md"))
    args = ap.parse_args()
    L = ["# Allocation stability across budgets (benchmarks/alloc_stability.py)", "",
         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}; widths {WIDTHS}, storage budgets "
         f"{', '.join(f'{b:g}' for b in BUDGETS)}, beta default, no group step.", ""]
    for name in [x for x in args.models.split(",") if x]:
        p = Path(args.dir) / name / "measurement.json"
        if not p.is_file():
            print(f"error: {p} does not exist", file=sys.stderr)
            return 2
        L += model_report(name, p)
    Path(args.out).write_text("\n".join(L))
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
