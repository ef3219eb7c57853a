"""The clipping search (tasa.quant.mse, issue 27 item 3): rtn-mse and gptq-mse, registered
methods whose group parameters minimise the (diag(H)-weighted) rounding error over shrunken
ranges. Odd sizes, seeded heavy-tailed weights (where min/max wastes the range)."""
import pytest
import torch
from torch import nn

from tasa.layers import TasaLinear
from tasa.quant import (METHODS, LayerSpec, get_method, mse_params, output_error,
                        quantize_codes, rtn_params)
from tasa.quant.mse import SHRINK


def heavy(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.exp(0.7 * torch.randn(n, k, generator=g))


def werr(W, s, z, bits, weight):
    _, wq = quantize_codes(W, s[:, None], z[:, None], 2 ** bits - 1)
    return ((W - wq) ** 2 * weight).sum(-1)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_params_never_worse_than_minmax_and_format_exact(sym, bits):
    W = heavy(37, 96, bits + 10 * sym)
    weight = torch.rand(96, generator=torch.Generator().manual_seed(1)) * 3
    s, z = mse_params(W, bits, sym, weight)
    s0, z0 = rtn_params(W, bits, sym)
    e, e0 = werr(W, s, z, bits, weight), werr(W, s0, z0, bits, weight)
    assert (e <= e0 + 1e-6 * e0.abs().max()).all()            # 1.0 is a candidate
    if bits <= 4:
        assert e.sum() < 0.97 * e0.sum()                     # clipping pays on heavy tails
    assert torch.equal(s, s.half().float())                  # scales exact in fp16
    assert torch.equal(z, z.round()) and (z >= 0).all() and (z <= 2 ** bits - 1).all()
    # the search picks, per row, the best of the candidates it lists
    best = torch.stack([werr(W, *mse_params(W, bits, sym, weight, shrink=(1.0, p)), bits, weight)
                        for p in SHRINK]).amin(0)
    torch.testing.assert_close(e, best)


def test_mse_params_weights_matter_and_bad_input():
    W = heavy(16, 64, 5)
    lo = torch.ones(64)
    hi = torch.ones(64)
    hi[:8] = 1000.0                      # the first 8 columns dominate the weighted error
    s1, z1 = mse_params(W, 3, False, lo)
    s2, z2 = mse_params(W, 3, False, hi)
    assert not torch.equal(s1, s2)
    assert werr(W, s2, z2, 3, hi).sum() <= werr(W, s1, z1, 3, hi).sum()
    with pytest.raises(ValueError, match="groups are 64 wide"):
        mse_params(W, 3, True, torch.ones(63))
    s3, z3 = mse_params(W, 3, False, torch.ones_like(W))      # per-weight weights: the same
    assert torch.equal(s3, s1) and torch.equal(z3, z1)
    with pytest.raises(ValueError, match=">= 0"):
        mse_params(W, 3, True, -lo)
    with pytest.raises(ValueError, match="include 1.0"):
        mse_params(W, 3, True, shrink=(0.9, 0.8))


def _hessian(k, seed, n=600):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g) * torch.linspace(0.1, 3.0, k)
    X = X + 0.5 * X[:, torch.randperm(k, generator=g)]           # correlated inputs
    return 2 * X.T @ X / n


@pytest.mark.parametrize("mode", ["sym", "asym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_mse_beats_gptq_at_3_bits_and_packs(mode, act_order):
    N, K, G = 45, 192, 64
    W = heavy(N, K, 7)
    H = _hessian(K, 8)
    spec = LayerSpec([3, 3, 4], G, mode, act_order)
    q = get_method("gptq").quantize(W, spec, H)
    qm = get_method("gptq-mse").quantize(W, spec, H)
    e, em = output_error(W, q.dequantize(), H), output_error(W, qm.dequantize(), H)
    assert em < 0.95 * e, (em, e)
    # the same packed format: TasaLinear built by the method runs through the kernels
    lin = nn.Linear(K, N, bias=True)
    with torch.no_grad():
        lin.weight.copy_(W)
    t = TasaLinear.from_linear(lin, spec, method="gptq-mse", H=H)
    x = torch.randn(3, 5, K)
    ref = x @ qm.dequantize().T + lin.bias
    torch.testing.assert_close(t(x), ref, rtol=1e-4, atol=1e-4)


def test_rtn_mse_is_data_free_and_better_than_rtn():
    W = heavy(29, 128, 3)
    spec = LayerSpec([3, 4], 64, "asym")
    assert not METHODS["rtn-mse"].needs_hessian and METHODS["gptq-mse"].needs_hessian
    q0 = get_method("rtn").quantize(W, spec)
    q1 = get_method("rtn-mse").quantize(W, spec)
    # it minimises each weight's error weighted by the weight's square (llama.cpp's data-free
    # rule): never worse than min/max on that, better on heavy tails
    e0 = ((W - q0.dequantize()) ** 2 * W ** 2).sum()
    e1 = ((W - q1.dequantize()) ** 2 * W ** 2).sum()
    assert e1 < 0.97 * e0
    with pytest.raises(ValueError, match="act_order"):
        get_method("rtn-mse").quantize(W, LayerSpec([3, 4], 64, "asym", True))
    with pytest.raises(ValueError, match="needs its Hessian"):
        get_method("gptq-mse").quantize(W, spec)
