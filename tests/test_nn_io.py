"""TasaLinear, swapping, save/load."""
import copy
import json
import os

import pytest
import torch
from torch import nn

from transformers import AutoModelForCausalLM

import tasa_ext
from tasa import cli
from tasa import storage as tio
from tasa import quant as Q
from tasa.layers import TasaLinear, quantized_modules, swap_linears
from tasa.modelquant import quantize_model

from tasa.util import sha256_file

from helpers import real_calib, tiny_llama, tiny_qwen2, write_legacy_folder


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
    # a transformers folder, no temp files left
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    # every file with the umask's permissions (transformers alone leaves the weights 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert {f: os.stat(out / f).st_mode & 0o777 for f in os.listdir(out)} == {
        f: 0o666 & ~umask for f in os.listdir(out)}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tasa" and qc["format_version"] == tasa_ext.FORMAT_VERSION
    assert qc["modules"] == {k: v.to_dict() for k, v in plan.items()}
    for loaded in (tio.load_quantized(out), AutoModelForCausalLM.from_pretrained(out)):
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        for name, m in quantized_modules(model).items():
            lm = loaded.get_submodule(name)
            assert isinstance(lm, TasaLinear)
            assert lm.group_bits == m.group_bits and torch.equal(lm.qweight, m.qweight)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref)
    # save_pretrained of the loaded model round-trips bit-identically
    loaded.save_pretrained(tmp_path / "q2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q2")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)


def _quantized_folder(tmp_path, act_order=False):
    model = tiny_llama()
    plan = Q.uniform_plan(model, 4, 32)
    if act_order:
        plan = {k: Q.LayerSpec(v.bits, v.group_size, v.mode, True) for k, v in plan.items()}
        quantize_model(model, plan, "gptq", calib_ids=real_calib(n=2, seqlen=32).input_ids,
                       progress=False)
    else:
        swap_linears(model, plan)
    return model, plan, tio.save_quantized(model, tmp_path / "q", plan)


def test_load_refuses_mismatch(tmp_path):
    _, _, out = _quantized_folder(tmp_path)
    cfg_path = out / "config.json"
    good = cfg_path.read_text()

    def edit(fn):
        cfg = json.loads(good)
        fn(cfg)
        cfg_path.write_text(json.dumps(cfg))

    def up(cfg):
        return cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]

    edit(lambda c: c["quantization_config"].update(format_version=tasa_ext.FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="format_version.*tasa convert"):
        tio.load_quantized(out)
    edit(lambda c: c["quantization_config"].update(version=99))
    with pytest.raises(ValueError, match="version 99"):
        tio.load_quantized(out)
    edit(lambda c: c["quantization_config"].update(quant_method="gptq"))
    with pytest.raises(ValueError, match="'gptq'-quantized model, not a tasa one"):
        tio.load_quantized(out)
    edit(lambda c: up(c).update(bits=[8, 4, 4, 4]))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.qweight has shape"):
        tio.load_quantized(out)
    edit(lambda c: up(c).update(bits=[4, 4, 5, 4]))
    with pytest.raises(ValueError, match="up_proj.*bits must be a non-empty list of widths"):
        tio.load_quantized(out)
    edit(lambda c: up(c).update(stride=2))
    with pytest.raises(ValueError, match="up_proj.*unknown keys"):
        tio.load_quantized(out)
    edit(lambda c: c["quantization_config"]["modules"].pop("model.layers.1.mlp.down_proj"))
    with pytest.raises(ValueError, match="unexpected tensors.*down_proj"):
        tio.load_quantized(out)
    edit(lambda c: c["quantization_config"]["modules"].update(
        {"model.layers.7.mlp.up_proj": up(json.loads(good))}))
    with pytest.raises(ValueError, match="'model.layers.7.mlp.up_proj', which this"):
        tio.load_quantized(out)
    edit(lambda c: c.update(intermediate_size=224))       # another model's shapes
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj"):
        tio.load_quantized(out)
    cfg_path.write_text(good)
    with pytest.raises(ValueError, match="not a tasa model folder"):
        tio.load_quantized(tmp_path)


def test_load_refuses_bad_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, out = _quantized_folder(tmp_path, act_order=True)
    wfile = out / "model.safetensors"
    good = load_file(str(wfile))

    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    assert cfg["quantization_config"]["checksums"]["model.safetensors"] == sha256_file(wfile)
    sd = dict(good)
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1    # damaged, checksum not updated
    save_file(sd, str(wfile), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match the sha256 recorded in config.json"):
        tio.load_quantized(out)

    def write(sd):            # a crafted file with a consistent checksum: deeper checks catch it
        save_file(sd, str(wfile), metadata={"format": "pt"})
        cfg["quantization_config"]["checksums"]["model.safetensors"] = sha256_file(wfile)
        cfg_file.write_text(json.dumps(cfg))

    sd = dict(good)
    del sd["model.norm.weight"]                      # a full-precision tensor missing
    write(sd)
    with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\]"):
        tio.load_quantized(out)
    sd = dict(good)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(256, 128)
    write(sd)
    with pytest.raises(ValueError, match="up_proj do not match its plan.*unexpected \\['weight'\\]"):
        tio.load_quantized(out)
    sd = dict(good)
    sd["model.layers.0.mlp.up_proj.scales"] = sd["model.layers.0.mlp.up_proj.scales"].float()
    write(sd)
    with pytest.raises(ValueError, match="up_proj.scales is F32 in the checkpoint"):
        tio.load_quantized(out)
    sd = dict(good)
    perm = sd["model.layers.0.mlp.up_proj.perm"].clone()
    perm[0] = perm[1]                                 # not a permutation: would read twice
    sd["model.layers.0.mlp.up_proj.perm"] = perm
    write(sd)
    with pytest.raises(ValueError, match="up_proj.perm is not a permutation"):
        tio.load_quantized(out)
    sd = dict(good)
    gt = sd["model.layers.0.mlp.up_proj.gtable"].clone()
    gt[1, 1] += 12                                    # a packed-row offset out of line
    sd["model.layers.0.mlp.up_proj.gtable"] = gt
    write(sd)
    with pytest.raises(ValueError, match="up_proj.gtable does not match"):
        tio.load_quantized(out)
    torch.save(good, str(out / "pytorch_model.bin"))  # a pickle checkpoint beside it
    wfile.unlink()
    with pytest.raises(ValueError, match="pickle"):
        tio.load_quantized(out)


def test_legacy_folder_loads_and_converts(tmp_path):
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    plan = mixed_plan(model, "sym", False)
    swap_linears(model, plan)
    ids = real_calib(n=2, seqlen=32).input_ids
    with torch.no_grad():
        ref = model(ids).logits
    old = write_legacy_folder(model, tmp_path / "old", plan)
    loaded = tio.load_quantized(old)                  # layout-1 folders still load
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    with pytest.raises(ValueError, match="q_proj: bit pattern has 4 entries"):  # other size
        tio.load_quantized(old, model=tiny_llama(hidden=64, inter=128))
    assert cli.main(["convert", str(old), str(tmp_path / "new")]) == 0
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "new")
    with torch.no_grad():
        assert torch.equal(new(ids).logits, ref)
    assert json.loads((tmp_path / "new" / "config.json").read_text())[
        "quantization_config"]["meta"]["base_model"] == "legacy-test"
    assert cli.main(["convert", str(tmp_path / "new"), str(tmp_path / "x")]) == 2
