"""TasaLinear, swapping, save/load."""
import copy
import json
import os

import pytest
import torch
from torch import nn

import tasa_ext
from tasa import io as tio
from tasa import quant as Q
from tasa.nn import TasaLinear, quantized_modules, swap_linears
from tasa.driver import quantize_model

from helpers import real_calib, tiny_llama, tiny_qwen2


def mixed_plan(model, mode="asym", act_order=False):
    """Per-group bits cycling through {2,3,4,8} so every matrix mixes widths."""
    plan = {}
    cycle = [4, 2, 8, 3]
    for i, (name, m) in enumerate(Q.default_targets(model).items()):
        n = m.in_features // 32
        plan[name] = Q.LayerSpec([cycle[(i + g) % 4] for g in range(n)], 32, mode, act_order)
    return plan


def dequantized_copy(model_q, model_fp):
    """model_fp with each swapped linear's weight replaced by the TasaLinear's dequantized W."""
    ref = copy.deepcopy(model_fp)
    for name, m in quantized_modules(model_q).items():
        ref.get_submodule(name).weight.data = m.dequantize()
    return ref


@pytest.mark.parametrize("mode,act_order", [("sym", False), ("asym", False), ("asym", True)])
def test_swapped_model_matches_dequantized_weights(mode, act_order):
    model = tiny_qwen2()   # q/k/v have biases
    ids = real_calib(n=4, seqlen=32).input_ids
    qm = copy.deepcopy(model)
    plan = mixed_plan(qm, mode, act_order)
    if act_order:
        quantize_model(qm, plan, "gptq", calib_ids=ids, progress=False)
    else:
        swap_linears(qm, plan)
    assert isinstance(qm.model.layers[0].self_attn.q_proj, TasaLinear)
    assert qm.model.layers[0].self_attn.q_proj.bias is not None
    assert isinstance(qm.lm_head, nn.Linear) and isinstance(qm.model.embed_tokens, nn.Embedding)
    ref = dequantized_copy(qm, model)
    with torch.no_grad():
        a, b = qm(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tasalinear_forward_dtypes_and_repr():
    torch.manual_seed(0)
    lin = nn.Linear(128, 40, bias=True)
    t = TasaLinear.from_linear(lin, Q.LayerSpec([2, 3, 4, 8], 32, "sym"))
    x = torch.randn(3, 5, 128)
    y = t(x)
    assert y.shape == (3, 5, 40)
    torch.testing.assert_close(y, x @ t.dequantize().T + lin.bias, rtol=1e-4, atol=1e-4)
    assert t(x.to(torch.bfloat16)).dtype == torch.bfloat16
    r = repr(t)
    avg = tasa_ext.average_bits(40, 128, 32, [2, 3, 4, 8], "sym")
    assert "in_features=128, out_features=40, group_size=32" in r
    assert "bits={2: 1, 3: 1, 4: 1, 8: 1}" in r and f"avg_bits={avg:.4f}" in r
    assert t.qweight.shape == (3, (2 + 3 + 4 + 8), 16) and t.scales.shape == (4, 40)
    assert t.gtable[:, 0].tolist() == [2, 3, 4, 8]


def test_swap_errors():
    model = tiny_llama()
    with pytest.raises(KeyError, match="not a module"):
        swap_linears(model, {"model.layers.9.mlp.up_proj": Q.LayerSpec([4] * 4, 32)})
    with pytest.raises(ValueError, match="3 entries but K/group_size"):
        swap_linears(model, {"model.layers.0.mlp.up_proj": Q.LayerSpec([4] * 3, 32)})
    with pytest.raises(TypeError, match="not nn.Linear"):
        swap_linears(model, {"model.norm": Q.LayerSpec([4] * 4, 32)})


@pytest.mark.parametrize("factory,act_order", [(tiny_llama, False), (tiny_qwen2, True)])
def test_save_load_identical(tmp_path, factory, act_order):
    model = factory()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ids = real_calib(n=4, seqlen=32).input_ids
    plan = mixed_plan(model, "asym", act_order)
    quantize_model(model, plan, "gptq", calib_ids=ids, progress=False)
    with torch.no_grad():
        ref = model(ids).logits
    out = tio.save_quantized(model, tmp_path / "q", plan, meta={"method": "gptq"})
    assert sorted(os.listdir(out)) == ["model.safetensors", "tasa_config.json"]   # no temp files
    cfg = json.loads((out / "tasa_config.json").read_text())
    assert cfg["format_version"] == tasa_ext.FORMAT_VERSION
    loaded = tio.load_quantized(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for name, m in quantized_modules(model).items():
        lm = loaded.get_submodule(name)
        assert lm.group_bits == m.group_bits and torch.equal(lm.qweight, m.qweight)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, ref)
    # into a caller-provided fresh skeleton
    loaded2 = tio.load_quantized(out, model=factory(seed=5))
    with torch.no_grad():
        assert torch.equal(loaded2(ids).logits, ref)


def test_load_refuses_mismatch(tmp_path):
    model = tiny_llama()
    plan = Q.uniform_plan(model, 4, 32)
    swap_linears(model, plan)
    out = tio.save_quantized(model, tmp_path / "q", plan)
    cfg_path = out / "tasa_config.json"
    good = cfg_path.read_text()
    cfg = json.loads(good)
    cfg["format_version"] = tasa_ext.FORMAT_VERSION + 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version"):
        tio.load_quantized(out)
    cfg = json.loads(good)
    cfg["plan"]["layers"]["model.layers.0.mlp.up_proj"]["bits"] = [8, 4, 4, 4]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.qweight.*shape"):
        tio.load_quantized(out)
    cfg = json.loads(good)
    del cfg["plan"]["layers"]["model.layers.1.mlp.down_proj"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unexpected.*down_proj"):
        tio.load_quantized(out)
    cfg_path.write_text(good)
    with pytest.raises(ValueError, match="q_proj: bit pattern has 4 entries"):  # other size
        tio.load_quantized(out, model=tiny_llama(hidden=64, inter=128))
    with pytest.raises(FileNotFoundError, match="tasa_config.json"):
        tio.load_quantized(tmp_path)
