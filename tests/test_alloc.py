"""Bit allocation: knapsack DP vs brute force under the exact cost model, intra-layer groups."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

import tasa_ext
from tasa import alloc as A
from tasa.alloc import linear_spec
from tasa.quant import LayerSpec, quantize_rtn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: OpenMP threads only add synchronisation. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_specs(rng, L, prefix="m"):
    specs = []
    for i in range(L):
        G = int(rng.choice([32, 64]))
        specs.append(linear_spec(f"{prefix}.{i}", n_out=int(rng.choice([16, 40, 64, 100])),
                                k_in=G * int(rng.integers(1, 5)), group_size=G,
                                mode=str(rng.choice(["asym", "sym"])),
                                act_order=bool(rng.integers(0, 2))))
    return specs


def random_errors(rng, names, widths):
    """Measured-looking errors: decreasing in bits, with noise, sometimes not monotone."""
    out = {}
    for n in names:
        s = rng.lognormal(0, 1.5)
        out[n] = {b: float(s * 4.0 ** -b * rng.uniform(0.5, 2.0)) for b in widths}
    return out


def exact_cost(specs, linear_bits):
    return sum(tasa_ext.cost_bits(s.n_out, s.k_in, s.group_size, [linear_bits[s.fqn]] * s.n_groups,
                                  s.mode, s.act_order) for s in specs)


def test_linear_spec_cost_is_tasa_ext():
    s = linear_spec("x", 100, 256, 64, "asym", True)
    assert s.cost(4) == tasa_ext.cost_bits(100, 256, 64, [4] * 4, "asym", True)
    assert s.cost([2, 3, 4, 8]) == tasa_ext.cost_bits(100, 256, 64, [2, 3, 4, 8], "asym", True)
    with pytest.raises(ValueError):
        s.cost(5)
    with pytest.raises(ValueError):
        s.cost([4, 4])
    with pytest.raises(ValueError):
        linear_spec("bad", 16, 100, 32)


@pytest.mark.parametrize("seed", range(8))
def test_dp_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 7))
    widths = (3, 4, 8) if seed % 2 == 0 else tuple(sorted(rng.choice([2, 3, 4, 8], 3, replace=False)))
    specs = random_specs(rng, L)
    errors = random_errors(rng, [s.fqn for s in specs], widths)
    n_w = sum(s.n_weights for s in specs)
    lo = sum(s.cost(min(widths)) for s in specs) / n_w
    hi = sum(s.cost(max(widths)) for s in specs) / n_w
    for target in np.linspace(lo, hi + 0.5, 9):
        target = round(float(target), 4)
        if target * n_w < lo * n_w:
            continue
        if A.budget_from_avg_bits(target, n_w) < lo * n_w:
            continue
        dp = A.allocate_layers(specs, target, errors=errors, widths=widths)
        bf = A.allocate_layers_bruteforce(specs, target, errors=errors, widths=widths)
        budget = math.floor(round(target * 10 ** 4) * n_w / 10 ** 4)
        assert dp.budget_bits == bf.budget_bits == budget
        assert dp.exact
        # never exceeds the budget under the exact cost function, recomputed independently
        assert exact_cost(specs, dp.linear_bits) == dp.cost_bits <= budget
        # as good as brute force (the exact optimum)
        assert dp.error == pytest.approx(bf.error, rel=1e-12, abs=0)
        assert dp.avg_bits == pytest.approx(dp.cost_bits / n_w)


@pytest.mark.parametrize("seed", range(4))
def test_dp_matches_bruteforce_on_code_bits(seed):
    """The code-bit budget (the paper's count): the same exact optimum as brute force, and the
    code bits, recomputed by hand, within the budget."""
    rng = np.random.default_rng(100 + seed)
    specs = random_specs(rng, int(rng.integers(2, 6)))
    errors = random_errors(rng, [s.fqn for s in specs], (3, 4, 8))
    n_w = sum(s.n_weights for s in specs)
    for target in (3.0, 3.3, 3.5, 3.9, 4.6, 8.0):
        dp = A.allocate_layers(specs, target, errors=errors, kind="code")
        bf = A.allocate_layers_bruteforce(specs, target, errors=errors, kind="code")
        code = sum(dp.linear_bits[s.fqn] * s.n_out * s.k_in for s in specs)
        assert code == dp.cost_bits <= dp.budget_bits == math.floor(round(target * 10) * n_w / 10)
        assert dp.error == pytest.approx(bf.error, rel=1e-12, abs=0) and dp.kind == "code"
    with pytest.raises(ValueError, match="below the minimum"):
        A.allocate_layers(specs, 2.9, errors=errors, kind="code")


@pytest.mark.parametrize("seed", range(4))
def test_blocks_and_noise_model(seed):
    rng = np.random.default_rng(100 + seed)
    specs = random_specs(rng, 6)
    items = {f"block{i}": specs[2 * i: 2 * i + 2] for i in range(3)}
    sens = {k: float(rng.lognormal(0, 2)) for k in items}
    sens["block1"] = -0.1  # clipped to 0 by the noise model
    n_w = sum(s.n_weights for s in specs)
    for target in (3.4, 4.2, 5.0, 7.0):
        if A.budget_from_avg_bits(target, n_w) < sum(s.cost(3) for s in specs):
            continue
        dp = A.allocate_layers(items, target, sensitivities=sens)
        bf = A.allocate_layers_bruteforce(items, target, sensitivities=sens)
        assert dp.error == pytest.approx(bf.error, rel=1e-12)
        assert exact_cost(specs, dp.linear_bits) == dp.cost_bits <= dp.budget_bits
        for name, ms in items.items():  # members share the width of their item
            assert {dp.linear_bits[m.fqn] for m in ms} == {dp.bits[name]}
        assert dp.bits["block1"] == 3  # zero error at every width: the cheapest is kept
    assert A.noise_model_error(2.0, 3, ref_bits=4) == 8.0
    assert A.noise_model_error(2.0, 8, ref_bits=4) == 2.0 / 256
    assert A.noise_model_error(-1.0, 3) == 0.0


def test_budget_exactly_reachable_is_used():
    rng = np.random.default_rng(7)
    specs = random_specs(rng, 5)
    errors = random_errors(rng, [s.fqn for s in specs], (3, 4, 8))
    # every combination's exact cost as the budget: the DP must find a plan at least as good
    for picks in list(itertools.product((3, 4, 8), repeat=5))[::17]:
        budget = sum(s.cost(b) for s, b in zip(specs, picks))
        dp = A.allocate_layers(specs, budget_bits=budget, errors=errors)
        assert dp.cost_bits <= budget
        assert dp.error <= sum(errors[s.fqn][b] for s, b in zip(specs, picks)) * (1 + 1e-12)
        # one bit less and that exact combination is no longer allowed
        if budget - 1 >= sum(s.cost(3) for s in specs):
            dp2 = A.allocate_layers(specs, budget_bits=budget - 1, errors=errors)
            assert dp2.cost_bits <= budget - 1
        else:
            with pytest.raises(ValueError, match="minimum achievable"):
                A.allocate_layers(specs, budget_bits=budget - 1, errors=errors)


def test_coarse_resolution_still_feasible():
    rng = np.random.default_rng(3)
    specs = random_specs(rng, 6)
    errors = random_errors(rng, [s.fqn for s in specs], (3, 4, 8))
    n_w = sum(s.n_weights for s in specs)
    lo = sum(s.cost(3) for s in specs) / n_w
    for target in (lo + 0.3, lo + 0.9, lo + 1.7, lo + 3.1):
        bf = A.allocate_layers_bruteforce(specs, target, errors=errors)
        co = A.allocate_layers(specs, target, errors=errors, max_units=3)
        assert not co.exact and co.resolution > 1
        assert exact_cost(specs, co.linear_bits) == co.cost_bits <= co.budget_bits
        assert co.error >= bf.error * (1 - 1e-12)
        # greedy post-pass: no single upgrade that fits the exact slack improves the plan
        for s in specs:
            for b in (3, 4, 8):
                new = dict(co.linear_bits, **{s.fqn: b})
                if exact_cost(specs, new) <= co.budget_bits:
                    assert errors[s.fqn][b] >= errors[s.fqn][co.linear_bits[s.fqn]] - 1e-15


def test_infeasible_budget_names_minimum():
    specs = [linear_spec("a", 64, 128, 32), linear_spec("b", 40, 64, 32, "sym")]
    n_w = sum(s.n_weights for s in specs)
    min_avg = sum(s.cost(3) for s in specs) / n_w
    with pytest.raises(ValueError, match="minimum achievable") as ei:
        A.allocate_layers(specs, 3.0, sensitivities={"a": 1.0, "b": 1.0})
    assert f"{min_avg:.6f}" in str(ei.value)
    # right at the minimum it is feasible and everything is at 3 bits
    r = A.allocate_layers(specs, budget_bits=sum(s.cost(3) for s in specs),
                          sensitivities={"a": 1.0, "b": 1.0})
    assert set(r.bits.values()) == {3}


def test_input_validation():
    specs = [linear_spec("a", 64, 128, 32)]
    with pytest.raises(ValueError, match="subset"):
        A.allocate_layers(specs, 4.0, sensitivities={"a": 1.0}, widths=(3, 5))
    with pytest.raises(ValueError, match="no measured error"):
        A.allocate_layers(specs, 4.0, errors={"a": {3: 1.0}})
    with pytest.raises(ValueError, match="exactly one"):
        A.allocate_layers(specs, 4.0, budget_bits=100, sensitivities={"a": 1.0})
    with pytest.raises(ValueError, match="two items"):
        A.allocate_layers({"x": specs, "y": specs}, 4.0, sensitivities={"x": 1, "y": 1})
    # decimal reading of the target: 3.3 * 1000 = 3300 exactly, not 3299
    assert A.budget_from_avg_bits(3.3, 1000) == 3300
    assert A.budget_from_avg_bits("4.25", 8) == 34


def test_neighbour_widths():
    assert A.neighbour_widths(2) == (2, 3)
    assert A.neighbour_widths(3) == (2, 3, 4)
    assert A.neighbour_widths(4) == (3, 4, 8)
    assert A.neighbour_widths(8) == (4, 8)
    assert A.neighbour_widths(4, allowed=(3, 4)) == (3, 4)
    with pytest.raises(ValueError):
        A.neighbour_widths(5)


@pytest.mark.parametrize("base", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(3))
def test_intra_layer_salience(base, seed):
    rng = np.random.default_rng(seed)
    spec = linear_spec("w", int(rng.choice([24, 64])), 32 * 12, 32, str(rng.choice(["asym", "sym"])))
    sal = rng.lognormal(0, 2, spec.n_groups)
    bits = A.allocate_groups(spec, base, salience=sal)
    assert set(bits) <= set(A.neighbour_widths(base))
    assert spec.cost(bits) <= spec.cost(base)
    # optimal with the noise model => monotone in salience (distinct saliences)
    order = np.argsort(sal)
    assert all(np.diff(np.asarray(bits)[order]) >= 0)
    # a dominant group gets more bits than the base, paid for by the least salient ones
    top = int(rng.integers(spec.n_groups))
    sal2 = sal.copy()
    sal2[top] = 1e6 * sal.max()
    bits2 = A.allocate_groups(spec, base, salience=sal2)
    if base in (3, 4):
        assert bits2[top] > base and bits2[int(np.argmin(sal2))] < base
    else:  # 2 cannot go lower and 8 higher: with the uniform budget nothing can be traded
        assert bits2 == [base] * spec.n_groups
    assert spec.cost(bits2) <= spec.cost(base)
    if base != 8:  # with slack for exactly one step up, the dominant group gets it
        extra = (A.neighbour_widths(base)[-1] - base) * spec.group_size * spec.n_pad
        bits3 = A.allocate_groups(spec, base, salience=sal2, budget_bits=spec.cost(base) + extra)
        assert bits3[top] > base
    # a larger budget never lowers a group's width... and a tighter one is respected
    tight = spec.cost(A.neighbour_widths(base)[0])
    b2 = A.allocate_groups(spec, base, salience=sal, budget_bits=tight)
    assert spec.cost(b2) <= tight


@pytest.mark.parametrize("seed", range(4))
def test_intra_layer_optimal_vs_bruteforce(seed):
    rng = np.random.default_rng(50 + seed)
    spec = linear_spec("w", 40, 32 * 6, 32, "asym", bool(seed % 2))
    widths = [2, 3, 4, 8]
    E = rng.lognormal(0, 1, (6, 4)) * 4.0 ** -np.array(widths)
    base = int(rng.choice([3, 4]))
    cands = A.neighbour_widths(base)
    for budget in (spec.cost(base), spec.cost(base) + 3 * 32 * spec.n_pad + 17, spec.cost(cands[0])):
        bits = A.allocate_groups(spec, base, errors=E, error_widths=widths, budget_bits=budget)
        assert spec.cost(bits) <= budget
        err = sum(E[g, widths.index(b)] for g, b in enumerate(bits))
        best = min(sum(E[g, widths.index(b)] for g, b in enumerate(p))
                   for p in itertools.product(cands, repeat=6) if spec.cost(list(p)) <= budget)
        assert err == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError, match="below the minimum"):
        A.allocate_groups(spec, base, errors=E, error_widths=widths,
                          budget_bits=spec.cost(cands[0]) - 1)
    with pytest.raises(ValueError, match="lack"):
        A.allocate_groups(spec, 4, errors=E[:, :2], error_widths=[2, 3])


def test_group_salience_and_rtn_errors():
    g = torch.Generator().manual_seed(0)
    N, K, G = 32, 256, 32
    W = torch.randn(N, K, generator=g)
    h = torch.rand(K, generator=g) + 0.1
    W[:, 64:96] *= 8.0          # one group with large weights ...
    h[64:96] *= 4.0             # ... and large activations
    sal = A.group_salience(W, h, G)
    ref = [(h[i * G:(i + 1) * G].double() * (W[:, i * G:(i + 1) * G].double() ** 2).sum(0)).sum()
           for i in range(K // G)]
    np.testing.assert_allclose(sal, np.array(ref), rtol=1e-5)  # float32 products
    assert int(np.argmax(sal)) == 2
    for mode in ("asym", "sym"):
        E = A.group_rtn_errors(W, h, G, [2, 3, 4, 8], mode)
        assert E.shape == (K // G, 4)
        assert np.all(np.diff(E, axis=1) < 0)   # more bits, less error (per group)
        assert int(np.argmax(E[:, 1])) == 2
        spec = linear_spec("w", N, K, G, mode)
        bits = A.allocate_groups(spec, 3, errors=E, error_widths=[2, 3, 4, 8])
        assert bits[2] == 4 and spec.cost(bits) <= spec.cost(3)
    # act-order: groups over logical rows = permuted channels
    perm = torch.randperm(K, generator=g)
    np.testing.assert_allclose(A.group_salience(W, h, G, perm=perm),
                               A.group_salience(W[:, perm], h[perm], G), rtol=1e-6)
    with pytest.raises(ValueError):
        A.group_salience(W, h, G, perm=torch.zeros(K, dtype=torch.long))


@pytest.mark.parametrize("mode", ["sym", "asym"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_group_rtn_errors_are_those_of_the_applied_quantizer(mode, act_order, seed):
    """One RTN routine: the allocator's per-group error table is exactly the diag(H)-weighted
    squared error of the quantizer that is applied (tasa.quant.quantize_rtn, fp16 scales and
    zeros included), at every width, on odd sizes, with act-order groups over permuted
    channels, and with degenerate groups (constant, all zero, one sign only)."""
    g = torch.Generator().manual_seed(seed)
    G = (32, 64, 96)[seed]
    N, ng = (37, 21, 7)[seed], (5, 3, 7)[seed]
    K = G * ng
    W = torch.randn(N, K, generator=g) * torch.logspace(-2, 1, K)[torch.randperm(K, generator=g)]
    W[3, :G] = 0.7                      # a constant group of one output column
    W[4, G:2 * G] = 0.0                 # an all-zero group
    W[5, :] = W[5, :].abs() + 0.25      # a row whose groups are all positive
    h = torch.rand(K, generator=g) * 3 + 0.05
    perm = torch.randperm(K, generator=g) if act_order else None
    widths = [2, 3, 4, 8]
    E = A.group_rtn_errors(W, h, G, widths, mode, perm=perm)
    assert E.shape == (ng, len(widths)) and E.dtype == np.float64
    cols = (perm if perm is not None else torch.arange(K)).reshape(ng, G)   # logical groups
    for j, b in enumerate(widths):
        q = quantize_rtn(W, LayerSpec([b] * ng, G, mode, act_order), perm=perm)
        err = ((W - q.dequantize()).double() ** 2).sum(0) * h.double()      # per input channel
        ref = np.array([float(err[cols[i]].sum()) for i in range(ng)])
        np.testing.assert_allclose(E[:, j], ref, rtol=1e-6, atol=0)   # fp32 sums


def test_plan_roundtrip_and_average():
    rng = np.random.default_rng(9)
    specs = random_specs(rng, 5)
    sens = {s.fqn: float(rng.lognormal()) for s in specs}
    res = A.allocate_layers(specs, 4.5, sensitivities=sens)
    bits = dict(res.linear_bits)
    s0 = specs[0]
    bits[s0.fqn] = A.allocate_groups(s0, res.linear_bits[s0.fqn],
                                     salience=rng.lognormal(0, 1, s0.n_groups))
    plan = json.loads(json.dumps(A.make_plan(specs, bits)))
    shapes = {s.fqn: (s.n_out, s.k_in) for s in specs}
    avg = A.plan_average_bits(plan, shapes)
    total = sum(tasa_ext.cost_bits(s.n_out, s.k_in, s.group_size, plan[s.fqn]["bits"], s.mode,
                                   s.act_order) for s in specs)
    n_w = sum(s.n_weights for s in specs)
    assert avg == total / n_w
    assert total <= res.budget_bits   # intra-layer stays within the layer's share
    for s in specs:
        e = plan[s.fqn]
        assert len(e["bits"]) == s.n_groups and e["group_size"] == s.group_size
        assert e["mode"] == s.mode and e["avg_bits"] == s.cost(e["bits"]) / s.n_weights
    summ = A.plan_summary(plan, shapes)
    assert summ["cost_bits"] == total and summ["avg_bits"] == avg
    assert sum(summ["width_fraction"].values()) == pytest.approx(1.0)
    assert summ["code_avg_bits"] < avg
    with pytest.raises(ValueError, match="mismatch"):
        A.make_plan(specs, {s0.fqn: 4})
    with pytest.raises(ValueError, match="mismatch"):
        A.plan_average_bits(plan, {s0.fqn: (s0.n_out, s0.k_in)})
