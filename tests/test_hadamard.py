"""Format version 2's incoherence rotation (csrc/include/tasa/format.h): the tasa::hadamard op
against its torch reference, the rotation honoured by every registered method, TasaLinear,
save/load, and the pipeline option."""
import json

import pytest
import torch
from torch.library import opcheck

import tasa
import tasa_ext
from tasa_ext import reference as R
from tasa.layers import TasaEmbedding, TasaLinear
from tasa.quant import LayerSpec, get_method, method_names, output_error, uniform_plan

from helpers import tiny_llama


@pytest.mark.parametrize("G", [32, 64, 96, 128, 160, 256, 384])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(G, inverse, dtype):
    for shape in [(1,), (3,), (2, 5), (0,)]:
        K = G * (1 + (G % 3))            # 1..3 groups
        x = torch.randn(*shape, K).to(dtype)
        got = tasa_ext.hadamard(x, G, inverse)
        ref = R.hadamard(x, G, inverse)
        assert got.dtype == dtype and got.shape == x.shape
        tol = 2e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    assert tasa_ext.hadamard_block(G) == R.hadamard_block(G)


def test_reference_is_the_matrix_of_the_format():
    """x R with R written out as format.h defines it: blocks diag(s) H_b / sqrt(b)."""
    G, K = 96, 288
    b = R.hadamard_block(G)
    assert b == 32
    Rm = torch.zeros(K, K, dtype=torch.float64)
    s = R.hadamard_signs(K).double()
    H = R.sylvester(b).double() / b ** 0.5
    for a in range(0, K, b):
        Rm[a:a + b, a:a + b] = s[a:a + b, None] * H
    torch.testing.assert_close(Rm @ Rm.T, torch.eye(K, dtype=torch.float64))
    x = torch.randn(4, K, dtype=torch.float64)
    torch.testing.assert_close(R.hadamard(x, G), x @ Rm)
    torch.testing.assert_close(R.hadamard(x, G, True), x @ Rm.T)
    torch.testing.assert_close(tasa_ext.hadamard(x.float(), G).double(), x @ Rm,
                               atol=1e-5, rtol=1e-5)


def test_round_trip_and_norm():
    x = torch.randn(7, 640)
    y = tasa_ext.hadamard(x, 128)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tasa_ext.hadamard(y, 128, True), x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, x, atol=1e-2)


def test_signs_are_balanced_and_fixed():
    s = R.hadamard_signs(4096)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert 0.45 < (s > 0).float().mean() < 0.55
    # a prefix of the signs of a longer row: one function of the channel index
    assert torch.equal(R.hadamard_signs(100), s[:100])


def test_bad_input():
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        tasa_ext.hadamard(torch.randn(2, 100), 64)
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        tasa_ext.hadamard(torch.randn(2, 128), 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        tasa_ext.hadamard(torch.ones(2, 128, dtype=torch.int32), 128)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        tasa_ext.hadamard(torch.ones(2, 128, dtype=torch.float64), 128)


def test_opcheck():
    for args in [(torch.randn(3, 256), 128, False), (torch.randn(2, 5, 192).bfloat16(), 96, True),
                 (torch.randn(1, 64).half(), 64, False)]:
        opcheck(torch.ops.tasa.hadamard.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 19])
@pytest.mark.parametrize("dense", [0, 1])
def test_gemm_rotates_as_the_two_ops(dtype, M, dense):
    """gemm(..., hadamard=True) is hadamard(x) then gemm, bit for bit, on both CPU paths (the
    fused kernel, dequantize-once + matmul) with a permutation and mixed widths; the float64
    reference's flag agrees; opcheck sees the flag."""
    from tasa_ext.testing import random_packed
    N, K, G = 37, 480, 96
    p = random_packed(N, K, G, [3, 8, 4, 2, 4], True, True, seed=M)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    x = torch.randn(M, K).to(dtype)
    old = tasa_ext.ops.dense_rows()
    try:
        tasa_ext.ops.set_dense_rows(dense)
        fused = tasa_ext.gemm(x, *args, hadamard=True)
        two = tasa_ext.gemm(tasa_ext.hadamard(x, G, False), *args)
    finally:
        tasa_ext.ops.set_dense_rows(old)
    assert fused.dtype == dtype and torch.equal(fused, two)
    y64 = R.gemm(x.double(), *args, hadamard=True)
    assert not torch.allclose(y64, R.gemm(x.double(), *args))      # the flag does something
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(fused.double(), y64, atol=tol * y64.abs().max().item(), rtol=0)
    opcheck(torch.ops.tasa.gemm.default, (x, *args, True))


def _outlier_problem(N=48, K=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    W[:, 5] *= 15                       # an outlier input channel of the weights
    X = torch.randn(3000, K, generator=g)
    X[:, 200] *= 8                      # and one of the activations
    return W, 2 * X.T @ X / X.shape[0], X


@pytest.mark.parametrize("method", sorted(method_names()))
@pytest.mark.parametrize("mode,act_order,bits", [("sym", False, [3, 4, 8]), ("asym", True, [4, 3, 3])])
def test_every_method_honours_the_rotation(method, mode, act_order, bits):
    meth = get_method(method)
    if act_order and not meth.needs_hessian:
        act_order = False
    W, H, X = _outlier_problem()
    spec = LayerSpec(bits, 128, mode, act_order, hadamard=True)
    q = meth.quantize(W, spec, H if meth.needs_hessian else None)
    assert q.hadamard
    # the codes are those of W R quantized by the same method without the flag
    plain = LayerSpec(bits, 128, mode, act_order)
    Wr = tasa_ext.hadamard(W, 128)
    Hr = None
    if meth.needs_hessian:
        HR = tasa_ext.hadamard(H, 128)
        Hr = tasa_ext.hadamard(HR.T.contiguous(), 128).T
        Hr = 0.5 * (Hr + Hr.T)
    q2 = meth.quantize(Wr, plain, Hr)
    assert not q2.hadamard and torch.equal(q.codes, q2.codes)
    torch.testing.assert_close(q.dequantize(), tasa_ext.hadamard(q2.dequantize(), 128, True))
    # the packed layer computes x W_hat^T with W_hat the un-rotated dequantized weight
    lin = TasaLinear.from_quantized(q, torch.randn(W.shape[0]))
    assert lin.hadamard and lin.spec.hadamard and "hadamard=True" in repr(lin)
    torch.testing.assert_close(lin.dequantize(), q.dequantize(), atol=1e-5, rtol=1e-5)
    x = X[:9]
    torch.testing.assert_close(lin(x), x @ q.dequantize().T + lin.bias, atol=2e-4, rtol=2e-4)
    yb = lin(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    y = lin(x)
    assert (yb.float() - y).abs().max() < 0.02 * y.abs().max()     # bf16 rounding of x and y


@pytest.mark.parametrize("method", ["gptq", "gptq-mse"])
def test_rotation_lowers_gptq_error_on_outliers(method):
    """What the rotation is for: spreading an outlier channel over its block shrinks the groups'
    ranges (issue 27 item 3; benchmarks/results/hadamard_probe_*.md on real models)."""
    meth = get_method(method)
    W, H, _ = _outlier_problem()
    errs = {}
    for had in (False, True):
        q = meth.quantize(W, LayerSpec([3] * 3, 128, "sym", True, hadamard=had), H)
        errs[had] = output_error(W, q.dequantize(), H)
    assert errs[True] < 0.7 * errs[False], errs


def test_embedding_and_concat_refuse_or_keep_it():
    with pytest.raises(ValueError, match="rotated"):
        TasaEmbedding(100, 64, LayerSpec([4, 4], 32, hadamard=True))
    W = torch.randn(32, 128)
    a = TasaLinear.from_quantized(get_method("rtn").quantize(W, LayerSpec([4], 128, hadamard=True)))
    b = TasaLinear.from_quantized(get_method("rtn").quantize(W, LayerSpec([4], 128)))
    assert TasaLinear.concat([a, b]) is None
    f = TasaLinear.concat([a, a])
    assert f is not None and f.hadamard
    x = torch.randn(3, 128)
    torch.testing.assert_close(f(x), torch.cat([a(x), a(x)], -1))


def test_spec_dict_round_trip_and_bad_values():
    s = LayerSpec([3, 4], 64, "sym", hadamard=True)
    d = s.to_dict()
    assert d["hadamard"] is True and LayerSpec.from_dict(d) == s
    assert "hadamard" not in LayerSpec([3, 4], 64).to_dict()      # version-1 entries unchanged
    with pytest.raises(ValueError, match="hadamard must be true or false"):
        LayerSpec.from_dict({**d, "hadamard": 1})


def test_save_load_keeps_the_rotation(tmp_path):
    model = tiny_llama()
    ref = tiny_llama()
    q = tasa.quantize(model, None, bits=4, method="rtn", group_size=32, progress=False,
                      hadamard=True)
    # the decoder linears (the plan's); the packed head is the embedding quantization's, unrotated
    mods = {n: m for n, m in q.named_modules() if isinstance(m, TasaLinear) and ".layers." in n}
    assert mods and all(m.hadamard for m in mods.values())
    q.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == tasa_ext.FORMAT_VERSION == 2
    assert {n for n, e in qc["modules"].items() if e.get("hadamard")} == set(mods)
    back = tasa.load(tmp_path)
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        a, b, r = q(ids).logits, back(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b)
    # and it is the model it claims: close to the unquantized reference, not rotated garbage
    assert (a - r).abs().mean() < 0.5 * r.abs().mean()
    # a version-1 reader's view: dropping the flag from the config makes another model, which
    # is why the flag is per module and refused by older builds (unknown key)
    qc2 = dict(qc)
    qc2["modules"] = {n: {k: v for k, v in e.items() if k != "hadamard"}
                      for n, e in qc["modules"].items()}
    full = json.loads((tmp_path / "config.json").read_text())
    full["quantization_config"] = qc2
    assert full != json.loads((tmp_path / "config.json").read_text())


def test_uniform_plan_flag():
    m = tiny_llama()
    plan = uniform_plan(m, 3, 32, hadamard=True)
    assert all(s.hadamard for s in plan.values())
    assert not any(s.hadamard for s in uniform_plan(m, 3, 32).values())
