"""GGUF export (tasa.gguf_export, `tasa export --gguf`) and the KL yardstick (`tasa eval --kl`).

The model under test is a tiny LLaMA cut out of SmolLM2's own GGUF (2 blocks, width 256, its
tokenizer and metadata kept): rows of 256 take k-quants, the 384-long rows of ffn_down take
llama.cpp's fallback, so both paths of the type table run. Only the tests that run llama.cpp
need llama-cpp-python (skipped with the install command when it is missing).
"""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from tasa import gguf_export as ge
from tasa.quant.spec import LayerSpec, plan_to_dict

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _need_llama_cpp(gguf_path=None):
    """Skip, with the reason, unless llama-cpp-python imports, fits this CPU and (given a GGUF)
    quantizes and runs it in a child process: a build for another CPU dies with SIGILL, which
    in-process would end the whole test session."""
    why = ge.llama_cpp_problem(None if gguf_path is None else str(gguf_path))
    if why:
        pytest.skip(why)


def tiny_gguf(path, n_layers=2, n_embd=256, n_ff=384, n_head=4, n_kv=2, untied=False):
    """A small LLaMA GGUF cut out of SmolLM2-135M's file: the first heads / channels of its
    first blocks, every tensor F32, its tokenizer and metadata kept; ``untied``: with an output
    head of its own (``output.weight``, a scaled copy of the embedding)."""
    import gguf
    from tasa import models
    try:
        src = models.resolve_gguf("smollm2-135m")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))
    r = gguf.GGUFReader(str(src))
    hd = int(r.fields["llama.embedding_length"].contents()) // int(
        r.fields["llama.attention.head_count"].contents())
    sizes = {"llama.block_count": n_layers, "llama.embedding_length": n_embd,
             "llama.feed_forward_length": n_ff, "llama.attention.head_count": n_head,
             "llama.attention.head_count_kv": n_kv}
    w = gguf.GGUFWriter(str(path), "llama")
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vt = f.types[0]
        val = sizes.get(name, f.contents())
        w.add_key_value(name, val, vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY
                        else None)
    w.add_file_type(0)
    cut = {"attn_q": (n_head * hd, n_embd), "attn_k": (n_kv * hd, n_embd),
           "attn_v": (n_kv * hd, n_embd), "attn_output": (n_embd, n_head * hd),
           "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff)}
    for t in r.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= n_layers:
            continue
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape([int(x) for x in reversed(t.shape)])
        kind = parts[2] if parts[0] == "blk" else parts[0]
        if kind in cut:
            rows, cols = cut[kind]
            a = a[:rows, :cols]
        elif a.ndim == 2:                # token_embd [vocab, n_embd]
            a = a[:, :n_embd]
            if untied:
                w.add_tensor("output.weight", np.ascontiguousarray(a * 0.5))
        else:                            # norms
            a = a[:n_embd]
        w.add_tensor(t.name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os
    root = tmp_path_factory.mktemp("gguf")
    old = os.environ.get("TASA_CACHE")
    os.environ["TASA_CACHE"] = str(root / "cache")
    try:
        path = tiny_gguf(root / "tiny.gguf")
        from tasa.models import load_model
        model, tok, _ = load_model(str(path))
        yield root, path, model, tok
    finally:
        if old is None:
            os.environ.pop("TASA_CACHE", None)
        else:
            os.environ["TASA_CACHE"] = old


def _plan(model):
    """Block 0 at 3 bits, block 1 at 4, its down_proj at 8, block 0's up_proj mixing 3 and 4
    across its two groups (average 3.5)."""
    plan = {}
    for i in range(model.config.num_hidden_layers):
        for lin in LINEARS:
            n = f"model.layers.{i}.{lin}"
            k_in = model.get_submodule(n).weight.shape[1]
            w = 3 if i == 0 else (8 if lin == "mlp.down_proj" else 4)
            bits = [w] * (k_in // 128)
            if i == 0 and lin == "mlp.up_proj":
                bits = [3, 4]
            plan[n] = LayerSpec(bits, 128)
    return plan


# ---- without llama.cpp -------------------------------------------------------------------------


def test_install_command_follows_the_cpu():
    """The build recipe asks for AVX-512 only on a CPU that has it (a build with it dies with
    SIGILL on an AVX2-only CPU) and never for the native build (it segfaults on AMX)."""
    avx2 = ge.install_command(frozenset({"avx2", "fma", "f16c"}))
    full = ge.install_command(frozenset({"avx2", "avx512f", "avx512_vnni", "avx512vbmi",
                                         "avx512_bf16"}))
    assert "-DGGML_AVX2=ON" in avx2 and "AVX512" not in avx2
    for opt in ("GGML_AVX512=ON", "GGML_AVX512_VNNI=ON", "GGML_AVX512_VBMI=ON",
                "GGML_AVX512_BF16=ON"):
        assert opt in full
    assert "-DGGML_NATIVE=OFF" in avx2 and "-DGGML_NATIVE=OFF" in full
    assert ge.INSTALL == ge.install_command()


def test_build_mismatch_names_what_the_cpu_lacks():
    info = ("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | "
            "AVX512_VNNI = 1 | AVX512_BF16 = 0 | LLAMAFILE = 1 | OPENMP = 1 |")
    avx2 = frozenset({"avx", "avx2", "fma", "f16c"})
    assert ge.build_mismatch(info, avx2) == ["AVX512", "AVX512_VNNI"]
    assert ge.build_mismatch(info, avx2 | {"avx512f", "avx512_vnni"}) == []
    assert ge.build_mismatch(info, frozenset()) == []         # flags unknown: no claim


def test_require_llama_cpp_names_the_install_when_missing(monkeypatch):
    """Missing llama-cpp-python: an ImportError with this CPU's build command, no crash."""
    ge.llama_cpp_problem.cache_clear()
    monkeypatch.setattr(ge.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(ImportError, match="missing; install it with: CMAKE_ARGS="):
            ge.require_llama_cpp()
    finally:
        monkeypatch.undo()
        ge.llama_cpp_problem.cache_clear()


def _child(code):
    return [sys.executable, "-c", code]


def test_child_problem_turns_a_crash_into_a_reason():
    """A llama.cpp smoke child killed by a signal, failing, or built for another CPU gives a
    reason naming it (the test session survives); a clean one gives None."""
    assert ge.child_problem(_child("print('SMOKE_OK')")) is None
    why = ge.child_problem(_child("import os, signal; os.kill(os.getpid(), signal.SIGILL)"))
    assert "SIGILL" in why and "illegal instruction" in why and "rebuild" in why
    assert "SIGSEGV" in ge.child_problem(
        _child("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"))
    why = ge.child_problem(_child("import sys; sys.exit('llama_model_quantize failed')"))
    assert "exit 1" in why and "llama_model_quantize failed" in why
    assert "no message" in ge.child_problem(_child("pass"))   # no SMOKE_OK: not a pass
    why = ge.child_problem(_child("print('SYSTEM_INFO CPU : AVX2 = 1 | AVX512 = 1 |'); "
                                  "print('SMOKE_OK')"), flags=frozenset({"avx2"}))
    assert "AVX512" in why and "SIGILL" in why
    assert "ran past" in ge.child_problem(_child("import time; time.sleep(5)"), timeout=0.5)

def test_tensor_types_table_and_fallbacks():
    specs = {"a": LayerSpec([3, 3], 128), "b": LayerSpec([4] * 3, 128),
             "c": LayerSpec([3, 4], 128), "d": LayerSpec([3, 3, 8], 128),
             "e": LayerSpec([8] * 3, 128), "f": LayerSpec([2, 2], 128)}
    shapes = {"a": (64, 256), "b": (64, 384), "c": (64, 256), "d": (64, 384), "e": (64, 384),
              "f": (64, 256)}
    t = ge.tensor_types(specs, shapes)
    assert (t["a"]["asked"], t["a"]["type"]) == ("Q3_K", "Q3_K")
    assert (t["b"]["asked"], t["b"]["type"]) == ("Q4_K", "Q5_0")      # 384: llama.cpp's fallback
    assert t["c"]["mixed"] and t["c"]["width"] == 4                     # 3.5: half rounds up
    assert t["d"]["mixed"] and t["d"]["width"] == 5 and t["d"]["type"] == "Q5_1"   # avg 4.67
    assert t["e"]["type"] == "Q8_0" and t["f"]["type"] == "Q2_K"
    assert not t["a"]["mixed"] and math.isclose(t["d"]["avg_width"], 14 / 3)


def test_gguf_name_map_and_unknown_names():
    m = ge.gguf_name_map("llama", 2, ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                      "lm_head"])
    assert m == {"model.layers.1.self_attn.q_proj": "blk.1.attn_q.weight",
                 "model.layers.0.mlp.down_proj": "blk.0.ffn_down.weight",
                 "lm_head": "output.weight"}
    with pytest.raises(ValueError, match="no llama.cpp tensor name"):
        ge.gguf_name_map("llama", 2, ["model.layers.0.mystery"])
    with pytest.raises(ValueError, match="no architecture"):
        ge.gguf_name_map("not-an-arch", 2, [])


def test_importance_is_the_mean_square_input_per_channel():
    from helpers import tiny_llama
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = torch.randint(0, 200, (5, 23))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    got = ge.importance(model, ids, names, batch_size=2, progress=False)
    seen = {n: [] for n in names}
    hs = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, i, n=n: seen[n].append(i[0].reshape(-1, i[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()
    for n in names:
        x = torch.cat(seen[n]).double()
        assert got[n].shape == (x.shape[1],)
        torch.testing.assert_close(got[n], (x * x).mean(0).float(), rtol=1e-5, atol=1e-7)


def test_reference_gguf_keeps_metadata_and_weights(tiny, tmp_path):
    import gguf
    _root, path, model, _tok = tiny
    # re-quantize the tiny file's ffn_up to Q8_0 so the rewrite has something to dequantize
    out = ge.reference_gguf(path, tmp_path / "ref.gguf", progress=False)
    a, b = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(out))
    keys = [k for k in a.fields if not k.startswith("GGUF.")]
    assert keys and all(k in b.fields for k in keys)
    assert b.fields["tokenizer.ggml.tokens"].contents()[:50] == \
        a.fields["tokenizer.ggml.tokens"].contents()[:50]
    assert b.fields["general.file_type"].contents() == 0
    ta = {t.name: t for t in a.tensors}
    for t in b.tensors:
        assert t.tensor_type.name == "F32"
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(ta[t.name].data))
    with pytest.raises(ValueError, match="F32 or F16"):
        ge.reference_gguf(path, tmp_path / "x.gguf", "Q4_0")


def test_export_refuses_a_non_gguf_source(tmp_path):
    with pytest.raises(ValueError, match="convert_hf_to_gguf"):
        ge.source_gguf(str(tmp_path))
    with pytest.raises(ValueError, match="one of the two"):
        ge.export(tmp_path / "o.gguf", plan=None, quantized=None)


# ---- with llama.cpp ----------------------------------------------------------------------------

def test_export_types_sizes_and_logits(tiny, tmp_path):
    """The exported file loads in llama.cpp, every tensor has the type the plan asked (or the
    stated fallback), and its logits stay close to the reference's, as close as llama.cpp's
    own Q4_K_M of the same reference."""
    root, path, model, tok = tiny
    _need_llama_cpp(path)
    import gguf
    from tasa import divergence
    plan = _plan(model)
    pf = tmp_path / "plan.json"
    pf.write_text(json.dumps(plan_to_dict(plan, alpha=0.5)))
    out = tmp_path / "tasa.gguf"
    rep = ge.export(out, model=str(path), plan=pf, progress=False, log=lambda *a: None)
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    expect = {0: "Q3_K", 1: "Q4_K"}
    for i in range(2):
        for lin, g in zip(LINEARS, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                    "ffn_up", "ffn_down")):
            want = expect[i]
            if lin == "mlp.down_proj":           # k_in 384: no 256-superblocks
                want = "IQ4_NL" if i == 0 else "Q8_0"
            if i == 0 and lin == "mlp.up_proj":  # widths [3, 4]: average 3.5 -> 4
                want = "Q4_K"
            assert written[f"blk.{i}.{g}.weight"] == want, (i, lin)
    assert written["token_embd.weight"] == "Q8_0"          # the tied table at tasa's 8 bits
    assert rep["fallbacks"] == 1 and rep["mixed"] == 1 and rep["alpha"] == 0.5
    assert rep["bytes"] == out.stat().st_size
    assert rep["calibration"]["n_general"] + rep["calibration"]["n_task"] > 0

    ids = tok(open(__file__).read()[:3000], return_tensors="pt").input_ids[0][:256]
    seqs = [divergence.ScoredSeq(ids[:128], 1), divergence.ScoredSeq(ids[128:256], 1)]
    k_m = tmp_path / "q4km.gguf"
    ge.llama_quantize(rep["reference_gguf"], k_m, "Q4_K_M")
    ref_cpp = ge.LlamaCppLogits(rep["reference_gguf"], n_ctx=128)
    cands = {"llama.cpp F32": ref_cpp, "tasa gguf": ge.LlamaCppLogits(out, n_ctx=128),
             "Q4_K_M": ge.LlamaCppLogits(k_m, n_ctx=128)}
    s = divergence.compare(model, cands, seqs, progress=False)
    # the reference file through llama.cpp is the transformers reference (round-off only)
    assert s["llama.cpp F32"]["kl"] < 1e-3 and s["llama.cpp F32"]["top1"] > 0.97
    # the 3/4-bit export drifts, but no further than a few times llama.cpp's own 4.5-bit mix
    assert 0 < s["tasa gguf"]["kl"] < max(0.05, 4 * s["Q4_K_M"]["kl"])
    assert s["tasa gguf"]["top1"] > 0.8


def test_llama_quantize_imatrix_reaches_the_quantizer(tiny, tmp_path):
    """An importance matrix that weights one half of the input channels changes the quantized
    codes (so the array really reaches llama.cpp), and a bad mix name is refused."""
    _root, path, model, _tok = tiny
    _need_llama_cpp(path)
    import gguf
    ref = ge.reference_gguf(path, tmp_path / "ref.gguf", progress=False)
    name = "blk.0.attn_q.weight"
    flat = {name: torch.ones(256)}
    skew = {name: torch.cat([torch.full((128,), 100.0), torch.full((128,), 1e-3)])}
    a = ge.llama_quantize(ref, tmp_path / "a.gguf", "Q3_K_M", overrides={name: "Q3_K"},
                          imatrix=flat)
    b = ge.llama_quantize(ref, tmp_path / "b.gguf", "Q3_K_M", overrides={name: "Q3_K"},
                          imatrix=skew)
    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    assert ta[name].tensor_type.name == tb[name].tensor_type.name == "Q3_K"
    wa = gguf.quants.dequantize(ta[name].data, ta[name].tensor_type)
    wb = gguf.quants.dequantize(tb[name].data, tb[name].tensor_type)
    w = gguf.quants.dequantize(next(t for t in gguf.GGUFReader(str(ref)).tensors
                                    if t.name == name).data, gguf.GGMLQuantizationType.F32)
    w = w.reshape(wa.shape)
    err = lambda q, cols: float(((q - w)[:, cols] ** 2).sum())   # noqa: E731
    assert err(wb, slice(0, 128)) < err(wa, slice(0, 128))        # the weighted half: better
    with pytest.raises(ValueError, match="unknown llama.cpp mix"):
        ge.llama_quantize(ref, tmp_path / "c.gguf", "Q9_Z")


# ---- tasa eval --kl ----------------------------------------------------------------------------

def test_eval_kl_cli_on_a_folder(tiny, tmp_path, capsys):
    """`tasa eval --kl` on a 3-bit RTN folder of the tiny model and a text file of the user's:
    KL > 0, top-1 < 1, a JSON report whose numbers equal divergence.compare's."""
    import tasa
    from tasa import cli, divergence
    _root, path, model, tok = tiny
    q = tasa.quantize(model, None, bits=3, method="rtn", group_size=128, progress=False)
    folder = tmp_path / "q3"
    q.save_pretrained(folder)
    tok.save_pretrained(folder)
    text = tmp_path / "mine.txt"
    text.write_text(open(__file__).read() * 2)
    rep = tmp_path / "kl.json"
    rc = cli.main(["eval", "--kl", "--quantized", str(folder), "--model", str(path), "--text",
                   str(text), "--kl-tokens", "1024", "--seqlen", "128", "--out", str(rep),
                   "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "KL" in out and "q3" in out
    r = json.loads(rep.read_text())
    s = r["summary"]["q3"]
    assert s["kl"] > 0 and s["top1"] < 1 and s["kl_ci"] > 0
    assert r["summary"]["reference"]["kl"] == 0
    from tasa.models import load_model
    ref, _tok, _ = load_model(str(path))
    seqs = divergence.kl_sequences(tok, str(text), max_tokens=1024, seqlen=128)
    again = divergence.compare(ref, {"q3": tasa.load(folder)}, seqs, progress=False)
    assert math.isclose(again["q3"]["kl"], s["kl"], rel_tol=1e-5)
    # no folder, a missing file: one-line errors
    assert cli.main(["eval", "--kl", "--model", str(path)]) == 2
    assert "--quantized" in capsys.readouterr().err
    assert cli.main(["eval", "--kl", "--quantized", str(folder), "--model", str(path),
                     "--text", str(tmp_path / "nope.txt")]) == 2
    assert "neither" in capsys.readouterr().err
    # --against: a 4-bit folder scored on the same tokens; the paired difference is the mean of
    # the per-sequence differences (so it lies within the two means' difference exactly)
    q4 = tasa.quantize(load_model(str(path))[0], None, bits=4, method="rtn", group_size=128,
                       progress=False)
    f4 = tmp_path / "sub" / "q3"           # the same name: told apart in the tables
    q4.save_pretrained(f4)
    rep2 = tmp_path / "kl2.json"
    assert cli.main(["eval", "--kl", "--quantized", str(folder), "--against", str(f4),
                     "--model", str(path), "--text", str(text), "--kl-tokens", "1024",
                     "--seqlen", "128", "--out", str(rep2), "--quiet"]) == 0
    out = capsys.readouterr().out
    r2 = json.loads(rep2.read_text())
    assert set(r2["summary"]) == {"reference", "q3", "q3#2"}
    d = r2["paired"]["q3#2"]
    assert d["sequences"] == len(seqs) and d["dkl_ci"] > 0
    assert math.isclose(d["dkl"], r2["summary"]["q3#2"]["kl"] - r2["summary"]["q3"]["kl"],
                        rel_tol=1e-6, abs_tol=1e-9)       # equal-length sequences: same weights
    assert d["dkl"] < 0 and "KL(q3#2) - KL(q3)" in out     # 4 bits moved the model less
    assert math.isclose(r2["summary"]["q3"]["kl"], s["kl"], rel_tol=1e-6)
    assert cli.main(["eval", "--against", str(f4), "--model", str(path)]) == 2
    assert "--kl" in capsys.readouterr().err


# ---- fitting llama.cpp's menu to a size (tasa.gguf_fit) ------------------------------------------

def _brute(options, weight, capacity):
    import itertools
    names = list(options)
    best = None
    for combo in itertools.product(*[list(options[n].items()) for n in names]):
        b = sum(o["bytes"] for _t, o in combo)
        if b > capacity:
            continue
        e = sum(weight[n] * o["error"] for n, (_t, o) in zip(names, combo))
        if best is None or e < best:
            best = e
    return best


@pytest.mark.parametrize("seed", range(6))
def test_fit_types_is_the_exact_knapsack(seed, monkeypatch):
    """On random option tables (odd byte counts, errors falling with bytes plus noise) the fit
    reaches the brute-force optimum under the capacity; with the unit coarsened (few units) it
    stays within the capacity and no worse than the all-smallest choice; a capacity below the
    smallest choice is refused."""
    from tasa import gguf_fit as gf
    rng = np.random.default_rng(seed)
    opts, weight = {}, {}
    for i in range(5):
        types = rng.choice(["Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"],
                           size=int(rng.integers(2, 5)), replace=False)
        size = np.sort(rng.integers(50, 1000, size=len(types)))
        err = np.sort(rng.random(len(types)))[::-1] * rng.uniform(0.1, 10)
        opts[f"t{i}"] = {str(t): {"bytes": int(b), "error": float(e)}
                         for t, b, e in zip(types, size, err)}
        weight[f"t{i}"] = float(rng.uniform(0.1, 3))
    lo = sum(min(o["bytes"] for o in v.values()) for v in opts.values())
    hi = sum(max(o["bytes"] for o in v.values()) for v in opts.values())
    for cap in (lo, int(rng.integers(lo, hi)), int(rng.integers(lo, hi)), hi):
        got = gf.fit_types(opts, weight, cap)
        used = sum(opts[n][t]["bytes"] for n, t in got.items())
        e = sum(weight[n] * opts[n][t]["error"] for n, t in got.items())
        assert used <= cap
        assert e == pytest.approx(_brute(opts, weight, cap), rel=1e-12)
    monkeypatch.setattr(gf, "MAX_UNITS", 7)
    cap = (lo + hi) // 2
    got = gf.fit_types(opts, weight, cap)
    assert sum(opts[n][t]["bytes"] for n, t in got.items()) <= cap
    e_small = sum(weight[n] * min(v.values(), key=lambda o: o["bytes"])["error"]
                  for n, v in opts.items())
    assert sum(weight[n] * opts[n][t]["error"] for n, t in got.items()) <= e_small
    with pytest.raises(ValueError, match="smallest types"):
        gf.fit_types(opts, weight, lo - 1)


def test_unit_gains_recover_a_linear_loss_model():
    """D_u(b) = g_u P_u(b) exactly -> g_u back; a unit whose probes never raised the loss gets
    the smallest positive gain (not 0); all-zero probes -> every gain 1."""
    from tasa import gguf_fit as gf
    rng = np.random.default_rng(3)
    g = {f"u{i}": float(rng.uniform(0.5, 5)) for i in range(6)}
    P = {u: {3: float(rng.uniform(1, 10)), 4: float(rng.uniform(0.1, 1))} for u in g}
    D = {u: {b: g[u] * P[u][b] for b in (3, 4)} for u in g}
    D["u5"] = {3: -0.01, 4: 0.0}
    got = gf.unit_gains(D, P)
    for u in list(g)[:5]:
        assert got[u] == pytest.approx(g[u], rel=1e-12)
    assert got["u5"] == pytest.approx(min(g[u] for u in list(g)[:5]), rel=1e-12)
    assert set(gf.unit_gains({u: {3: 0.0, 4: -1.0} for u in g}, P).values()) == {1.0}


def test_menu_follows_the_row_length():
    from tasa import gguf_fit as gf
    assert gf.menu(512) == gf.K_MENU and gf.menu(256 * 7) == gf.K_MENU
    assert gf.menu(576) == gf.LEGACY_MENU and gf.menu(384) == gf.LEGACY_MENU
    # every menu type has a GGML type and a size: the knapsack's bytes come from the file
    import gguf
    for t in gf.K_MENU + gf.LEGACY_MENU:
        assert t in gguf.GGMLQuantizationType.__members__ and gguf.GGMLQuantizationType[t] in \
            gguf.GGML_QUANT_SIZES


def _tiny_measurement(model, hot: str):
    """A measurement of the tiny model with RTN probes in which unit ``hot`` raised the loss
    30x more than every other unit."""
    from tasa.measurement import Measurement, SensitivityResult
    from tasa.sensitivity import sublayer_units
    units = sublayer_units(model)
    d3 = {u: {"ppl": (30.0 if u == hot else 1.0) * 1e-2} for u in units}
    d4 = {u: {"ppl": v["ppl"] / 4} for u, v in d3.items()}
    sens = SensitivityResult(objectives=["ppl"], delta=d3, bits=3, complete=True,
                             delta_by_width={"4": d4})
    return Measurement(config={"sens_method": "rtn", "group_size": 128, "mode": "asym",
                               "hadamard": False, "damp": 0.01},
                       format_version=2,
                       units={u: {"block": i, "linears": list(f)} for u, (i, f) in units.items()},
                       sensitivity=sens)


@pytest.mark.slow
def test_fit_export_keeps_an_untied_head_at_its_plan_type(tmp_path):
    """A model with an output head of its own whose plan packs the head (Qwen2.5-Coder-0.5B's
    dequantized reference is such a model): the head is no sensitivity unit, so the fit keeps
    it at the plan's type (8 bits -> Q8_0) instead of refusing the measurement, and fits the
    decoder linears to the size; the embedding's and the head's types can be given instead."""
    import os
    path = tiny_gguf(tmp_path / "untied.gguf", untied=True)
    _need_llama_cpp(path)
    from tasa import gguf_fit as gf
    from tasa.models import load_model
    old = os.environ.get("TASA_CACHE")
    os.environ["TASA_CACHE"] = str(tmp_path / "cache")
    try:
        model = load_model(str(path))[0]
        assert not model.config.tie_word_embeddings
        plan = _plan(model)
        plan["lm_head"] = LayerSpec([8] * (model.lm_head.in_features // 128), 128)
        pf = tmp_path / "plan.json"
        pf.write_text(json.dumps(plan_to_dict(plan, alpha=0.5)))
        (tmp_path / "measurement.json").write_text(json.dumps(
            _tiny_measurement(model, "model.layers.1.mlp").to_dict()))
        lo = ge.export(tmp_path / "lo.gguf", model=str(path), plan=pf, progress=False,
                       log=lambda *a: None)
        assert {t["tensor"]: t["written"] for t in lo["tensors"]}["output.weight"] == "Q8_0"
        size = int(lo["bytes"] * 1.05)
        r = gf.export(tmp_path / "fit.gguf", size, model=str(path), plan=pf, progress=False,
                      log=lambda *a: None, scoring="tasa")
        assert r["bytes"] <= size
        assert ge.gguf_tensors(tmp_path / "fit.gguf")["output.weight"]["type"] == "Q8_0"
        assert "lm_head" not in r["fit"]["table"] and len(r["fit"]["table"]) == len(plan) - 1
        # the embedding's and the head's types given (a llama.cpp mix's): written as given
        r = gf.export(tmp_path / "fit2.gguf", size, model=str(path), plan=pf, progress=False,
                      log=lambda *a: None, scoring="tasa", embedding_type="Q4_0",
                      head_type="Q6_K")
        tens = ge.gguf_tensors(tmp_path / "fit2.gguf")
        assert (tens["token_embd.weight"]["type"], tens["output.weight"]["type"]) == ("Q4_0", "Q6_K")
        assert r["bytes"] <= size
    finally:
        if old is None:
            os.environ.pop("TASA_CACHE", None)
        else:
            os.environ["TASA_CACHE"] = old


@pytest.mark.slow
def test_fit_export_hits_the_size_and_follows_the_gains(tiny, tmp_path):
    """`gguf_fit.export` (`tasa export --size-mb`): the file is at most the size asked and uses most of it, every
    tensor's type is one its row length allows, wider types measure smaller errors; with TASA
    gains a unit measured 30x more sensitive gets at least the bytes the proxy alone gives it;
    a size below the smallest menu is refused; the option table is kept and re-used."""
    _root, path, _model, _tok = tiny
    _need_llama_cpp(path)
    from tasa import gguf_fit as gf
    from tasa.models import load_model
    model = load_model(str(path))[0]       # the fixture's may have been quantized in place
    plan = _plan(model)
    pf = tmp_path / "plan.json"
    pf.write_text(json.dumps(plan_to_dict(plan, alpha=0.5)))
    lo = ge.export(tmp_path / "lo.gguf", model=str(path), plan=pf, progress=False,
                   log=lambda *a: None)["bytes"]
    size = int(lo * 1.08)
    hot = "model.layers.1.mlp"
    (tmp_path / "measurement.json").write_text(json.dumps(
        _tiny_measurement(model, hot).to_dict()))
    logs = []
    reps = {}
    for sc in ("proxy", "tasa"):
        out = tmp_path / f"{sc}.gguf"
        r = gf.export(out, size, model=str(path), plan=pf, progress=False, log=logs.append,
                      scoring=sc)
        assert out.stat().st_size == r["bytes"] <= size
        assert r["bytes"] > 0.9 * size
        for t in r["tensors"]:
            assert t["written"] in gf.menu(model.get_submodule(t["module"]).weight.shape[1])
        reps[sc] = r
    tab = reps["tasa"]["fit"]["table"]
    for f, row in tab.items():
        by = sorted(row["options"].values(), key=lambda o: o["bytes"])
        assert by[-1]["error"] < by[0]["error"], f            # Q8_0 beats the smallest type
        assert row["probe"][3] > row["probe"][4] > 0
    g = reps["tasa"]["fit"]["gains"]
    assert g[hot] > 5 * min(g.values())

    def unit_bytes(r):
        return sum(t["bytes"] for t in r["tensors"] if t["module"].startswith(hot))
    assert unit_bytes(reps["tasa"]) >= unit_bytes(reps["proxy"])
    assert not any("option table from" in str(m) for m in logs)
    again = gf.export(tmp_path / "again.gguf", size - 4096, model=str(path), plan=pf,
                      progress=False, log=logs.append)
    assert any("option table from" in str(m) for m in logs)  # another size: the table re-used
    assert again["bytes"] <= size - 4096
    assert "fitted" in ge.format_report(reps["tasa"])
    with pytest.raises(ValueError, match="smallest file"):
        gf.export(tmp_path / "x.gguf", lo // 4, model=str(path), plan=pf, progress=False,
                  log=lambda *a: None, scoring="proxy")
    # the command: --size-mb through the CLI (the proxy table is cached: one llama.cpp call),
    # and the fitting options refused without a size
    from tasa import cli
    cf = tmp_path / "cli.gguf"
    assert cli.main(["export", "--plan", str(pf), "--model", str(path), "--gguf", str(cf),
                     "--size-mb", str(size / 1e6), "--fit-scoring", "proxy", "--quiet"]) == 0
    assert cf.stat().st_size <= size
    bpp = reps["proxy"]["bits_per_param"]           # the same size in bits per parameter
    assert cli.main(["export", "--plan", str(pf), "--model", str(path), "--gguf", str(cf),
                     "--bits-per-param", str(bpp), "--fit-scoring", "proxy", "--quiet"]) == 0
    assert cf.stat().st_size <= reps["proxy"]["bytes"]
    with pytest.raises(ValueError, match="one of the two"):
        gf.export(tmp_path / "b.gguf", size, bits_per_param=bpp, model=str(path), plan=pf,
                  progress=False, log=lambda *a: None, scoring="proxy")
    assert cli.main(["export", "--plan", str(pf), "--model", str(path), "--gguf", str(cf),
                     "--fit-scoring", "proxy", "--quiet"]) == 2
    # types left out of the menu are not written; an unknown one is refused
    ex = sorted({t["written"] for t in reps["tasa"]["tensors"]})[:1]
    r = gf.export(tmp_path / "ex.gguf", size, model=str(path), plan=pf, progress=False,
                  log=lambda *a: None, exclude=ex)
    assert ex[0] not in {t["written"] for t in r["tensors"]} and r["bytes"] <= size
    assert r["fit"]["excluded"] == ex and "left out" in ge.format_report(r)
    # the benchmark's control: no type the reference re-quantizes to losslessly (the tiny
    # model is cut out of a Q4_1 file: Q4_1 and Q5_1 reproduce its 384-long rows exactly)
    r = gf.export(tmp_path / "nl.gguf", size, model=str(path), plan=pf, progress=False,
                  log=lambda *a: None, drop_lossless=True)
    assert r["fit"]["dropped_lossless"] > 0
    for t in r["tensors"]:
        assert tab[t["module"]]["options"][t["written"]]["error"] > 0
    with pytest.raises(ValueError, match="not in llama.cpp's menu"):
        gf.export(tmp_path / "ex2.gguf", size, model=str(path), plan=pf, progress=False,
                  log=lambda *a: None, exclude=["Q9_Z"])
    # a measurement of other weights is refused, not silently used
    m = _tiny_measurement(model, hot)
    m.config["weights"] = "0" * 32
    with pytest.raises(ValueError, match="other weights"):
        gf.export(tmp_path / "z.gguf", size, model=str(path), plan=pf, progress=False,
                  log=lambda *a: None, measurement=m)
    (tmp_path / "measurement.json").unlink()
    with pytest.raises(ValueError, match="measurement.json"):
        gf.export(tmp_path / "y.gguf", size, model=str(path), plan=pf, progress=False,
                  log=lambda *a: None)
