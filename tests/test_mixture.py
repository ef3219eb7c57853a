"""Calibration-mixture search: closed form vs direct inversion, convexity, argmin, storage."""
import json

import numpy as np
import pytest
import torch

from tasa import mixture as M
from tasa.pipeline import mixture_calibration

from helpers import ByteTok


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The matrices here are tiny: OpenMP threads only add synchronisation (and stall badly on
    a busy 2-core machine). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def psd(g, K, rank, scale=1.0, dtype=torch.float64):
    X = torch.randn(K, rank, generator=g, dtype=torch.float64) * scale
    return (X @ X.T / rank).to(dtype)


def layers(seed=0, K=24, n=4):
    """Random layers with very different scales, some rank-deficient, one with dead inputs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        s = 10.0 ** (i - 1)
        Hg, Ht, Hs = psd(g, K, 3 * K, s), psd(g, K, K // 3, s), psd(g, K, K // 2, 2 * s)
        if i == 2:  # dead input channels in every Hessian
            for H in (Hg, Ht, Hs):
                H[:3, :] = 0
                H[:, :3] = 0
        out[f"layer{i}"] = (Hg, Ht, Hs)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_matches_direct(seed):
    H = layers(seed)
    alphas = np.concatenate([M.DEFAULT_GRID, np.random.default_rng(seed).uniform(0, 1, 8)])
    for normalize in M.NORMALIZATIONS:
        curve = M.build_curve(H, normalize=normalize)
        direct = M.trace_curve_direct(H, alphas, normalize=normalize)
        np.testing.assert_allclose(curve(alphas), direct, rtol=1e-6, atol=0)
    # per layer, without any weighting
    for name, (Hg, Ht, Hs) in H.items():
        d, mu, lam = M.layer_terms(Hg, Ht, Hs)
        closed = (d[None] / (1 + alphas[:, None] * mu[None])).sum(1)
        np.testing.assert_allclose(closed, M.layer_curve_direct(Hg, Ht, Hs, alphas), rtol=1e-6)


def test_rank_deficient_and_degenerate_layers():
    g = torch.Generator().manual_seed(5)
    K = 16
    # all three rank 2, and H_gen == H_task (curve must be flat)
    Hg, Hs = psd(g, K, 2), psd(g, K, 2)
    a = np.linspace(0, 1, 9)
    np.testing.assert_allclose(M.layer_curve_direct(Hg, Hg, Hs, a),
                               M.layer_curve_direct(Hg, Hg, Hs, [0.3])[0], rtol=1e-9)
    d, mu, _ = M.layer_terms(Hg, Hg, Hs)
    assert np.abs(mu).max() < 1e-8
    # dead layer: H_gen = H_task = 0 -> absolute damping percdamp, f = tr(H_test)/lam
    Z = torch.zeros(K, K, dtype=torch.float64)
    assert M.damping(Z, Z, 0.01) == 0.01
    c = M.build_curve({"dead": (Z, Z, Hs)}, normalize="none")
    np.testing.assert_allclose(c(a), float(torch.trace(Hs)) / 0.01, rtol=1e-9)


def test_damping_is_fixed_and_explicit():
    H = layers(3)
    Hg, Ht, Hs = H["layer1"]
    lam = M.damping(Hg, Ht, 0.05)
    expected = 0.05 * float(torch.diagonal((Hg + Ht) / 2).mean())
    assert lam == pytest.approx(expected, rel=1e-12)
    # the damped mixture is the convex combination of the damped endpoints
    for a in (0.0, 0.37, 1.0):
        lhs = M.mixture_hessian(Hg, Ht, a, lam)
        rhs = a * M.mixture_hessian(Hg, Hg, 0, lam) + (1 - a) * M.mixture_hessian(Ht, Ht, 0, lam)
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    # curves built with a different percdamp differ (the damping is really used)
    c1 = M.build_curve(H, percdamp=0.01, normalize="none")
    c2 = M.build_curve(H, percdamp=0.1, normalize="none")
    assert abs(c1(0.5) - c2(0.5)) > 1e-3 * c1(0.5)


def test_fp32_inputs_accepted():
    H = {k: tuple(h.float() for h in v) for k, v in layers(4).items()}
    a = np.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(M.build_curve(H)(a), M.trace_curve_direct(H, a), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 7])
def test_convexity_and_derivative(seed):
    c = M.build_curve(layers(seed))
    a = np.linspace(0, 1, 2001)
    f = c(a)
    second = f[2:] - 2 * f[1:-1] + f[:-2]
    assert second.min() >= -1e-9 * np.abs(f).max()
    h = 1e-6
    for x in (0.1, 0.5, 0.9):
        fd = (c(x + h) - c(x - h)) / (2 * h)
        assert c.derivative(x) == pytest.approx(fd, rel=1e-5, abs=1e-8 * abs(c(x)))
    assert np.all(np.diff(c.derivative(a)) >= -1e-9 * np.abs(c.derivative(a)).max())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_argmin_vs_dense_grid(seed):
    c = M.build_curve(layers(seed))
    a_star, f_star = c.argmin()
    grid = np.linspace(0, 1, 20001)
    f = c(grid)
    assert f_star <= f.min() + 1e-12 * abs(f.min())
    assert abs(a_star - grid[np.argmin(f)]) <= 2e-4
    assert f_star == pytest.approx(c(a_star))


def test_argmin_at_the_ends():
    g = torch.Generator().manual_seed(11)
    K = 12
    Ht, Hs = psd(g, K, 30), psd(g, K, 30)
    # more general signal in every direction: f decreases in alpha -> alpha* = 1
    assert M.build_curve({"l": (4 * Ht, Ht, Hs)}).argmin()[0] == 1.0
    # less: alpha* = 0
    assert M.build_curve({"l": (Ht / 4, Ht, Hs)}).argmin()[0] == 0.0


def random_spd_layers(seed, K=20, n=3):
    """Full-rank SPD Hessians whose test distribution lies between the general and the task
    one (so the minimum is inside (0, 1)): sample second moments of three Gaussians."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        Cg = rng.standard_normal((K, K)) / np.sqrt(K)
        Ct = rng.standard_normal((K, K)) / np.sqrt(K) + 0.3 * np.eye(K)
        Xg = rng.standard_normal((4 * K, K)) @ Cg * 10.0 ** (i - 1)
        Xt = rng.standard_normal((4 * K, K)) @ Ct * 10.0 ** (i - 1)
        Xs = np.concatenate([Xg[:2 * K] * 0.9, Xt[:2 * K] * 1.1]) + 0.05 * rng.standard_normal((4 * K, K))
        out[f"layer{i}"] = tuple(torch.from_numpy(X.T @ X / X.shape[0]) for X in (Xg, Xt, Xs))
    return out


def brute_force(hessians, alphas, normalize="none", percdamp=0.01):
    """f(alpha) = sum_l w_l tr(H_test (alpha H_gen + (1-alpha) H_task + lam_l I)^-1) by direct
    numpy solves, written from the module docstring (lam_l = percdamp * mean diag of the
    average of H_gen and H_task; oracle weight 1 / tr(H_test (H_test + lam_l I)^-1))."""
    out = np.zeros(len(alphas))
    for Hg, Ht, Hs in hessians.values():
        Hg, Ht, Hs = (h.double().numpy() for h in (Hg, Ht, Hs))
        K = Hg.shape[0]
        lam = percdamp * np.mean(np.diag((Hg + Ht) / 2))
        w = 1.0 if normalize == "none" else 1.0 / np.trace(np.linalg.solve(Hs + lam * np.eye(K), Hs))
        for i, a in enumerate(alphas):
            out[i] += w * np.trace(np.linalg.solve(a * Hg + (1 - a) * Ht + lam * np.eye(K), Hs))
    return out


def golden_section(f, lo=0.0, hi=1.0, tol=1e-7):
    r = (5 ** 0.5 - 1) / 2
    while hi - lo > tol:
        a, b = hi - r * (hi - lo), lo + r * (hi - lo)
        if f(a) <= f(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


@pytest.mark.parametrize("normalize", ["none", "oracle"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_argmin_vs_brute_force_on_random_spd(seed, normalize):
    """The continuous argmin is the minimiser of the criterion itself: a dense grid of the
    closed-form curve and an independent search on direct evaluations of
    tr(H_test (a H_gen + (1-a) H_task + lam I)^-1) both land on it."""
    H = random_spd_layers(seed)
    c = M.build_curve(H, normalize=normalize)
    a_star, f_star = c.argmin()
    assert 0.02 < a_star < 0.98          # an interior minimum (by construction of H_test)
    grid = np.linspace(0, 1, 20001)
    fg = c(grid)
    assert abs(a_star - grid[np.argmin(fg)]) <= 1e-4
    assert f_star <= fg.min() * (1 + 1e-12)
    bf = lambda a: float(brute_force(H, [a], normalize)[0])
    assert f_star == pytest.approx(bf(a_star), rel=1e-9)
    assert abs(golden_section(bf) - a_star) <= 1e-4
    coarse = np.linspace(0, 1, 41)
    assert (brute_force(H, coarse, normalize) >= f_star * (1 - 1e-9)).all()
    for da in (-1e-3, 1e-3):
        assert bf(a_star + da) > f_star


def test_table_and_best_on_grid():
    H = layers(1)
    c = M.build_curve(H, normalize="none")
    rows = c.table()
    star = [r for r in rows if r.get("argmin")]
    grid_rows = [r for r in rows if not r.get("argmin")]
    assert len(star) == 1 and rows[-1] is star[0]
    assert [r["alpha"] for r in grid_rows] == list(M.DEFAULT_GRID)
    # the argmin row is the continuous minimiser: below every grid row and every point of a
    # dense grid of direct evaluations, and its f is the criterion's value there
    star = star[0]
    dense = np.linspace(0, 1, 401)
    assert star["f"] == pytest.approx(brute_force(H, [star["alpha"]])[0], rel=1e-9)
    assert (brute_force(H, dense) >= star["f"] * (1 - 1e-9)).all()
    assert all(r["f_rel"] >= 1.0 for r in grid_rows)
    fs = [r["f"] for r in grid_rows]
    assert c.best_on_grid() == M.DEFAULT_GRID[int(np.argmin(fs))]
    np.testing.assert_allclose(fs, brute_force(H, M.DEFAULT_GRID), rtol=1e-9)
    for r in grid_rows:
        assert r["f"] == pytest.approx(c(r["alpha"]), rel=1e-12)
        assert r["f_rel"] == pytest.approx(r["f"] / star["f"], rel=1e-12)


def test_normalization_and_weights():
    H = layers(2)
    a = np.linspace(0, 1, 7)
    scaled = dict(H)
    scaled["layer0"] = tuple(1e3 * h for h in H["layer0"])
    # relative damping: raw and oracle-normalised terms do not depend on activation scale ...
    for norm in ("none", "oracle", "dim"):
        np.testing.assert_allclose(M.build_curve(scaled, normalize=norm)(a),
                                   M.build_curve(H, normalize=norm)(a), rtol=1e-8)
    # ... while 1/tr(H_test) re-introduces it (documented reason it is not the default)
    t1, t2 = M.build_curve(scaled, normalize="trace")(a), M.build_curve(H, normalize="trace")(a)
    assert np.abs(t1 / t2 - 1).max() > 1e-2
    K = H["layer0"][0].shape[0]
    np.testing.assert_allclose(M.build_curve(H, normalize="dim")(a),
                               M.build_curve(H, normalize="none")(a) / K, rtol=1e-12)
    # oracle: each layer equals 1 when calibrating on the test Hessian itself
    Hs = H["layer1"][2]
    c = M.build_curve({"self": (Hs, Hs, Hs)})
    assert c(0.4) == pytest.approx(1.0, rel=1e-8)
    # user weights multiply
    w = {"layer0": 2.0, "layer3": 0.0}
    cw, c0 = M.build_curve(H, weights=w), M.build_curve(H)
    lv = c0.layer_values(0.3)
    expect = sum(lv[n] * w.get(n, 1.0) for n in lv)
    assert cw(0.3) == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError):
        M.build_curve(H, normalize="bogus")


def test_streaming_equals_mapping():
    H = layers(6)
    gen = ((n, *v) for n, v in H.items())
    a = np.linspace(0, 1, 5)
    np.testing.assert_array_equal(M.build_curve(gen)(a), M.build_curve(H)(a))
    c = M.MixtureCurve()
    c.add_layer("x", *H["layer0"])
    with pytest.raises(ValueError, match="twice"):
        c.add_layer("x", *H["layer0"])


def test_json_roundtrip_and_compress():
    c = M.build_curve(layers(8, K=32, n=5))
    c2 = M.MixtureCurve.from_dict(json.loads(json.dumps(c.to_dict())))
    a = np.linspace(0, 1, 501)
    np.testing.assert_array_equal(c2(a), c(a))
    assert c2.argmin() == c.argmin()
    for tol in (1e-3, 1e-6):
        for merge in (False, True):
            cc = c.compress(tol, merge=merge)
            assert cc.n_terms <= c.n_terms
            assert np.abs(cc(a) / c(a) - 1).max() <= tol
    merged = c.compress(1e-2, merge=True)
    assert list(merged.layers) == ["__all__"] and merged.n_terms < c.n_terms
    with pytest.raises(ValueError):
        M.MixtureCurve.from_dict({"kind": "other"})


def test_alpha_domain_and_bad_inputs():
    c = M.build_curve(layers(0))
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError):
            c(bad)
    assert isinstance(c(0.5), float) and c(np.array([0.5])).shape == (1,)
    g = torch.Generator().manual_seed(0)
    P = psd(g, 8, 20)
    with pytest.raises(ValueError, match="positive definite"):
        M.layer_terms(P, -5 * P, P)
    with pytest.raises(ValueError, match="positive definite"):
        M.layer_terms(-5 * P, P, P)
    with pytest.raises(ValueError, match="shape"):
        M.layer_terms(P, P, psd(g, 9, 20))
    with pytest.raises(ValueError):
        M.damping(P, P, 0.0)


def test_mixture_counts():
    assert M.mixture_counts(0.0, 128) == (0, 128)
    assert M.mixture_counts(1.0, 128) == (128, 0)
    assert M.mixture_counts(0.25, 128) == (32, 96)
    assert M.mixture_counts(0.5, 3) == (2, 1)      # half up
    assert M.mixture_counts(0.5, 0) == (0, 0)
    for n in (1, 2, 7, 100):
        prev = 0
        for a in np.linspace(0, 1, 37):
            ng, nt = M.mixture_counts(a, n)
            # definition: n_general is the count in 0..n nearest to alpha n (ties: the larger),
            # n_task the rest of the n sequences
            nearest = min(range(n + 1), key=lambda k: (abs(k - a * n), -k))
            assert (ng, nt) == (nearest, n - nearest), (a, n)
            assert abs(ng / n - a) <= 0.5 / n + 1e-12
            assert ng >= prev                      # more general text as alpha grows
            prev = ng
    for bad in ((0.5, -1), (0.5, 2.5), (1.5, 10)):
        with pytest.raises(ValueError):
            M.mixture_counts(*bad)


def test_mixture_calibration_draws_the_counts():
    """The pipeline's calibration set for alpha has mixture_counts(alpha, n) general sequences
    (first), then task sequences: checked on the tokens, with general text of one letter."""
    split = {"gen_calib": ["g" * 1200],
             "gsm8k_calib": [{"question": "q" * 50, "answer": "#### 1"}] * 4,
             "arc_calib": [{"question": "r" * 50, "choices": ["a", "b"], "gold": 1}] * 4}
    for alpha, n in ((0.0, 5), (0.3, 5), (0.5, 3), (0.75, 8), (1.0, 4)):
        ids, counts = mixture_calibration(ByteTok(), split, alpha, n, 16, seed=0)
        assert counts == M.mixture_counts(alpha, n) and ids.shape == (n, 16)
        general = (ids == ord("g")).all(dim=1).tolist()
        assert general == [True] * counts[0] + [False] * counts[1], (alpha, n)
