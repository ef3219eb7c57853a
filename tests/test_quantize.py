"""Per-matrix quantizers (tasa.quant: RTN, GPTQ), calibration capture (tasa.calib) and the
sequential GPTQ driver (tasa.modelquant.quantize_model)."""
import copy

import pytest
import torch

from tasa import calib
from tasa import quant as Q
from tasa.layers import TasaLinear
from tasa.modelquant import quantize_model

from helpers import real_calib, tiny_gemma3, tiny_llama, tiny_qwen2


# ---- RTN / GPTQ on one matrix ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sym", "asym"])
def test_rtn_codes_reproduce_dequant(mode):
    torch.manual_seed(0)
    W = torch.randn(40, 256)
    spec = Q.LayerSpec([2, 8, 3, 4], 64, mode)
    q = Q.quantize_rtn(W, spec)
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == torch.float16
    assert (q.zeros is None) == (mode == "sym")
    for g, b in enumerate(spec.bits):
        assert int(q.codes[:, g * 64:(g + 1) * 64].max()) < 2 ** b
    lin = TasaLinear.from_quantized(q)
    assert torch.equal(lin.dequantize(), q.dequantize())
    assert lin.group_bits == [2, 8, 3, 4]
    # error per group shrinks with bits
    err = ((W - q.dequantize()) ** 2).reshape(40, 4, 64).mean((0, 2))
    assert err[1] < err[3] < err[2] < err[0]


@pytest.mark.parametrize("mode", ["sym", "asym"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_weight_within_one_step_of_its_code(mode, method):
    """The grid of every (group, column) covers the group's values: |w - Q(w)| <= s (half a step
    inside the range, at most one step at its ends), whatever the group looks like -- mixed
    signs, all positive, all negative, constant, zero. GPTQ with H = I has nothing to
    compensate (diagonal inverse Hessian), so it obeys the same bound."""
    g = torch.Generator().manual_seed(3)
    G, N = 32, 8
    groups = [torch.randn(N, G, generator=g),                 # mixed signs
              torch.rand(N, G, generator=g) + 1.0,            # all positive, away from 0
              -(torch.rand(N, G, generator=g) * 0.5 + 2.0),   # all negative, away from 0
              torch.full((N, G), 0.3),                        # constant
              torch.zeros(N, G),                              # zero
              torch.rand(N, G, generator=g) * 1e-3 + 5.0]     # narrow range far from 0
    W = torch.cat(groups, dim=1)
    for b in (2, 3, 4, 8):
        spec = Q.LayerSpec([b] * len(groups), G, mode)
        q = (Q.quantize_rtn(W, spec) if method == "rtn"
             else Q.quantize_gptq(W, torch.eye(W.shape[1]), spec))
        step = q.scales.float().T.repeat_interleave(G, 1)             # s per weight, [N, K]
        err = (W - q.dequantize()).abs()
        worst = (err / step).reshape(N, len(groups), G).amax(dim=(0, 2))
        assert (worst <= 1 + 1e-3).all(), (b, {i: round(float(x), 2) for i, x in enumerate(worst)})


def layer_hessian(model, name, ids):
    H = calib.collect_hessians(model, ids, progress=False)[name]
    return H[0][0]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("mode", ["sym", "asym"])
def test_gptq_beats_rtn_on_real_text(bits, mode):
    model = tiny_llama()
    batch = real_calib()
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        H = layer_hessian(model, name, batch.input_ids)
        W = model.get_submodule(name).weight.detach()
        K = W.shape[1]
        spec = Q.LayerSpec([bits] * (K // 32), 32, mode)
        e_rtn = Q.output_error(W, Q.quantize_rtn(W, spec).dequantize(), H)
        e_gptq = Q.output_error(W, Q.quantize_gptq(W, H, spec).dequantize(), H)
        spec_ao = Q.LayerSpec(spec.bits, 32, mode, act_order=True)
        q_ao = Q.quantize_gptq(W, H, spec_ao)
        e_ao = Q.output_error(W, q_ao.dequantize(), H)
        assert e_gptq < 0.9 * e_rtn, (name, e_gptq, e_rtn)
        assert e_ao < e_rtn
        assert q_ao.perm is not None and sorted(q_ao.perm.tolist()) == list(range(K))
        assert torch.equal(TasaLinear.from_quantized(q_ao).dequantize(), q_ao.dequantize())


def test_gptq_mixed_bits_act_order_groups_over_permuted_order():
    torch.manual_seed(1)
    W = torch.randn(24, 128)
    X = torch.randn(512, 128) * torch.linspace(0.1, 3, 128)
    H = 2 * X.T @ X / 512
    spec = Q.LayerSpec([8, 2, 4, 3], 32, "asym", act_order=True)
    q = Q.quantize_gptq(W, H, spec)
    assert q.perm[0] == 127          # largest diagonal first
    for g, b in enumerate(spec.bits):
        assert int(q.codes[:, g * 32:(g + 1) * 32].max()) < 2 ** b
    lin = TasaLinear.from_quantized(q)
    assert torch.equal(lin.dequantize(), q.dequantize())
    assert lin.spec.bits == [8, 2, 4, 3]


def test_bad_inputs_name_the_problem():
    W = torch.randn(16, 128)
    with pytest.raises(ValueError, match="3 entries but K/group_size = 128/32 = 4 groups"):
        Q.quantize_rtn(W, Q.LayerSpec([4, 4, 4], 32))
    with pytest.raises(ValueError, match="K=128 is not divisible by group_size=96"):
        Q.quantize_rtn(W, Q.LayerSpec([4], 96))
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.quantize_rtn(W, Q.LayerSpec([4] * 8, 16))
    with pytest.raises(ValueError, match=r"unsupported bit widths \[5\]"):
        Q.quantize_rtn(W, Q.LayerSpec([4, 5, 4, 4], 32))
    Wn = W.clone()
    Wn[3, 7] = float("nan")
    with pytest.raises(ValueError, match="my.layer: weight has 1 NaN/Inf"):
        Q.quantize_rtn(Wn, Q.LayerSpec([4] * 4, 32), name="my.layer")
    with pytest.raises(ValueError, match="NaN/Inf"):
        Q.quantize_gptq(Wn, torch.eye(128), Q.LayerSpec([4] * 4, 32))
    with pytest.raises(ValueError, match="Hessian shape"):
        Q.quantize_gptq(W, torch.eye(64), Q.LayerSpec([4] * 4, 32))
    with pytest.raises(ValueError, match="unknown quantization method 'awq'"):
        quantize_model(tiny_llama(), {}, method="awq")
    with pytest.raises(ValueError, match="mode"):
        Q.LayerSpec([4], 32, "weird")


def test_resolve_group_size_and_uniform_plan():
    assert Q.resolve_group_size(576, 128) == 96
    assert Q.resolve_group_size(1536, 128) == 128
    m = tiny_llama(hidden=96, inter=192)
    with pytest.raises(ValueError, match="not divisible"):
        Q.uniform_plan(m, 4, 64)
    plan = Q.uniform_plan(m, 4, 64, fit_group_size=True)
    assert "lm_head" not in plan and len(plan) == 14
    assert plan["model.layers.0.self_attn.q_proj"].group_size == 32
    assert plan["model.layers.0.mlp.down_proj"].group_size == 64
    d = Q.plan_to_dict(plan)
    assert Q.plan_from_dict(d) == plan
    d["format_version"] = 999
    with pytest.raises(ValueError, match="format_version 999"):
        Q.plan_from_dict(d)


# ---- capture ----------------------------------------------------------------------------------

def _last_block_outputs(model, ids, blockwise):
    layers, _ = calib.decoder_layers(model)
    outs = []
    h = layers[-1].register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            if blockwise:
                calib.run_blockwise(model, ids, batch_size=3, progress=False)
            else:
                model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return torch.cat(outs)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_gemma3])
def test_blockwise_replay_matches_full_forward(factory):
    """The Catcher's recorded kwargs (masks, rotary embeddings, Gemma3 sliding/global layers)
    replayed block by block give the same activations as the full model."""
    model = factory()
    ids = real_calib(n=5, seqlen=48).input_ids
    ref = _last_block_outputs(model, ids, False)
    got = _last_block_outputs(model, ids, True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_hessians_multi_source_and_shared_inputs():
    model = tiny_llama()
    batch = real_calib(n=6, seqlen=32)
    hs = calib.collect_hessians(model, batch.input_ids, src=batch.src, n_sources=3, progress=False)
    H, cnt = hs["model.layers.0.self_attn.q_proj"]
    assert H.shape == (3, 128, 128) and cnt.tolist() == [64, 64, 64]
    assert hs["model.layers.0.self_attn.k_proj"][0] is H          # q/k/v share one accumulation
    # source 0's Hessian equals a single-source pass over source 0's sequences only
    only0 = calib.collect_hessians(model, batch.input_ids[batch.src == 0], progress=False)
    torch.testing.assert_close(H[0], only0["model.layers.0.self_attn.q_proj"][0][0], rtol=1e-4, atol=1e-6)


def test_sequential_gptq_model():
    model = tiny_llama()
    ids = real_calib(n=8, seqlen=64).input_ids
    test_ids = real_calib(n=2, seqlen=64, seed=7).input_ids
    with torch.no_grad():
        ref = model(test_ids).logits
    m8 = copy.deepcopy(model)
    quantize_model(m8, Q.uniform_plan(m8, 8, 32, "asym"), "gptq", calib_ids=ids, progress=False)
    with torch.no_grad():
        out8 = m8(test_ids).logits
    assert (out8 - ref).abs().max() < 2e-2 * ref.abs().max()
    m3g = copy.deepcopy(model)
    st = quantize_model(m3g, Q.uniform_plan(m3g, 3, 32, "sym"), "gptq", calib_ids=ids,
                          progress=False)
    assert len(st["errors"]) == 14
    m3r = copy.deepcopy(model)
    quantize_model(m3r, Q.uniform_plan(m3r, 3, 32, "sym"), "rtn", progress=False)
    with torch.no_grad():
        e_g = ((m3g(ids).logits - model(ids).logits) ** 2).mean()
        e_r = ((m3r(ids).logits - model(ids).logits) ** 2).mean()
    assert e_g < e_r


@pytest.mark.parametrize("method", ["gptq", "gptq-mse"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_the_column_kernel_equals_the_torch_loop(method, act_order, monkeypatch):
    """quantize_gptq with the tasa::gptq_cols_ kernel gives the codes, scales and zeros of the
    torch column loop (tasa_ext.reference.gptq_cols_), mixed widths, odd row count."""
    import tasa_ext
    from tasa_ext import reference
    from tasa.quant import get_method

    g = torch.Generator().manual_seed(5)
    N, K, G = 45, 384, 64
    W = torch.randn(N, K, generator=g) * 0.05
    X = torch.randn(2000, K, generator=g) * torch.linspace(0.2, 3, K)
    H = 2 * X.T @ X / 2000
    spec = Q.LayerSpec([3, 4, 8, 3, 2, 4], G, "asym", act_order=act_order)
    meth = get_method(method)
    fast = meth.quantize(W, spec, H)
    monkeypatch.setattr(tasa_ext, "gptq_cols_", reference.gptq_cols_)
    slow = meth.quantize(W, spec, H)
    assert torch.equal(fast.codes, slow.codes)
    assert torch.equal(fast.scales, slow.scales)
    assert torch.equal(fast.zeros, slow.zeros)
    assert (fast.perm is None) == (not act_order)
