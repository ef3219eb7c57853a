"""The TASA pipeline on tiny models: objectives, sensitivity probes, resume, allocation from a
measurement, the end-to-end job and its CLI."""
import copy
import math
import importlib
import json

import numpy as np
import pytest
import torch

import tasa_ext
from tasa import cli, pipeline, sensitivity as S
from tasa import corpora
from tasa.storage import load_quantized
from tasa.measurement import Measurement
from tasa.quant import LayerSpec, quantize_rtn, resolve_group_size

from helpers import ByteTok, tiny_gemma3, tiny_qwen2


def tiny_cfg(**kw):
    # RTN probes: these tests measure the probes themselves; the default gptq-mse probes run in
    # the command-line tests (TINY_ARGS) and test_gptq_probes_*
    base = dict(model="tiny", n_gen=2, n_task=2, n_test=2, mix_seqlen=64, sens_ppl_windows=2,
                sens_ppl_seqlen=48, sens_math_items=2, sens_arc_items=3, n_calib=4, seqlen=64,
                eval_windows=1, eval_seqlen=128, sens_method="rtn")
    base.update(kw)
    return pipeline.PipelineConfig(**base)


def tiny3(seed=0, hidden=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=256,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


# ---- objectives -------------------------------------------------------------------------------

def test_qa_objective_scores_exactly_the_continuation():
    tok = ByteTok()
    obj = S.qa_objective("t", tok, [("Q: ab\nA:", " yes"), ("Q: longer one\nA:", " no!")])
    assert obj.input_ids.shape == (2, len("Q: longer one\nA: no!"))
    for i, (p, c) in enumerate([("Q: ab\nA:", " yes"), ("Q: longer one\nA:", " no!")]):
        row = obj.score[i]
        idx = row.nonzero().flatten().tolist()
        assert idx == list(range(len(p), len(p) + len(c)))
        assert bytes(obj.input_ids[i, idx].tolist()).decode() == c
    with pytest.raises(ValueError, match="no usable"):
        S.qa_objective("t", tok, [("x" * 50, " y")], max_len=20)


def test_qa_objective_item_span_scores_the_question_too():
    """span="item" scores every token after the first (the question's too), the same ids;
    a span it does not know is refused, as is a bad --sens-span in the config."""
    tok = ByteTok()
    pairs = [("Q: ab\nA:", " yes"), ("Q: longer one\nA:", " no!")]
    ans = S.qa_objective("t", tok, pairs)
    item = S.qa_objective("t", tok, pairs, span="item")
    assert torch.equal(ans.input_ids, item.input_ids)
    for i, (p, c) in enumerate(pairs):
        assert item.score[i].nonzero().flatten().tolist() == list(range(1, len(p) + len(c)))
    assert item.n_scored == ans.n_scored + sum(len(p) - 1 for p, _ in pairs)
    with pytest.raises(ValueError, match="span must be"):
        S.qa_objective("t", tok, pairs, span="question")
    cfg = tiny_cfg()
    cfg.sens_item_span = ("arc", "ppl")
    with pytest.raises(ValueError, match="--sens-item-span"):
        cfg.validate()
    args = cli.build_parser().parse_args(["quantize", "--bits", "4", "--out", "o", "--sens-item-span", "arc"])
    assert cli._pipeline_config(args).sens_item_span == ("arc",)
    args = cli.build_parser().parse_args(["quantize", "--bits", "4", "--out", "o", "--sens-item-span", ""])
    assert cli._pipeline_config(args).sens_item_span == ()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["quantize", "--bits", "4", "--out", "o", "--sens-item-span", "ppl"])


def test_item_span_enters_the_fingerprint_only_when_not_empty():
    """Files written before --sens-item-span existed scored the answers only: they still match
    at (); an item span is another measurement, and the objectives are built with it."""
    model = tiny3()
    cfg = tiny_cfg()
    cfg.sens_item_span = ()
    assert "sens_item_span" not in pipeline.measure_fingerprint(model, cfg)
    cfg.sens_item_span = ("arc",)
    assert pipeline.measure_fingerprint(model, cfg)["sens_item_span"] == ["arc"]
    from tasa.pipeline import stages
    split = pipeline.split_data(cfg)
    tok = ByteTok()
    with_q = {o.name: o for o in stages.build_objectives(tok, split, cfg)}
    cfg.sens_item_span = ()
    plain = {o.name: o for o in stages.build_objectives(tok, split, cfg)}
    assert torch.equal(with_q["arc"].input_ids, plain["arc"].input_ids)
    assert with_q["arc"].n_scored > plain["arc"].n_scored
    assert torch.equal(with_q["math"].score, plain["math"].score)
    assert torch.equal(with_q["ppl"].score, plain["ppl"].score)


def test_objective_losses_match_full_model_nll():
    model = tiny3()
    tok = ByteTok()
    obj = S.qa_objective("qa", tok, [("Question: 1+1?\nAnswer:", " 2"),
                                     ("Question: what is red?\nAnswer:", " a colour")])
    got = S.objective_losses(model, [obj], tokens_per_batch=40)["qa"]   # forces 2 batches
    with torch.no_grad():
        lg = model(input_ids=obj.input_ids).logits.double()
    lp = torch.log_softmax(lg[:, :-1], -1).gather(-1, obj.input_ids[:, 1:, None])[..., 0]
    ref = float(-(lp * obj.score[:, 1:]).sum() / obj.score[:, 1:].sum())
    assert got == pytest.approx(ref, rel=1e-5)


# ---- sensitivity probes -------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [tiny3, tiny_qwen2, tiny_gemma3])
def test_probe_equals_quantizing_the_unit_in_a_copy(factory):
    """The cached-input probe of unit u == the loss of a copy of the model with u quantized,
    computed by a plain full forward."""
    model = factory()
    tok = ByteTok()
    text = corpora.load_general()[:3]
    objs = [S.text_objective("ppl", tok, text, 3, 40, seed=1),
            S.qa_objective("qa", tok, [("Question: abc?\nAnswer:", " def ghi")])]
    units = S.block_units(model)
    res = S.measure_sensitivity(model, objs, units, widths=(2, 4), group_size=128,
                                progress=False)
    base = S.objective_losses(model, objs)
    assert res["base"] == pytest.approx(base)
    for b in (2, 4):
        for u, (_, fqns) in units.items():
            m2 = copy.deepcopy(model)
            for f in fqns:
                lin = m2.get_submodule(f)
                G = resolve_group_size(lin.in_features, 128)
                q = quantize_rtn(lin.weight, LayerSpec([b] * (lin.in_features // G), G, "asym"))
                lin.weight.data = q.dequantize()
            ref = S.objective_losses(m2, objs)
            for k in ref:
                assert res["delta"][b][u][k] == pytest.approx(ref[k] - base[k], abs=2e-5), (b, u, k)
                # the per-item record sums to the objective's delta
                items = np.asarray(res["items"][b][u][k])
                assert items.shape == (objs[0 if k == "ppl" else 1].input_ids.shape[0],)
                assert items.sum() / np.sum(res["tokens"][k]) == pytest.approx(
                    res["delta"][b][u][k], rel=1e-9, abs=1e-12)
    # the model is left untouched
    assert S.objective_losses(model, objs) == pytest.approx(base)
    assert any(abs(d["ppl"]) > 1e-4 for d in res["delta"][2].values())


@pytest.mark.parametrize("factory", [tiny3, tiny_gemma3])
def test_kl_probe_equals_the_kl_of_a_quantized_copy(factory, monkeypatch):
    """scoring="kl": the probe of unit u == the KL(reference || copy with u quantized) summed
    over each item's scored positions, computed from two plain full forwards (top-K = the whole
    vocabulary here, so the bucketed KL is the full one); never negative."""
    monkeypatch.setattr(S, "KL_TOP_K", 10 ** 6)
    model = factory()
    tok = ByteTok()
    text = corpora.load_general()[:3]
    objs = [S.text_objective("ppl", tok, text, 3, 40, seed=1),
            S.qa_objective("qa", tok, [("Question: abc?\nAnswer:", " def ghi"),
                                       ("Question: x?\nAnswer:", " yz")])]
    units = S.block_units(model)
    res = S.measure_sensitivity(model, objs, units, widths=(2,), group_size=128,
                                progress=False, scoring="kl")
    with torch.no_grad():
        ref = {o.name: torch.log_softmax(model(input_ids=o.input_ids).logits.double(), -1)
               for o in objs}
    for u, (_, fqns) in units.items():
        m2 = copy.deepcopy(model)
        for f in fqns:
            lin = m2.get_submodule(f)
            G = resolve_group_size(lin.in_features, 128)
            lin.weight.data = quantize_rtn(
                lin.weight, LayerSpec([2] * (lin.in_features // G), G, "asym")).dequantize()
        for o in objs:
            with torch.no_grad():
                lq = torch.log_softmax(m2(input_ids=o.input_ids).logits.double(), -1)
            lp = ref[o.name]
            kl = (lp.exp() * (lp - lq)).sum(-1)[:, :-1] * o.score[:, 1:]   # t-1 predicts t
            want = kl.sum(1).numpy()
            got = np.asarray(res["items"][2][u][o.name])
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
            assert (got >= 0).all()
            assert res["delta"][2][u][o.name] == pytest.approx(
                want.sum() / o.score[:, 1:].sum().item(), rel=2e-4)
    with pytest.raises(ValueError, match="scoring must be one of"):
        S.measure_sensitivity(model, objs, units, widths=(2,), progress=False, scoring="acc")


def test_kl_probes_also_give_the_nll_scoring_of_the_same_pass():
    """scoring="kl" returns ``nll_items``: the gold-NLL increases of the same probe passes,
    equal to what a separate scoring="nll" run measures (so one run gives both scorings)."""
    model = tiny3()
    tok = ByteTok()
    text = corpora.load_general()[:3]
    objs = [S.text_objective("ppl", tok, text, 3, 40, seed=3),
            S.qa_objective("qa", tok, [("Question: abc?\nAnswer:", " def ghi"),
                                       ("Question: x?\nAnswer:", " yz")])]
    units = S.sublayer_units(model)
    kl = S.measure_sensitivity(model, objs, units, widths=(2, 3), group_size=128,
                               progress=False, scoring="kl")
    nll = S.measure_sensitivity(model, objs, units, widths=(2, 3), group_size=128,
                                progress=False, scoring="nll")
    assert "nll_items" not in nll
    moved = 0.0
    for b in (2, 3):
        assert list(kl["nll_items"][b]) == list(units)
        for u in units:
            for o in objs:
                got = np.asarray(kl["nll_items"][b][u][o.name])
                want = np.asarray(nll["items"][b][u][o.name])
                # (the KL pass takes log of softmax probabilities, the NLL pass cross_entropy:
                # ~1e-7 per token apart, a few tokens per item here)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
                moved += np.abs(want).sum()
                # and they differ from the KL items themselves
                assert not np.allclose(got, np.asarray(kl["items"][b][u][o.name]))
    assert moved > 0


def test_bucketed_kl_is_a_lower_bound_exact_with_every_token():
    from tasa.divergence import _log_rest      # the KL helpers live in divergence

    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(3 * torch.randn(7, 300, generator=g), -1)
    lq = torch.log_softmax(lp + 0.8 * torch.randn(7, 300, generator=g), -1)
    full = (lp.exp() * (lp - lq)).sum(-1).double()
    top, idx = lp.topk(300, -1)
    torch.testing.assert_close(S.bucketed_kl(top, idx, lq, _log_rest(lp, idx)), full,
                               rtol=1e-6, atol=1e-9)
    for k in (1, 10, 64):
        top, idx = lp.topk(k, -1)
        b = S.bucketed_kl(top, idx, lq, _log_rest(lp, idx))
        assert (b <= full + 1e-6).all() and (b >= 0).all()
        b2 = S.bucketed_kl(top, idx, lq)                 # the rest as 1 - sum(top)
        torch.testing.assert_close(b2, b, rtol=1e-4, atol=1e-6)
    top, idx = lp.topk(64, -1)
    assert S.bucketed_kl(top, idx, lq, _log_rest(lp, idx)).sum() > 0.9 * full.sum()


def test_log_rest_equals_the_float64_logsumexp_and_handles_underflow():
    """The fp32 rest sum equals the float64 logsumexp over the non-top entries (1e-6), also on
    rows whose rest underflows fp32 (redone in float64) and when the top holds every token."""
    from tasa.divergence import _log_rest

    g = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(9, 500, generator=g)
    logits[3, 7] = 150.0                                 # rest mass ~e-140: below fp32
    logits[5, :] = -30.0
    logits[5, 0] = 80.0                                  # rest ~e-105
    lp = torch.log_softmax(logits, -1)
    for k in (1, 17, 256):
        idx = lp.topk(k, -1).indices
        want = torch.logsumexp(lp.scatter(1, idx, float("-inf")).double(), 1)
        got = _log_rest(lp, idx)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(got).all() and got[3] < -100
    every = lp.topk(500, -1).indices
    assert torch.isneginf(_log_rest(lp, every)).all()


def test_kl_nll_from_logits_equals_log_softmax_scoring():
    """The probes' one-softmax scoring equals bucketed_kl over log_softmax and the gold NLL from
    log_softmax, also on rows where a top or gold probability underflows fp32 (those rows go
    the exact way) and with a top that holds every token."""
    from tasa.divergence import _log_rest, kl_nll_from_logits

    g = torch.Generator().manual_seed(2)
    V = 700
    ref_logits = 3 * torch.randn(12, V, generator=g)
    logits = ref_logits + 0.5 * torch.randn(12, V, generator=g)
    logits[2, 5] = 200.0                                  # every other prob underflows fp32
    gold = torch.randint(0, V, (12,), generator=g)
    gold[2] = 6
    lp_ref = torch.log_softmax(ref_logits, -1)
    for k in (8, 256, V):
        top, idx = lp_ref.topk(k, -1)
        rest = _log_rest(lp_ref, idx)
        kl, nll = kl_nll_from_logits(logits, top, idx, rest, gold)
        lq = torch.log_softmax(logits, -1)
        torch.testing.assert_close(kl, S.bucketed_kl(top, idx, lq, rest), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(nll, -lq.gather(1, gold[:, None])[:, 0].double(),
                                   rtol=1e-6, atol=1e-6)
        assert nll[2] > 150 and torch.isfinite(kl).all() and (kl >= 0).all()


def test_bf16_probes_leave_the_weights_fp32_even_on_error():
    """A bf16 probe pass holds bf16 copies of the running blocks' linears only while it runs:
    the model's weights are the same fp32 tensors afterwards, and after a failing pass."""
    model = tiny3()
    tok = ByteTok()
    objs = [S.text_objective("ppl", tok, corpora.load_general()[:3], 3, 40, seed=4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    S.measure_sensitivity(model, objs, S.sublayer_units(model), widths=(2,), progress=False,
                          compute_dtype=torch.bfloat16, scoring="kl")
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    with torch.no_grad():
        pr = S._Prober(model, objs, 2048, compute_dtype=torch.bfloat16)
        boom = model.model.layers[-1].mlp.register_forward_hook(
            lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            pr._run(start=1)
    boom.remove()
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def test_bf16_probes_agree_with_fp32():
    """bf16 autocast probes rank the units as the fp32 ones do (the fp32 head keeps the
    losses themselves close)."""
    model = tiny3(hidden=256)
    tok = ByteTok()
    objs = [S.text_objective("ppl", tok, corpora.load_general()[:4], 4, 64, seed=2)]
    units = S.sublayer_units(model)
    r32 = S.measure_sensitivity(model, objs, units, widths=(2,), progress=False)
    r16 = S.measure_sensitivity(model, objs, units, widths=(2,), progress=False,
                                compute_dtype=torch.bfloat16)
    assert r16["base"]["ppl"] == pytest.approx(r32["base"]["ppl"], rel=2e-2)
    a = np.array([r32["delta"][2][u]["ppl"] for u in units])
    b = np.array([r16["delta"][2][u]["ppl"] for u in units])
    assert np.corrcoef(a, b)[0, 1] > 0.9, (a, b)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        S.objective_losses(model, objs, compute_dtype=torch.float16)


def test_sublayer_units_split_attention_and_mlp():
    model = tiny3()
    su = S.sublayer_units(model)
    bu = S.block_units(model)
    assert len(su) == 2 * len(bu)
    assert sorted(f for _, fs in su.values() for f in fs) == sorted(f for _, fs in bu.values() for f in fs)
    for name, (i, fs) in su.items():
        assert all(f.startswith(name + ".") for f in fs) and name.rsplit(".", 1)[1] in ("self_attn", "mlp")


def test_linear_units_name_every_linear_once():
    model = tiny3()
    lu = S.linear_units(model)
    bu = S.block_units(model)
    assert sorted(lu) == sorted(f for _, fs in bu.values() for f in fs)
    assert all(lu[f][0] == i for i, fs in bu.values() for f in fs)


# ---- measurement, resume, allocation ------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    cfg = tiny_cfg()
    m = pipeline.measure(tiny3(), ByteTok(), cfg, d / "measurement.json", progress=False,
                         log=lambda s: None)
    return cfg, m, d


def test_measurement_contents(measured):
    cfg, m, d = measured
    assert isinstance(m, Measurement)
    on_disk = Measurement.load(d)
    assert on_disk.complete and on_disk.sensitivity.complete
    assert on_disk.config == pipeline.measure_fingerprint(tiny3(), cfg)
    assert on_disk.config["weights"] == pipeline.weights_digest(tiny3())
    assert pipeline.weights_digest(tiny3(seed=1)) != on_disk.config["weights"]
    assert on_disk.to_dict() == json.loads(json.dumps(m.to_dict()))   # what is returned is saved
    mix = m.mixture
    assert 0.0 <= mix.alpha_star <= 1.0
    rows = [r for r in mix.table if not r.get("argmin")]
    assert [r["alpha"] for r in rows] == list(cfg.alpha_grid)
    assert all(r["f_rel"] >= 1 - 1e-9 for r in rows)
    sens = m.sensitivity
    assert set(sens.delta) == set(m.units) and len(m.units) == 2 * 3     # attention, MLP x 3 blocks
    assert sens.widths == list(cfg.sens_widths) and sens.bits == cfg.sens_widths[0]
    for b in sens.widths:          # every width probed for every unit, with its items
        assert set(sens.deltas(b)) == set(m.units)
        for u in m.units:
            for k in sens.objectives:
                got = np.sum(sens.item_delta[str(b)][u][k]) / np.sum(sens.item_tokens[k])
                assert got == pytest.approx(sens.deltas(b)[u][k], rel=1e-9, abs=1e-12)
    assert {r["b"] for r in sens.illusion} >= {"math", "arc"}
    for b, rep in sens.noise.items():
        assert set(rep["reliability"]) == set(sens.objectives)
        for r in rep["tau"]:
            assert r["lo"] <= r["hi"] and -1 <= r["tau"] <= 1
    lin = mix.linear_errors
    for f in m.linears:    # the baselines' inputs: both errors fall with the width
        assert (np.diff(lin[f]["rel"]) < 0).all() and (np.diff(lin[f]["gen"]) < 0).all()
        assert 0 < lin[f]["rel"][0] < 1
    # every linear has per-group errors at every supported width, decreasing with width
    assert mix.group_error_widths == list(tasa_ext.SUPPORTED_BITS)
    for f, E in mix.group_errors.items():
        E = np.asarray(E)
        assert E.shape == (m.linears[f]["k_in"] // m.linears[f]["group_size"], 4)
        assert (np.diff(E, axis=1) <= 1e-12).all()


def test_resume_after_interruption_gives_the_same_plan(measured, tmp_path, monkeypatch):
    cfg, m_full, _ = measured
    calls = {"n": 0}
    real = S._Prober.probe

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt   # the user pressed Ctrl-C during the second probe
        return real(self, *a, **k)

    path = tmp_path / "measurement.json"
    monkeypatch.setattr(S._Prober, "probe", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipeline.measure(tiny3(), ByteTok(), cfg, path, progress=False, log=lambda s: None)
    partial = Measurement.load(path)
    assert len(partial.sensitivity.delta) == 1 and not partial.sensitivity.complete
    assert not partial.complete
    monkeypatch.setattr(S._Prober, "probe", real)
    logs = []
    m = pipeline.measure(tiny3(), ByteTok(), cfg, path, progress=False, log=logs.append)
    assert any("resuming" in s for s in logs)
    assert calls["n"] == 2          # the resumed run probed only the two missing units
    for u in m_full.units:
        for k, v in m_full.sensitivity.delta[u].items():
            assert m.sensitivity.delta[u][k] == pytest.approx(v, abs=1e-9)
    a1 = pipeline.allocate(m_full, 3.6)
    a2 = pipeline.allocate(m, 3.6)
    assert a1["plan"] == a2["plan"]
    # other settings: refused, never overwritten
    with pytest.raises(ValueError, match="other settings"):
        pipeline.measure(tiny3(), ByteTok(), tiny_cfg(sens_widths=(2,)), path, progress=False,
                         log=lambda s: None)
    assert Measurement.load(path).config == pipeline.measure_fingerprint(tiny3(), cfg)
    # other weights behind the same settings (a model folder overwritten): refused too
    with pytest.raises(ValueError, match="weights"):
        pipeline.measure(tiny3(seed=1), ByteTok(), cfg, path, progress=False, log=lambda s: None)
    # a measurement from before weight fingerprints resumes on its settings, saying so
    old = Measurement.load(path)
    del old.config["weights"]
    old.save(path)
    logs = []
    pipeline.measure(tiny3(), ByteTok(), cfg, path, progress=False, log=logs.append)
    assert any("predates weight fingerprints" in s for s in logs)


def test_probe_weights_replace_the_rtn_probe():
    """A probe given weights for its unit's linears measures exactly a copy of the model with
    those weights; a missing or misshapen weight is an error, not an RTN probe."""
    model = tiny3()
    tok = ByteTok()
    objs = [S.text_objective("ppl", tok, corpora.load_general()[:3], 3, 40, seed=1)]
    units = S.sublayer_units(model)
    g = torch.Generator().manual_seed(3)
    pw = {(4, f): model.get_submodule(f).weight.detach() * (1 + 0.05 * torch.randn(
        model.get_submodule(f).weight.shape, generator=g)) for _, fs in units.values() for f in fs}
    res = S.measure_sensitivity(model, objs, units, widths=(4,), progress=False, probe_weights=pw)
    rtn = S.measure_sensitivity(model, objs, units, widths=(4,), progress=False)
    base = S.objective_losses(model, objs)
    for u, (_, fqns) in units.items():
        m2 = copy.deepcopy(model)
        for f in fqns:
            m2.get_submodule(f).weight.data = pw[(4, f)].clone()
        ref = S.objective_losses(m2, objs)
        assert res["delta"][4][u]["ppl"] == pytest.approx(ref["ppl"] - base["ppl"], abs=2e-5)
        assert res["delta"][4][u]["ppl"] != pytest.approx(rtn["delta"][4][u]["ppl"], abs=1e-4)
    assert S.objective_losses(model, objs) == pytest.approx(base)      # model untouched
    some = next(iter(pw))
    with pytest.raises(KeyError, match="probe weight"):
        S.measure_sensitivity(model, objs, units, widths=(4,), progress=False,
                              probe_weights={k: v for k, v in pw.items() if k != some})
    rect = next(k for k, v in pw.items() if v.shape[0] != v.shape[1])
    with pytest.raises(ValueError, match="shape"):
        S.measure_sensitivity(model, objs, units, widths=(4,), progress=False,
                              probe_weights={k: v.t() if k == rect else v for k, v in pw.items()})


def test_gptq_probe_weights_quantize_each_unit_alone_on_full_precision_inputs():
    """Block 0 sees the same inputs alone or in the sequential quantization: its probe weights
    are the sequential GPTQ's bit for bit. Later blocks get the full-precision model's inputs
    (a probe changes one unit), so they differ from the sequential run's; and with a Hessian from
    inputs captured by hooks on the full-precision model, GPTQ gives them again."""
    from tasa.modelquant import quantize_model
    from tasa.quant import get_method
    cfg = tiny_cfg(sens_method="gptq", sens_widths=(3,))
    model, tok = tiny3(), ByteTok()
    units = S.sublayer_units(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    errs = {}
    pw = pipeline.probe_weights(model, tok, cfg, 0.5, units, progress=False, log=lambda s: None,
                                error_widths=(4,), errors=errs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    fqns = sorted(f for _, fs in units.values() for f in fs)
    # weights at the probe width only; the quantizer's output error at it and at 4 bits too
    assert sorted(f for _, f in pw) == fqns and {b for b, _ in pw} == {3}
    assert set(errs) == {(b, f) for b in (3, 4) for f in fqns}
    assert all(0 < errs[(4, f)] < errs[(3, f)] for f in fqns)
    ids, _ = pipeline.gptq_calibration(tok, cfg, 0.5, log=lambda s: None)
    seq = copy.deepcopy(model)
    plan = {}
    for f in fqns:
        lin = seq.get_submodule(f)
        G = resolve_group_size(lin.in_features, cfg.group_size)
        # the probes quantize as the job would: rotated where it rotates (the default for GPTQ)
        plan[f] = LayerSpec([3] * (lin.in_features // G), G, cfg.mode, hadamard=cfg.rotates())
    assert cfg.rotates()
    quantize_model(seq, plan, "gptq", calib_ids=ids, progress=False)
    deq = {f: seq.get_submodule(f).dequantize() for f in fqns}
    first = [f for f in fqns if ".layers.0." in f]
    assert len(first) == 7
    for f in first:
        assert torch.equal(pw[(3, f)], deq[f].to(torch.bfloat16)), f
    last = [f for f in fqns if ".layers.2.mlp." in f]
    assert any(not torch.equal(pw[(3, f)], deq[f].to(torch.bfloat16)) for f in last)
    # the Hessian of layers.2.mlp.down_proj from hooks on the full-precision model
    f = "model.layers.2.mlp.down_proj"
    lin = model.get_submodule(f)
    xs = []
    h = lin.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for i in range(0, ids.shape[0], 8):
            model(input_ids=ids[i:i + 8], use_cache=False)
    h.remove()
    X = torch.cat(xs).double()
    H = (2 * X.T @ X / X.shape[0]).float()
    q = get_method("gptq").quantize(lin.weight, plan[f], H, damp=cfg.damp, name=f)
    agree = (q.dequantize().to(torch.bfloat16) == pw[(3, f)]).float().mean().item()
    assert agree > 0.98, agree          # (GPTQ's rounding flips where H differs in the last bits)
    # the recorded error is tr(dW H dW^T) of that quantizer's weights under that Hessian
    from tasa.quant import output_error
    assert errs[(3, f)] == pytest.approx(output_error(lin.weight, q.dequantize(), H), rel=0.02)


def test_gptq_probes_in_the_measurement(measured, tmp_path):
    """--sens-method gptq: the probes run on GPTQ's weights (other deltas than RTN's, each the
    loss of the unit quantized alone), the fingerprint says so and an RTN measurement of the same
    settings is refused, not silently reused."""
    cfg = tiny_cfg(sens_method="gptq")
    model, tok = tiny3(), ByteTok()
    path = tmp_path / "measurement.json"
    m = pipeline.measure(model, tok, cfg, path, progress=False, log=lambda s: None)
    fp = pipeline.measure_fingerprint(model, cfg)
    assert fp["sens_method"] == "gptq" and fp["n_calib"] == cfg.n_calib
    assert "sens_method" not in pipeline.measure_fingerprint(model, tiny_cfg())
    rtn = measured[1]             # tiny_cfg(): RTN probes, the same settings otherwise
    for b in cfg.sens_widths:
        d, r = m.sensitivity.deltas(b), rtn.sensitivity.deltas(b)
        assert set(d) == set(r)
        assert any(abs(d[u]["ppl"] - r[u]["ppl"]) > 1e-5 for u in d)
    with pytest.raises(ValueError, match="other settings"):
        pipeline.measure(tiny3(), tok, tiny_cfg(), path, progress=False, log=lambda s: None)
    # one probe width: the GPTQ error at 4 bits is recorded all the same (from the probe
    # weights' pass), and the allocation carries the 3-bit probes with it
    cfg3 = tiny_cfg(sens_method="gptq", sens_widths=(3,))
    m3 = pipeline.measure(tiny3(), tok, cfg3, tmp_path / "m3.json", progress=False,
                          log=lambda s: None)
    ue = m3.sensitivity.unit_error
    assert sorted(ue) == ["3", "4"] and m3.sensitivity.widths == [3]
    assert all(0 < ue["4"][u] < ue["3"][u] for u in m3.units)
    E, _, _ = pipeline.unit_errors(m3, beta=0.5)
    for u in m3.units:
        assert E[u][4] == pytest.approx(min(E[u][3] * ue["4"][u] / ue["3"][u], E[u][3]))


@pytest.mark.parametrize("bits", [3.3, 3.5, 4.0, 4.4, 6.0])
@pytest.mark.parametrize("intra", [False, True])
def test_allocation_meets_the_budget_exactly(measured, bits, intra):
    _, m, _ = measured
    A = pipeline.allocate(m, bits, beta=0.5, intra=intra)
    total = n = 0
    for f, e in A["plan"].items():
        s = m.linears[f]
        c = tasa_ext.cost_bits(s["n_out"], s["k_in"], s["group_size"], e["bits"], s["mode"])
        assert c == e["cost_bits"]
        total += c
        n += s["n_out"] * s["k_in"]
    assert total == A["summary"]["cost_bits"] <= A["budget_bits"] == int(np.floor(bits * n + 1e-9))
    assert set(b for e in A["plan"].values() for b in e["bits"]) <= {3, 4, 8}
    # the budget is used: no unit that would gain from a wider width could be widened within
    # what is left (a unit whose measured error does not fall with more bits keeps its width)
    left = A["budget_bits"] - total
    if not intra:
        errors, _, _ = pipeline.unit_errors(m, beta=0.5)
        for u, b in A["item_bits"].items():
            nxt = {3: 4, 4: 8}.get(b)
            if nxt and errors[u][nxt] < errors[u][b]:
                extra = sum((nxt - b) * m.linears[f]["k_in"] * -(-m.linears[f]["n_out"] // 16) * 16
                            for f in m.units[u]["linears"])
                assert extra > left


def test_code_bit_budget_counts_the_code_bits_only(measured):
    _, m, _ = measured
    n = sum(v["n_out"] * v["k_in"] for v in m.linears.values())
    for bits in (3.5, 4.0):
        A = pipeline.allocate(m, bits, budget="code")
        code = sum(e["group_size"] * m.linears[f]["n_out"] * sum(e["bits"]) for f, e in A["plan"].items())
        assert code == pytest.approx(A["summary"]["code_avg_bits"] * n)
        assert code <= A["budget_bits"] == int(np.floor(bits * n + 1e-9))
        assert A["summary"]["avg_bits"] > A["summary"]["code_avg_bits"]      # scales cost extra
        S_ = pipeline.allocate(m, bits, budget="storage")
        assert S_["summary"]["avg_bits"] <= bits < A["summary"]["avg_bits"]
        assert A["budget"] == "code" and S_["budget"] == "storage"
    with pytest.raises(ValueError, match="budget kind"):
        pipeline.allocate(m, 3.5, budget="bytes")


def test_unit_errors_use_every_measured_width(measured):
    _, m, _ = measured
    m = copy.deepcopy(m)
    sens = m.sensitivity
    names = list(m.units)
    rng = np.random.default_rng(0)      # synthetic probes (a random tiny model's are noise)
    for b, scale in ((3, 1.0), (4, 0.3)):
        sens.deltas(b).update({u: {k: float(scale * rng.random() - 0.05) for k in sens.objectives}
                               for u in names})
    E, scores, _ = pipeline.unit_errors(m, beta=1.0, widths=(2, 3, 4, 8))
    for i, u in enumerate(names):
        e = [E[u][b] for b in (2, 3, 4, 8)]
        assert all(x >= y for x, y in zip(e, e[1:]))          # never worse with more bits
        Z3 = sum(max(sens.delta[v]["ppl"], 0) for v in names)
        assert E[u][3] == pytest.approx(max(sens.delta[u]["ppl"], 0) / Z3)
        assert E[u][4] == pytest.approx(min(max(sens.deltas(4)[u]["ppl"], 0) / Z3, E[u][3]))
        assert E[u][8] == pytest.approx(E[u][4] / 4 ** 4)      # from the 4-bit probe
        assert E[u][2] == pytest.approx(E[u][3] * 4)           # below the lowest probe
        assert scores[i] == pytest.approx(E[u][3])
    # a measured 4-bit loss above the 3-bit one is noise: clipped to the 3-bit error
    m2 = copy.deepcopy(m)
    u0 = names[0]
    m2.sensitivity.deltas(4)[u0] = {k: 10.0 + abs(v) for k, v in m2.sensitivity.delta[u0].items()}
    E2, _, _ = pipeline.unit_errors(m2, beta=0.5)
    assert E2[u0][4] == pytest.approx(E2[u0][3])


def test_unit_error_carries_a_probe_to_the_widths_not_probed(measured):
    """One probe width: the width above it gets the probe times the unit's own error ratio of
    the recorded quantizer errors (the noise model 4^-1 where a unit's error is 0 or none is
    recorded), then the monotone clip; 8 bits follows from 4 by the noise model."""
    _, m, _ = measured
    m = copy.deepcopy(m)
    sens = m.sensitivity
    names = list(m.units)
    sens.delta_by_width = {}
    rng = np.random.default_rng(1)
    sens.delta = {u: {k: float(rng.random()) for k in sens.objectives} for u in names}
    plain, _, _ = pipeline.unit_errors(m, beta=0.5)          # 4 from 3 by 4^-1 ...
    sens.unit_error = {}
    noise, _, _ = pipeline.unit_errors(m, beta=0.5)
    e3 = rng.uniform(1.0, 2.0, len(names))
    e4 = e3 * rng.uniform(0.02, 1.5, len(names))           # some "worse at 4 bits": clipped
    e3[1] = 0.0                                             # no error at 3 bits: the noise model
    sens.unit_error = {"3": dict(zip(names, e3)), "4": dict(zip(names, e4))}
    E, scores, _ = pipeline.unit_errors(m, beta=0.5)
    for i, u in enumerate(names):
        assert E[u][3] == pytest.approx(noise[u][3]) == pytest.approx(scores[i])
        assert noise[u][4] == pytest.approx(noise[u][3] / 4)
        want = noise[u][3] / 4 if i == 1 else min(E[u][3] * e4[i] / e3[i], E[u][3])
        assert E[u][4] == pytest.approx(want)
        assert E[u][8] == pytest.approx(E[u][4] / 4 ** 4)
    assert any(e4[i] / e3[i] > 1 for i in range(len(names)) if i != 1)   # the clip was tested
    # the measurement's own record (RTN probes: the mixture stage's errors) was in use before
    assert any(plain[u][4] != pytest.approx(noise[u][4]) for u in names)
    # a width missing for one unit: that width is not used (the noise model for everyone)
    del sens.unit_error["4"][names[0]]
    E2, _, _ = pipeline.unit_errors(m, beta=0.5)
    assert all(E2[u][4] == pytest.approx(noise[u][4]) for u in names)


def test_measurement_records_each_units_quantizer_error(measured):
    """RTN probes: unit_error is the mixture stage's per-group RTN errors summed over the unit's
    linears, at every probe width and every allocation width below 8; it shrinks with the width."""
    cfg, m, _ = measured
    sens, mix = m.sensitivity, m.mixture
    assert pipeline.error_widths(cfg) == [3, 4]
    assert sorted(sens.unit_error) == ["3", "4"]
    ew = list(mix.group_error_widths)
    for u, v in m.units.items():
        for b in (3, 4):
            want = sum(float(np.sum(np.asarray(mix.group_errors[f])[:, ew.index(b)]))
                       for f in v["linears"])
            assert sens.unit_error[str(b)][u] == pytest.approx(want, rel=1e-9)
        assert 0 < sens.unit_error["4"][u] < sens.unit_error["3"][u]
    assert Measurement.load(m_path(measured)).sensitivity.unit_error == sens.unit_error


def m_path(measured):
    return measured[2] / "measurement.json"


def test_non_task_aware_baselines(measured):
    _, m, _ = measured
    mix, sens = m.mixture, m.sensitivity
    ew = mix.group_error_widths
    H, _, _ = pipeline.unit_errors(m, scoring="higgs")
    W, _, _ = pipeline.unit_errors(m, scoring="hawq")
    for u, v in m.units.items():
        T = {b: sum(mix.linear_errors[f]["rel"][ew.index(b)] for f in v["linears"]) for b in (3, 4, 8)}
        assert H[u][3] == pytest.approx(max(sens.delta[u]["ppl"], 0.0))
        assert H[u][4] == pytest.approx(H[u][3] * T[4] / T[3])
        for b in (3, 4, 8):
            assert W[u][b] == pytest.approx(sum(mix.linear_errors[f]["gen"][ew.index(b)]
                                                for f in v["linears"]))
    for scoring in ("higgs", "hawq"):
        A = pipeline.allocate(m, 3.6, scoring=scoring, intra=False)
        assert A["summary"]["avg_bits"] <= 3.6 and A["scoring"] == scoring
    with pytest.raises(ValueError, match="scoring"):
        pipeline.allocate(m, 3.6, scoring="magic")
    old = copy.deepcopy(m)
    old.mixture.linear_errors = {}
    with pytest.raises(ValueError, match="per-linear errors"):
        pipeline.allocate(old, 3.6, scoring="higgs")


def test_allocation_errors(measured):
    _, m, _ = measured
    with pytest.raises(ValueError, match="minimum|below"):
        pipeline.allocate(m, 2.5)
    with pytest.raises(ValueError, match="beta"):
        pipeline.allocate(m, 3.5, beta=1.5)
    broken = copy.deepcopy(m)
    broken.sensitivity.complete = False
    with pytest.raises(ValueError, match="complete"):
        pipeline.allocate(broken, 3.5)


def test_beta_moves_bits_towards_the_chosen_objective(measured):
    _, m, _ = measured
    m = copy.deepcopy(m)
    u0, u1, u2, *rest = list(m.units)
    # synthetic profiles: perplexity says u0 matters, the tasks say u1 matters
    m.sensitivity.delta_by_width = {}      # one probe width: the 4^-b model above it
    m.sensitivity.unit_error = {}
    m.sensitivity.delta = {u0: {"ppl": 1.0, "math": 0.01, "arc": 0.01},
                           u1: {"ppl": 0.01, "math": 1.0, "arc": 1.0},
                           u2: {"ppl": 0.01, "math": 0.01, "arc": -0.5},
                           **{u: {"ppl": 0.01, "math": 0.01, "arc": 0.01} for u in rest}}
    math_total = 1.02 + 0.01 * len(rest)
    a_ppl = pipeline.allocate(m, 3.6, beta=1.0, intra=False)
    a_task = pipeline.allocate(m, 3.6, beta=0.0, intra=False)
    assert a_ppl["item_bits"][u0] > a_ppl["item_bits"][u1]
    # the tasks' unit (an MLP: wider, so dearer) gets the bits the ppl-only plan did not give it
    assert a_task["item_bits"][u1] > a_ppl["item_bits"][u1]
    assert a_task["item_bits"][u1] >= a_task["item_bits"][u0]
    assert a_task["scores"][u2] == pytest.approx(0.01 / math_total / 2 + 0.0)  # arc clipped at 0
    # an objective no probe hurt is left out, and said so
    m.sensitivity.delta = {u: {"ppl": d["ppl"], "math": d["math"], "arc": -1.0}
                           for u, d in m.sensitivity.delta.items()}
    assert pipeline.allocate(m, 3.6)["dropped_objectives"] == ["arc"]


# ---- the whole job --------------------------------------------------------------------------

def test_run_end_to_end_and_reload(tmp_path):
    model = tiny3()
    ref_model = copy.deepcopy(model)
    tok = ByteTok()
    cfg = tiny_cfg(bits=3.8)
    s = pipeline.run(cfg, tmp_path, progress=False, quiet=True, model=model, tokenizer=tok)
    for f in ("measurement.json", "plan.json", "report.md", "alpha_curve.png", "sensitivity.png",
              "bitmap.png", "model.safetensors", "config.json", "generation_config.json",
              "run.json"):
        assert (tmp_path / f).is_file(), f
    assert s["avg_bits"] <= 3.8
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["summary"]["avg_bits"] == pytest.approx(s["avg_bits"])
    rep = (tmp_path / "report.md").read_text()
    assert "alpha*" in rep and "Kendall" in rep
    assert "split-half" in rep and "bootstrap CI" in rep          # the noise bounds
    assert "average code bits" in rep and f"{s['code_avg_bits']:.4f}" in rep   # both bit counts
    # the whole file, every parameter: in run.json and the report
    run_json = json.loads((tmp_path / "run.json").read_text())
    assert run_json["size"]["file_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert run_json["size"]["params"] == sum(p.numel() for p in ref_model.parameters())
    # the measured defaults: an untied input embedding at 4 bits, the head at 8
    assert run_json["embedding"]["bits"] == 4 and run_json["embedding"]["head_bits"] == 8
    assert "Whole model file" in rep and f"{run_json['size']['bits_per_param']:.2f} bits per" in rep
    # how far it moved: KL / top-1 / NLL on general text and held-out GSM8K, the KL recomputed
    # here with both models in memory (the job kept only the reference's top-256 per position)
    from tasa import corpora, divergence

    d = run_json["drift"]
    assert set(d) == {"general", "gsm8k"} and run_json["kl"] == d["general"]["kl"] > 0
    assert run_json["task_nll"]["gsm8k"]["quantized"] == d["gsm8k"]["nll"]
    assert run_json["ppl_quantized"] == pytest.approx(math.exp(d["general"]["nll"]))
    seqs = divergence.text_windows(tok, corpora.load_wikitext2(None, "test"), cfg.eval_windows,
                                   cfg.eval_seqlen)
    full = divergence.compare(ref_model, {"q": model}, seqs, progress=False)
    assert d["general"]["kl"] <= full["q"]["kl"] * (1 + 1e-6)        # top-k: a lower bound
    # (a flat random 512-token model puts much mass outside its top 256: 60% of the KL here;
    # SmolLM2 at 3 bits keeps 94%, README "KL divergence to the reference")
    assert d["general"]["kl"] >= 0.4 * full["q"]["kl"]
    assert d["general"]["nll"] == pytest.approx(full["q"]["nll"], rel=1e-5)
    assert "Drift from the reference" in rep and f"{d['gsm8k']['kl']:.4f}" in rep
    assert "Mean KL divergence to the reference" in rep or "**Warning:** mean KL" in rep
    # reload into a fresh skeleton: identical outputs, no re-quantization
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        y = model(input_ids=x).logits
        y2 = load_quantized(tmp_path)(input_ids=x).logits
        y_ref = ref_model(input_ids=x).logits
    assert torch.equal(y, y2)
    assert not torch.allclose(y, y_ref)     # it really is quantized
    # re-using the measurement for another budget measures nothing
    out2 = tmp_path / "b44"
    s2 = pipeline.run(tiny_cfg(bits=4.4), out2, measurement_from=str(tmp_path), progress=False,
                      quiet=True, model=copy.deepcopy(ref_model), tokenizer=tok)
    assert "measure" not in s2["timings_s"] and s2["avg_bits"] > s["avg_bits"]
    # quantizing with the written plan (no measurement) reproduces the model exactly: the plan
    # records alpha*, so GPTQ calibrates on the same mix
    out3 = tmp_path / "given"
    s3 = pipeline.run(tiny_cfg(bits=2.0), out3, progress=False, quiet=True,
                      model=copy.deepcopy(ref_model), tokenizer=tok, plan=tmp_path / "plan.json")
    assert s3["plan_given"] and "measure" not in s3["timings_s"]
    assert not (out3 / "measurement.json").exists() and (out3 / "plan.json").is_file()
    assert s3["avg_bits"] == pytest.approx(s["avg_bits"])
    with torch.no_grad():
        assert torch.equal(load_quantized(out3)(input_ids=x).logits, y)
    # the CLI reads the same plan; a plan for another model's shapes is refused, module named
    other = tiny_cfg()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.\w+\.\w+_proj"):
        pipeline.run(other, tmp_path / "other", progress=False, quiet=True,
                     model=tiny3(hidden=64), tokenizer=tok, plan=tmp_path / "plan.json")


def test_infeasible_budget_fails_before_measuring(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("measured although the budget is infeasible")
    # the job looks the stage up in its own module, tasa.pipeline.job
    monkeypatch.setattr(importlib.import_module("tasa.pipeline.job"), "measure", boom)
    monkeypatch.setattr(pipeline, "measure", boom)
    with pytest.raises(ValueError, match=r"below the minimum 3\.2"):
        pipeline.run(tiny_cfg(bits=3.1), tmp_path, progress=False, quiet=True, model=tiny3(),
                     tokenizer=ByteTok())
    assert pipeline.check_budget(tiny3(), tiny_cfg(widths=(2, 4))) < 2.3


def test_cli_allocate(measured, tmp_path, capsys):
    _, _, d = measured
    rc = cli.main(["allocate", "--measurement", str(d), "--bits", "3.7", "--out", str(tmp_path)])
    assert rc == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["summary"]["avg_bits"] <= 3.7 and plan["format_version"] == tasa_ext.FORMAT_VERSION
    rc = cli.main(["allocate", "--measurement", str(d), "--bits", "2.0", "--out", str(tmp_path)])
    assert rc == 2 and "error" in capsys.readouterr().err
    rc = cli.main(["allocate", "--measurement", str(tmp_path / "nope"), "--bits", "3.5",
                   "--out", str(tmp_path)])
    assert rc == 2
    # the paper's count: code bits; the plan states both numbers
    capsys.readouterr()
    rc = cli.main(["allocate", "--measurement", str(d), "--code-bits", "3.5", "--out", str(tmp_path)])
    assert rc == 0 and "code bits" in capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["budget"] == "code" and plan["scoring"] == "tasa"
    assert plan["summary"]["code_avg_bits"] <= 3.5 < plan["summary"]["avg_bits"]
    rc = cli.main(["allocate", "--measurement", str(d), "--code-bits", "3.5", "--scoring", "hawq",
                   "--out", str(tmp_path)])
    assert rc == 0 and json.loads((tmp_path / "plan.json").read_text())["scoring"] == "hawq"
    with pytest.raises(SystemExit):        # one budget, not both
        cli.main(["allocate", "--measurement", str(d), "--bits", "3.5", "--code-bits", "3.5",
                  "--out", str(tmp_path)])


def test_config_validation():
    for bad in (dict(beta=2.0), dict(alpha=-0.1), dict(widths=(3, 5)), dict(granularity="x"),
                dict(objectives=("ppl", "mmlu")), dict(method="awq"), dict(bits=0),
                dict(budget="bytes"), dict(sens_widths=(4, 3)), dict(sens_widths=(3, 5)),
                dict(sens_widths=()), dict(sens_dtype="float16"), dict(sens_method="awq")):
        with pytest.raises(ValueError):
            tiny_cfg(**bad).validate()


def test_cli_quantize_bad_inputs(tmp_path, capsys):
    rc = cli.main(["quantize", "--model", "no-such-model", "--out", str(tmp_path / "o"),
                   "--no-progress", "--quiet"])
    assert rc == 2 and "unknown model" in capsys.readouterr().err
    rc = cli.main(["quantize", "--beta", "1.5", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "beta" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--widths", "3,x", "--out", str(tmp_path / "o")])


def test_disk_full_while_saving_keeps_the_previous_model(tmp_path, monkeypatch, capsys):
    """A save that fails (no space left) says so in one line and leaves the previous model,
    its plan and run.json as they were: it still loads, with the same outputs."""
    import transformers.modeling_utils as mu
    from tasa import cli
    from tasa.quant import uniform_plan, plan_to_dict

    model = tiny3()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(plan_to_dict(uniform_plan(model, 4, 32, "asym"))))
    out = tmp_path / "out"
    pipeline.run(tiny_cfg(method="rtn", eval_windows=0), out, progress=False, quiet=True,
                 model=copy.deepcopy(model), tokenizer=ByteTok(), plan=plan)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        before = load_quantized(out)(input_ids=x).logits
    docs = {f: (out / f).read_bytes() for f in ("config.json", "plan.json", "run.json")}

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mu, "safe_save_file", full)
    plan3 = tmp_path / "plan3.json"
    plan3.write_text(json.dumps(plan_to_dict(uniform_plan(model, 3, 32, "asym"))))
    with pytest.raises(ValueError, match=r"No space left on device\); nothing of the model"):
        pipeline.run(tiny_cfg(method="rtn", eval_windows=0), out, progress=False, quiet=True,
                     model=copy.deepcopy(model), tokenizer=ByteTok(), plan=plan3)
    monkeypatch.undo()
    assert {f: (out / f).read_bytes() for f in docs} == docs
    assert not (out / ".tasa-previous").exists()
    with torch.no_grad():
        assert torch.equal(load_quantized(out)(input_ids=x).logits, before)


def test_run_with_hadamard_rotates_every_decoder_linear_and_its_probes(tmp_path):
    """--hadamard (format version 2; the default for the GPTQ methods): the saved model's decoder
    linears are rotated and their outputs are the un-rotated dequantized weights' (it is the
    model it claims to be); the measurement records the setting, so a measurement without the
    rotation is not re-used for it; RTN does not rotate unless asked."""
    from tasa.layers import TasaLinear

    assert tiny_cfg().rotates() and tiny_cfg(method="gptq").rotates()
    assert not tiny_cfg(method="rtn").rotates() and not tiny_cfg(hadamard=False).rotates()
    with pytest.warns(UserWarning, match="measured worse with RTN"):
        tiny_cfg(method="rtn", hadamard=True).validate()
    model = tiny3()
    ref_model = copy.deepcopy(model)
    tok = ByteTok()
    plain = tmp_path / "plain"
    pipeline.run(tiny_cfg(bits=3.8, hadamard=False), plain, progress=False, quiet=True,
                 model=copy.deepcopy(ref_model), tokenizer=tok, report=False)
    s = pipeline.run(tiny_cfg(bits=3.8), tmp_path, progress=False, quiet=True,
                     model=model, tokenizer=tok, report=False)
    assert "measure" in s["timings_s"]
    m = json.loads((tmp_path / "measurement.json").read_text())
    assert m["config"]["hadamard"] is True
    # False is the value before the setting existed: not written, so older files still match
    assert "hadamard" not in json.loads((plain / "measurement.json").read_text())["config"]
    back = load_quantized(tmp_path)
    lin = {n: x for n, x in back.named_modules() if isinstance(x, TasaLinear) and ".layers." in n}
    assert lin and all(x.hadamard for x in lin.values())
    plain_lin = [x for n, x in load_quantized(plain).named_modules()
                 if isinstance(x, TasaLinear) and ".layers." in n]
    assert plain_lin and not any(x.hadamard for x in plain_lin)
    for n, mod in lin.items():
        x = torch.randn(3, mod.in_features)
        torch.testing.assert_close(mod(x), x @ mod.dequantize().T, atol=1e-4, rtol=1e-4)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back(input_ids=ids).logits)
    # a measurement without the rotation is refused for a rotated job (the probes differ), with
    # the switch that re-uses it
    with pytest.raises(ValueError, match="to reuse it give --no-hadamard"):
        pipeline.run(tiny_cfg(bits=3.8), tmp_path / "re", progress=False,
                     quiet=True, model=copy.deepcopy(ref_model), tokenizer=tok,
                     measurement_from=str(plain), report=False)


def test_probe_dtype_auto_follows_native_bf16(monkeypatch):
    """sens_dtype "auto" (the default): bf16 probes only where bf16 matmuls are native (emulated
    bf16 ran 7x slower than fp32 on an AVX2-only CPU); validate() records the resolved dtype,
    which the measurement fingerprint holds."""
    import tasa_ext

    info = dict(tasa_ext.build_info())
    for isa, want in (("avx2", "float32"), ("scalar", "float32"), ("avx512", "bfloat16"),
                      ("amx", "bfloat16")):
        monkeypatch.setattr(tasa_ext, "build_info", lambda isa=isa: {**info,
                                                                    "cpu_isa_detected": isa})
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        cfg = tiny_cfg()
        assert cfg.sens_dtype == "auto" and cfg.probe_dtype() == want
        assert cfg.measure_fingerprint()["sens_dtype"] == want
        cfg.validate()
        assert cfg.sens_dtype == want
        assert tiny_cfg(sens_dtype="float32").probe_dtype() == "float32"
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        tiny_cfg(sens_dtype="float16").validate()


def test_probe_widths_benchmark_drops_the_4bit_probes(measured, tmp_path):
    """benchmarks/probe_widths.py: the one-width copy keeps the 3-bit probes and the unit errors,
    drops every 4-bit record, and its 4-bit errors are the carried ones."""
    import importlib.util
    from pathlib import Path
    p = Path(__file__).resolve().parent.parent / "benchmarks" / "probe_widths.py"
    spec = importlib.util.spec_from_file_location("probe_widths", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = tiny_cfg(sens_widths=(3, 4))         # the two-width measurement it cuts
    src = tmp_path / "two" / "measurement.json"
    m = pipeline.measure(tiny3(), ByteTok(), cfg, src, progress=False, log=lambda s: None)
    assert m.sensitivity.widths == [3, 4]
    out = tmp_path / "one" / "measurement.json"
    with pytest.raises(SystemExit, match="probed at 3 and 4"):     # a one-width file refused
        mod.main(["--measurement", str(measured[2] / "measurement.json"), "--out", str(out)])
    mod.main(["--measurement", str(src), "--out", str(out)])
    one = Measurement.load(out)
    s1 = one.sensitivity
    assert s1.widths == [3] and one.config["sens_widths"] == [3] and set(s1.item_delta) == {"3"}
    assert s1.delta == m.sensitivity.delta and s1.unit_error == m.sensitivity.unit_error
    E1, _, _ = pipeline.unit_errors(one)
    for u in one.units:
        ue = s1.unit_error
        assert E1[u][4] == pytest.approx(min(E1[u][3] * ue["4"][u] / ue["3"][u], E1[u][3]))
    res = json.loads((out.parent / "probe_widths.json").read_text())
    assert -1 <= res["tau_measured_vs_carried_4bit"] <= 1 and res["units"] == len(one.units)
    A = pipeline.allocate(one, 3.8)
    assert A["summary"]["avg_bits"] <= 3.8
    # the settings a fingerprint leaves out at their first values come back (RTN probes here,
    # not today's default probe quantizer)
    assert "sens_method" not in m.config
    back = mod.config_from(m.config)
    assert back.sens_method == cfg.sens_method == "rtn" and back.sens_widths == (3, 4)
