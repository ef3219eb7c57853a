"""The drift check of the job (divergence.reference_top / drift): the reference kept as top-k
log-probabilities while the model is quantized in place, then scored against it."""
import copy
import math

import pytest
import torch

import tasa
from tasa import corpora, divergence

from helpers import byte_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def pair():
    ref = tiny_llama(seed=3).eval()
    q = tasa.quantize(copy.deepcopy(ref), None, bits=3, method="rtn", group_size=32,
                      progress=False).eval()
    tok = byte_tokenizer()
    seqs = divergence.text_windows(tok, corpora.load_wikitext2(None, "test"), 3, 96)
    seqs += divergence.kl_sequences(tok, "gsm8k", max_tokens=600, seqlen=200)[:3]
    return ref, q, seqs


def test_drift_with_the_whole_vocabulary_equals_compare(pair):
    """k = vocabulary: the bucket is empty, so KL, top-1 and both NLLs equal compare()'s
    (which holds both models at once) sequence by sequence."""
    ref, q, seqs = pair
    V = ref.config.vocab_size
    refs = divergence.reference_top(ref, seqs, k=V, progress=False)
    got = divergence.drift(q, seqs, refs, progress=False)
    want = divergence.compare(ref, {"quantized": q}, seqs, progress=False)
    for name in ("reference", "quantized"):
        for key in ("kl_seq", "top1_seq", "nll_seq"):
            assert got[name][key] == pytest.approx(want[name][key], rel=1e-5, abs=1e-7), (name, key)
        assert got[name]["tokens"] == want[name]["tokens"]
    assert got["quantized"]["kl"] > 1e-4 and got["quantized"]["top1"] < 1     # it did move


@pytest.mark.parametrize("k", [1, 8, 64])
def test_top_k_kl_is_a_lower_bound_that_tightens(pair, k):
    """Fewer kept tokens merge more outcomes into the bucket: the KL can only drop (data
    processing), and more tokens bring it closer; top-1 and the NLLs do not depend on k."""
    ref, q, seqs = pair
    full = divergence.compare(ref, {"quantized": q}, seqs, progress=False)["quantized"]
    small = divergence.drift(q, seqs, divergence.reference_top(ref, seqs, k=k, progress=False),
                             progress=False)["quantized"]
    bigger = divergence.drift(q, seqs, divergence.reference_top(ref, seqs, k=4 * k,
                                                                progress=False),
                              progress=False)["quantized"]
    assert 0 <= small["kl"] <= bigger["kl"] + 1e-9 <= full["kl"] + 2e-9
    assert small["top1"] == pytest.approx(full["top1"])
    assert small["nll"] == pytest.approx(full["nll"], rel=1e-6)


def test_summary_and_bad_inputs(pair):
    ref, q, seqs = pair
    refs = divergence.reference_top(ref, seqs, progress=False)
    s = divergence.summarize(divergence.drift(q, seqs, refs, progress=False))
    assert s["reference"]["kl"] == 0 and s["reference"]["dnll"] == 0
    assert s["quantized"]["dnll"] > 0 and math.isfinite(s["quantized"]["kl_ci"])
    with pytest.raises(ValueError, match="2 reference records for"):
        divergence.drift(q, seqs, refs[:2], progress=False)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        divergence.text_windows(byte_tokenizer(), "too short", 2, 96)
