"""Perplexity-illusion statistics: correlations vs scipy, top-K overlap, aggregation."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats as sps

from tasa import stats as S


def cases():
    rng = np.random.default_rng(0)
    out = []
    for n in (2, 3, 5, 17, 64, 301):
        out.append((rng.normal(size=n), rng.normal(size=n)))                       # no ties
        out.append((rng.integers(0, 4, n).astype(float), rng.integers(0, 3, n)))    # heavy ties
        x = rng.normal(size=n)
        out.append((x, x + 0.5 * rng.normal(size=n)))                               # correlated
        out.append((x, -np.round(x, 1)))                                           # ties in y only
    return out


@pytest.mark.parametrize("i", range(24))
def test_kendall_spearman_vs_scipy(i):
    x, y = cases()[i]
    tau = S.kendall_tau_b(x, y)
    rho = S.spearman_rho(x, y)
    ref_tau = sps.kendalltau(x, y, variant="b").statistic
    ref_rho = sps.spearmanr(x, y).statistic
    if np.isnan(ref_tau):
        assert np.isnan(tau)
    else:
        assert tau == pytest.approx(ref_tau, abs=1e-12)
    if np.isnan(ref_rho):
        assert np.isnan(rho)
    else:
        assert rho == pytest.approx(ref_rho, abs=1e-12)
    np.testing.assert_allclose(S.rankdata(x), sps.rankdata(x))


def test_correlation_edge_cases():
    x = np.arange(10.0)
    assert S.kendall_tau_b(x, x) == 1.0 and S.kendall_tau_b(x, -x) == -1.0
    assert S.spearman_rho(x, x ** 3) == pytest.approx(1.0)
    with warnings.catch_warnings():  # some scipy versions warn on constant input
        warnings.simplefilter("ignore")
        ref = sps.kendalltau(x, np.ones(10)).statistic
    assert np.isnan(ref) and np.isnan(S.kendall_tau_b(x, np.ones(10)))
    assert np.isnan(S.spearman_rho(np.ones(10), x))
    assert S.kendall_tau_b(torch.arange(5.0), [0, 1, 2, 4, 3]) == pytest.approx(0.8)
    for bad in ((x, x[:5]), ([1.0], [2.0]), (x, np.where(x > 3, np.nan, x))):
        with pytest.raises(ValueError):
            S.kendall_tau_b(*bad)
        with pytest.raises(ValueError):
            S.spearman_rho(*bad)


def test_top_k_overlap():
    rng = np.random.default_rng(1)
    x = rng.permutation(20).astype(float)
    assert S.top_k_overlap(x, x, 5) == 1.0
    assert S.top_k_overlap(x, -x, 5) == 0.0
    assert S.top_k_overlap(x, 2 * x + 7, 20) == 1.0
    assert list(S.top_k([1, 5, 5, 2], 2)) == [1, 2]
    assert list(S.top_k([3, 3, 3], 2)) == [0, 1]                # ties: lower index first
    y = x.copy()
    y[np.argmax(x)] = -1.0                                   # demote the single most sensitive
    assert S.top_k_overlap(x, y, 4) == 0.75
    with pytest.raises(ValueError):
        S.top_k(x, 0)
    with pytest.raises(ValueError):
        S.top_k(x, 21)


def test_normalize():
    s = np.array([1.0, 3.0, -0.5, 4.0])
    np.testing.assert_allclose(S.normalize(s, "sum"), [0.125, 0.375, 0.0, 0.5])
    np.testing.assert_allclose(S.normalize(s, "minmax"), [1.5 / 4.5, 3.5 / 4.5, 0.0, 1.0])
    np.testing.assert_allclose(S.normalize(s, "rank"), [1 / 3, 2 / 3, 0.0, 1.0])
    np.testing.assert_allclose(S.normalize([2.0, 2.0, 1.0], "rank"), [0.75, 0.75, 0.0])
    np.testing.assert_allclose(S.normalize([7.0, 7.0], "rank"), [0.5, 0.5])
    with pytest.raises(ValueError):
        S.normalize([0.0, -1.0], "sum")
    with pytest.raises(ValueError):
        S.normalize([2.0, 2.0], "minmax")
    with pytest.raises(ValueError):
        S.normalize(s, "zscore")


@pytest.mark.parametrize("norm", S.NORMS)
def test_aggregate_properties(norm):
    rng = np.random.default_rng(2)
    L = 12
    ppl = rng.lognormal(size=L)
    tasks = {"math": rng.lognormal(size=L), "arc": rng.lognormal(size=L)}
    np.testing.assert_allclose(S.aggregate(ppl, tasks, 1.0, norm), S.normalize(ppl, norm))
    np.testing.assert_allclose(S.aggregate(ppl, tasks, 0.0, norm),
                               (S.normalize(tasks["math"], norm) + S.normalize(tasks["arc"], norm)) / 2)
    # linear in beta
    a0, a1 = S.aggregate(ppl, tasks, 0.0, norm), S.aggregate(ppl, tasks, 1.0, norm)
    np.testing.assert_allclose(S.aggregate(ppl, tasks, 0.3, norm), 0.3 * a1 + 0.7 * a0)
    # each objective's scale (units) does not matter
    scaled = {"math": 1e4 * tasks["math"], "arc": 1e-3 * tasks["arc"]}
    np.testing.assert_allclose(S.aggregate(7 * ppl, scaled, 0.4, norm),
                               S.aggregate(ppl, tasks, 0.4, norm), rtol=1e-12)
    # permutation equivariant, task order irrelevant
    p = rng.permutation(L)
    np.testing.assert_allclose(S.aggregate(ppl[p], {k: v[p] for k, v in tasks.items()}, 0.4, norm),
                               S.aggregate(ppl, tasks, 0.4, norm)[p])
    np.testing.assert_allclose(S.aggregate(ppl, dict(reversed(list(tasks.items()))), 0.4, norm),
                               S.aggregate(ppl, tasks, 0.4, norm))
    agg = S.aggregate(ppl, tasks, 0.5, norm)
    if norm == "sum":
        assert agg.sum() == pytest.approx(1.0) and np.all(agg >= 0)
    else:
        assert agg.min() >= 0 and agg.max() <= 1
    # a layer that is the most sensitive for every objective stays the most sensitive
    ppl2, tasks2 = ppl.copy(), {k: v.copy() for k, v in tasks.items()}
    for v in (ppl2, *tasks2.values()):
        v[5] = 100.0
    assert int(np.argmax(S.aggregate(ppl2, tasks2, 0.5, norm))) == 5


def test_aggregate_validation():
    ppl = np.array([1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        S.aggregate(ppl, {"a": ppl}, 1.5)
    with pytest.raises(ValueError):
        S.aggregate(ppl, {}, 0.5)
    np.testing.assert_allclose(S.aggregate(ppl, {}, 1.0), ppl / 6)
    with pytest.raises(ValueError, match="layers"):
        S.aggregate(ppl, {"a": [1.0, 2.0]}, 0.5)
    out = S.aggregate(torch.tensor(ppl), {"a": torch.tensor([3.0, 2.0, 1.0])}, 0.5)
    np.testing.assert_allclose(out, [(1 / 6 + 3 / 6) / 2, 2 / 6, (3 / 6 + 1 / 6) / 2])


def test_illusion_report():
    rng = np.random.default_rng(3)
    ppl = rng.lognormal(size=10)
    tasks = {"math": ppl[::-1].copy(), "arc": 2 * ppl}
    rows = S.illusion_report(ppl, tasks, k=3)
    by = {r["b"]: r for r in rows}
    assert set(by) == {"math", "arc"} and all(r["a"] == "ppl" for r in rows)
    assert by["arc"]["kendall_tau"] == 1.0 and by["arc"]["top_k_overlap"] == 1.0
    assert by["math"]["kendall_tau"] == pytest.approx(sps.kendalltau(ppl, ppl[::-1]).statistic)
    assert by["math"]["spearman_rho"] == pytest.approx(sps.spearmanr(ppl, ppl[::-1]).statistic)
    assert len(S.illusion_report(ppl, tasks, k=3, pairs="all")) == 3
    with pytest.raises(ValueError):
        S.illusion_report(ppl, {"ppl": ppl})
    assert not math.isnan(by["math"]["kendall_tau"])


# ---- noise bounds -----------------------------------------------------------------------------

def _items(rng, true, n_items, noise):
    """Per-item summed NLL increases: each unit's true per-token increase x tokens + noise."""
    tokens = rng.integers(5, 40, n_items).astype(float)
    X = true[:, None] * tokens[None, :] + noise * rng.standard_normal((true.shape[0], n_items)) * np.sqrt(tokens)
    return X, tokens


def test_profile_from_items_is_the_ratio_of_sums():
    rng = np.random.default_rng(0)
    X, t = _items(rng, np.linspace(0, 1, 7), 9, 0.1)
    assert np.allclose(S.profile_from_items(X, t), X.sum(1) / t.sum())
    idx = [0, 0, 3, 8]
    assert np.allclose(S.profile_from_items(X, t, idx), X[:, idx].sum(1) / t[idx].sum())
    with pytest.raises(ValueError, match="items"):
        S.profile_from_items(X[:, :1], t[:1])


def test_split_half_separates_signal_from_noise():
    rng = np.random.default_rng(1)
    true = np.linspace(0.0, 1.0, 20)
    clean = S.split_half_tau(*_items(rng, true, 60, 0.05), n_splits=50)
    noisy = S.split_half_tau(*_items(rng, np.zeros(20), 60, 1.0), n_splits=50)
    assert clean["mean"] > 0.8 and clean["lo"] <= clean["mean"] <= clean["hi"]
    assert abs(noisy["mean"]) < 0.4 and noisy["lo"] < 0 < noisy["hi"]   # sd ~0.16 at 20 units


def test_bootstrap_tau_interval_covers_the_truth_and_flags_noise():
    rng = np.random.default_rng(2)
    true = rng.random(15)
    a = _items(rng, true, 80, 0.05)
    b = _items(rng, true, 50, 0.05)          # the same ranking measured on other items
    r = S.bootstrap_tau(*a, *b, n_boot=300)
    assert r["lo"] > 0.5 and r["lo"] <= r["tau"] <= r["hi"] and r["p_le_0"] == 0
    c = _items(rng, rng.random(15), 50, 0.05)   # an unrelated ranking
    r0 = S.bootstrap_tau(*a, *c, n_boot=300)
    assert r0["lo"] < r0["tau"] < r0["hi"]
    rep = S.noise_report({"x": a, "y": b, "z": _items(rng, np.zeros(15), 50, 1.0)}, n_boot=200,
                         n_splits=50)
    rows = {(r["a"], r["b"]): r for r in rep["tau"]}
    assert rows[("x", "y")]["distinct_from_0"] and rows[("x", "y")]["vs_reliability"] == "reaches"
    assert not rows[("x", "z")]["distinct_from_0"]
    assert rep["reliability"]["x"]["mean"] > rep["reliability"]["z"]["mean"]
    with pytest.raises(ValueError, match="unit count"):
        S.bootstrap_tau(*a, X := np.zeros((3, 5)), np.ones(5))


def test_mean_ci95_matches_scipy_t_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    from tasa.stats import mean_ci95, t975
    rng = np.random.default_rng(3)
    for n in (2, 3, 7, 29, 30, 31, 200):
        x = rng.normal(0.3, 2.0, n)
        m, h = mean_ci95(x)
        lo, hi = scipy_stats.t.interval(0.95, n - 1, loc=x.mean(), scale=scipy_stats.sem(x))
        assert m == pytest.approx(x.mean())
        assert h == pytest.approx((hi - lo) / 2, rel=2e-3), n      # the table is 3 decimals
    assert math.isnan(mean_ci95([1.0])[1])
    with pytest.raises(ValueError):
        mean_ci95([])
    with pytest.raises(ValueError):
        t975(0)
