"""Statistics for the "perplexity illusion" report: do the layers that matter for perplexity
matter for the tasks?

Inputs are per-layer sensitivity vectors ``s in R^L`` (loss increase when layer l alone is
quantized), given as numpy arrays, lists or torch tensors; everything is computed in float64
numpy. Non-finite entries are rejected (a NaN sensitivity is a failed measurement, not a tie).

* :func:`kendall_tau_b` -- Kendall's tau-b (ties in either vector handled), exact integer
  concordance counts, ``O(L^2)`` (L is a few hundred at most).
* :func:`spearman_rho` -- Pearson correlation of average ranks (ties get the mean rank).
* :func:`top_k` / :func:`top_k_overlap` -- the k most sensitive layers and the overlap fraction
  ``|top_k(a) & top_k(b)| / k``; ties at the boundary go to the lower layer index (a stable,
  documented rule so reports are reproducible).
* :func:`aggregate` -- ``beta * norm(s_ppl) + (1 - beta) * mean_k norm(s_k)``.
* :func:`illusion_report` -- all of the above between perplexity and each task.
* :func:`split_half_tau`, :func:`bootstrap_tau`, :func:`noise_report` -- the noise bounds of
  those rankings, from per-item measurements (each objective's loss is a ratio of sums over its
  items, so resampling items resamples the measurement): how well two disjoint halves of one
  objective's items agree on the ranking (its reliability), and a percentile bootstrap
  confidence interval for every tau between objectives.

Both correlation functions return ``nan`` when a vector is constant (undefined), as scipy does.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Mapping

import numpy as np
import torch

__all__ = ["NORMS", "rankdata", "kendall_tau_b", "spearman_rho", "top_k", "top_k_overlap",
           "normalize", "aggregate", "illusion_report", "profile_from_items", "split_half_tau",
           "bootstrap_tau", "noise_report", "t975", "mean_ci95"]

NORMS = ("sum", "minmax", "rank")


def _vec(x, name: str = "x") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite entries")
    return a


def _pair(x, y):
    a, b = _vec(x, "x"), _vec(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"length mismatch: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError("need at least 2 layers")
    return a, b


def rankdata(x) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span (scipy's "average")."""
    a = _vec(x)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg = (ends - counts + 1 + ends) / 2.0
    return avg[inv.ravel()]


def _tie_pairs(a: np.ndarray) -> int:
    _, c = np.unique(a, return_counts=True)
    c = c.astype(np.int64)
    return int((c * (c - 1) // 2).sum())


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b: ``(C - D) / sqrt((n0 - n1)(n0 - n2))`` with ``n0 = n(n-1)/2`` and
    ``n1``, ``n2`` the tied pairs in x and y. ``C - D = sum_{i<j} sign(dx) sign(dy)`` is summed
    exactly in integers, in row blocks to bound memory."""
    a, b = _pair(x, y)
    n = a.shape[0]
    s = 0
    step = max(1, (1 << 22) // n)
    for i in range(0, n, step):
        sx = np.sign(a[i:i + step, None] - a[None, :]).astype(np.int8)
        sy = np.sign(b[i:i + step, None] - b[None, :]).astype(np.int8)
        s += int((sx.astype(np.int64) * sy).sum())
    s //= 2  # every unordered pair counted twice (diagonal terms are 0)
    n0 = n * (n - 1) // 2
    den = float(n0 - _tie_pairs(a)) * float(n0 - _tie_pairs(b))
    return float(s / np.sqrt(den)) if den > 0 else float("nan")


def spearman_rho(x, y) -> float:
    """Spearman's rho: Pearson correlation of the average ranks."""
    a, b = _pair(x, y)
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def top_k(s, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries (most sensitive first; ties: lower index first)."""
    a = _vec(s, "s")
    if not 1 <= k <= a.shape[0]:
        raise ValueError(f"k must be in [1, {a.shape[0]}], got {k}")
    return np.argsort(-a, kind="stable")[:k]


def top_k_overlap(x, y, k: int) -> float:
    """``|top_k(x) & top_k(y)| / k`` in [0, 1]."""
    a, b = _pair(x, y)
    return len(set(top_k(a, k).tolist()) & set(top_k(b, k).tolist())) / k


def normalize(s, norm: str = "sum") -> np.ndarray:
    """One objective's sensitivity profile on a common, unit-free scale.

    * ``"sum"`` (default): ``max(s, 0) / sum(max(s, 0))`` -- a distribution over layers
      (negative measured loss changes are noise and clip to 0). It keeps *ratios*: a layer 10x
      as sensitive as another stays 10x, which is what the allocator's noise model
      (``e = s * 4^-b``) consumes multiplicatively, and it removes each objective's units and
      scale (nats of perplexity loss vs accuracy points) so no objective dominates the mean.
      ``ValueError`` if no entry is positive (no information).
    * ``"minmax"``: ``(s - min) / (max - min)`` in [0, 1]. Driven by the two extremes (one
      outlier layer squashes all others towards 0) and maps the least sensitive layer to exactly
      0, i.e. "free to quantize" -- offered for comparison. ``ValueError`` if s is constant.
    * ``"rank"``: ``(average rank - 1) / (L - 1)`` in [0, 1] -- only the order counts (robust to
      outliers, discards magnitudes); constant s gives 0.5 everywhere.
    """
    a = _vec(s, "s")
    if norm == "sum":
        p = np.maximum(a, 0.0)
        t = p.sum()
        if not t > 0:
            raise ValueError("norm='sum' needs at least one positive sensitivity")
        return p / t
    if norm == "minmax":
        lo, hi = a.min(), a.max()
        if not hi > lo:
            raise ValueError("norm='minmax' is undefined for a constant profile")
        return (a - lo) / (hi - lo)
    if norm == "rank":
        if a.shape[0] == 1:
            return np.full(1, 0.5)
        return (rankdata(a) - 1.0) / (a.shape[0] - 1)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def aggregate(s_ppl, s_tasks: Mapping[str, Any], beta: float, norm: str = "sum") -> np.ndarray:
    """``beta * norm(s_ppl) + (1 - beta) * mean_k norm(s_tasks[k])`` (see :func:`normalize`).

    ``beta`` in [0, 1]: 1 = perplexity only, 0 = tasks only (each task weighs the same). With
    ``norm="sum"`` the result is again a distribution over layers (sums to 1). ``s_tasks`` may be
    empty only when ``beta == 1``."""
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    p = normalize(s_ppl, norm)
    tasks = {k: _vec(v, f"s_tasks[{k!r}]") for k, v in s_tasks.items()}
    for k, v in tasks.items():
        if v.shape != p.shape:
            raise ValueError(f"s_tasks[{k!r}] has {v.shape[0]} layers, s_ppl has {p.shape[0]}")
    if not tasks:
        if float(beta) != 1.0:
            raise ValueError("no task sensitivities given but beta < 1")
        return p
    t = np.mean([normalize(v, norm) for v in tasks.values()], axis=0)
    return float(beta) * p + (1.0 - float(beta)) * t


def illusion_report(s_ppl, s_tasks: Mapping[str, Any], k: int = 5,
                    pairs: str = "ppl") -> List[Dict[str, Any]]:
    """Rows ``{"a", "b", "kendall_tau", "spearman_rho", "top_k_overlap", "k"}`` comparing the
    perplexity profile with each task (``pairs="ppl"``) or every pair of objectives
    (``pairs="all"``)."""
    objs: Dict[str, np.ndarray] = {"ppl": _vec(s_ppl, "s_ppl")}
    for name, v in s_tasks.items():
        if name == "ppl":
            raise ValueError("'ppl' is reserved for the perplexity profile")
        objs[name] = _vec(v, f"s_tasks[{name!r}]")
    if pairs == "ppl":
        combos = [("ppl", n) for n in objs if n != "ppl"]
    elif pairs == "all":
        combos = list(itertools.combinations(objs, 2))
    else:
        raise ValueError("pairs must be 'ppl' or 'all'")
    return [{"a": a, "b": b, "kendall_tau": kendall_tau_b(objs[a], objs[b]),
             "spearman_rho": spearman_rho(objs[a], objs[b]),
             "top_k_overlap": top_k_overlap(objs[a], objs[b], k), "k": k} for a, b in combos]


# ---- noise bounds ----------------------------------------------------------------------------

def _items(items, tokens, name: str):
    X = np.asarray(items, dtype=np.float64)
    t = np.asarray(tokens, dtype=np.float64).reshape(-1)
    if X.ndim != 2 or X.shape[1] != t.shape[0]:
        raise ValueError(f"{name}: items must be [units, n_items] and tokens [n_items], got "
                         f"{X.shape} and {t.shape}")
    if X.shape[1] < 2:
        raise ValueError(f"{name}: need at least 2 items, got {X.shape[1]}")
    if not (np.all(np.isfinite(X)) and np.all(t >= 0) and t.sum() > 0):
        raise ValueError(f"{name}: non-finite items or no scored tokens")
    return X, t


def _profile(X: np.ndarray, t: np.ndarray, idx=None) -> np.ndarray:
    if idx is None:
        return X.sum(1) / t.sum()
    idx = np.asarray(idx)
    return X[:, idx].sum(1) / t[idx].sum()


def profile_from_items(items, tokens, idx=None) -> np.ndarray:
    """Per-unit loss increase ``sum_i items[u, i] / sum_i tokens[i]`` over the items ``idx``
    (default all; repeats allowed, as a bootstrap sample has)."""
    return _profile(*_items(items, tokens, "items"), idx)


def split_half_tau(items, tokens, n_splits: int = 200, seed: int = 0) -> Dict[str, float]:
    """Reliability of one objective's unit ranking: Kendall tau between the profiles of two
    random disjoint halves of its items, over ``n_splits`` splits. Returns ``{"mean", "lo",
    "hi"}`` (2.5 / 97.5 percentiles over splits). Each half has half the items, so this bounds
    the full set's reliability from below; an agreement *between* objectives near this value
    is all the noise allows."""
    X, t = _items(items, tokens, "items")
    rng = np.random.default_rng(seed)
    n = X.shape[1]
    taus = []
    for _ in range(n_splits):
        p = rng.permutation(n)
        a, b = p[: n // 2], p[n // 2:]
        if t[a].sum() == 0 or t[b].sum() == 0:
            continue
        tau = kendall_tau_b(_profile(X, t, a), _profile(X, t, b))
        if np.isfinite(tau):
            taus.append(tau)
    if not taus:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    return {"mean": float(np.mean(taus)), "lo": float(np.percentile(taus, 2.5)),
            "hi": float(np.percentile(taus, 97.5))}


def bootstrap_tau(items_a, tokens_a, items_b, tokens_b, n_boot: int = 1000,
                  seed: int = 0, level: float = 0.95) -> Dict[str, float]:
    """Kendall tau between two objectives' unit profiles with a percentile bootstrap interval:
    each objective's items are resampled with replacement (independently: different data),
    ``n_boot`` times. Returns ``{"tau", "lo", "hi", "p_le_0", "p_ge_0"}`` (the point estimate
    on all items, the interval and the bootstrap shares at or below / above 0)."""
    A, ta = _items(items_a, tokens_a, "items_a")
    B, tb = _items(items_b, tokens_b, "items_b")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"unit count mismatch: {A.shape[0]} vs {B.shape[0]}")
    rng = np.random.default_rng(seed)
    point = kendall_tau_b(_profile(A, ta), _profile(B, tb))
    taus = []
    for _ in range(n_boot):
        ia = rng.integers(0, A.shape[1], A.shape[1])
        ib = rng.integers(0, B.shape[1], B.shape[1])
        if ta[ia].sum() == 0 or tb[ib].sum() == 0:
            continue
        tau = kendall_tau_b(_profile(A, ta, ia), _profile(B, tb, ib))
        if np.isfinite(tau):
            taus.append(tau)
    taus = np.asarray(taus)
    q = (1.0 - level) / 2 * 100
    return {"tau": point, "lo": float(np.percentile(taus, q)), "hi": float(np.percentile(taus, 100 - q)),
            "p_le_0": float((taus <= 0).mean()), "p_ge_0": float((taus >= 0).mean())}


def noise_report(profiles: Mapping[str, tuple], n_boot: int = 1000, n_splits: int = 200,
                 seed: int = 0) -> Dict[str, Any]:
    """``profiles[obj] = (items [units, n_items], tokens [n_items])``. Returns
    ``{"reliability": {obj: split_half_tau}, "tau": [{"a", "b", "tau", "lo", "hi",
    "distinct_from_0", "p_le_0", "p_ge_0", "vs_reliability"}]}`` for every pair of objectives;
    ``distinct_from_0`` when the interval excludes 0; ``vs_reliability`` says whether the pair's
    tau reaches the lower of the two split-half reliabilities (then the two rankings agree as
    well as the noise of the objectives lets any two rankings agree)."""
    rel = {k: split_half_tau(X, t, n_splits, seed) for k, (X, t) in profiles.items()}
    rows = []
    for a, b in itertools.combinations(profiles, 2):
        r = bootstrap_tau(*profiles[a], *profiles[b], n_boot=n_boot, seed=seed)
        floor = min(rel[a]["mean"], rel[b]["mean"])
        r.update({"a": a, "b": b, "distinct_from_0": bool(r["lo"] > 0 or r["hi"] < 0),
                  "vs_reliability": ("reaches" if r["tau"] >= floor else "below")})
        rows.append(r)
    return {"reliability": rel, "tau": rows, "n_boot": n_boot, "n_splits": n_splits}


# Two-sided 95% Student t quantiles by degrees of freedom; beyond the table 1.96 + 2.4/df
# (within 0.002 of the exact value from df = 30 on).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The two-sided 95% Student t quantile with ``df`` degrees of freedom (``df >= 1``)."""
    if df < 1:
        raise ValueError(f"tasa: t975 needs df >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def mean_ci95(d) -> tuple:
    """Mean and 95% t-interval half-width of ``d`` (paired differences, or per-sequence values);
    the half-width is nan below 2 values."""
    x = _vec(d, "d")
    if x.size == 0:
        raise ValueError("tasa: mean_ci95 of no values")
    if x.size < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), t975(x.size - 1) * float(x.std(ddof=1)) / float(np.sqrt(x.size))
