"""benchmarks/quality_per_byte.py's scoring checkpoints: a scoring loop killed part-way resumes
after the last saved item and ends with exactly the results of an uninterrupted run; a
checkpoint written for other rows or another item count is ignored."""
import importlib.util
import math
import re

import pytest
import torch

from helpers import REPO


@pytest.fixture
def qpb(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))   # as when run as a script
    spec = importlib.util.spec_from_file_location("quality_per_byte",
                                                  REPO / "benchmarks" / "quality_per_byte.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Seq:
    def __init__(self, ids, nll_from):
        self.ids, self.nll_from = ids, nll_from


class FakeScorer:
    """Log-probabilities that depend on the row's seed and the sequence; raises after
    ``die_after`` calls (a killed run)."""

    def __init__(self, seed, die_after=None):
        self.seed, self.die_after, self.calls = seed, die_after, 0

    def _lp(self, key, n):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            raise KeyboardInterrupt("killed")
        g = torch.Generator().manual_seed(1000 * self.seed + key)
        return torch.log_softmax(torch.randn(n, 11, generator=g), -1)

    def logprobs(self, ids):
        return self._lp(int(ids.sum()), len(ids))

    def mc(self, ctx, conts):
        lls = [float(self._lp(len(c) + 7 * i, 1)[0, 0]) for i, c in enumerate(conts)]
        return lls, self._lp(sum(ctx), len(ctx))


def _seqs(n=9):
    g = torch.Generator().manual_seed(3)
    return [Seq(torch.randint(0, 11, (5 + i,), generator=g), 2) for i in range(n)]


def _mc(n=7):
    return [([i + 1, i + 2, 3], [[1], [2, 3], [4]]) for i in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        for k, v in a[n].items():
            if isinstance(v, list):
                assert v == b[n][k], (n, k)
            else:
                assert math.isclose(v, b[n][k], rel_tol=1e-12, abs_tol=1e-15), (n, k)


@pytest.mark.parametrize("kind", ["text", "mc"])
def test_killed_scoring_resumes_to_the_uninterrupted_result(qpb, tmp_path, kind):
    items, fn = (_seqs(), qpb.score_text) if kind == "text" else (_mc(), qpb.score_mc)
    rows = ["reference", "a", "b"]
    whole = fn({n: FakeScorer(i) for i, n in enumerate(rows)}, items, "t")
    ck = qpb.Checkpoint(tmp_path / "partial.json", rows, len(items), every_s=0.0)
    per = 1 if kind == "text" else 4                 # scorer calls per item (mc: 3 choices + KL)
    dying = {n: FakeScorer(i) for i, n in enumerate(rows)}
    dying["b"].die_after = 4 * per                   # killed during item 5 (row b)
    with pytest.raises(KeyboardInterrupt):
        fn(dying, items, "t", ck)
    assert ck.resume()[0] == 4                       # items 1-4 saved
    fresh = {n: FakeScorer(i) for i, n in enumerate(rows)}
    resumed = fn(fresh, items, "t", qpb.Checkpoint(tmp_path / "partial.json", rows, len(items)))
    assert fresh["a"].calls == (len(items) - 4) * per    # items 1-4 not scored again
    _same(whole, resumed)


def test_checkpoint_of_other_rows_or_items_is_ignored(qpb, tmp_path):
    p = tmp_path / "partial.json"
    qpb.Checkpoint(p, ["reference", "a"], 5).save(3, {"x": 1}, force=True)
    assert qpb.Checkpoint(p, ["reference", "a"], 5).resume() == (3, {"x": 1})
    assert qpb.Checkpoint(p, ["reference", "b"], 5).resume() == (0, None)
    assert qpb.Checkpoint(p, ["reference", "a"], 6).resume() == (0, None)
    qpb.Checkpoint(p, ["reference", "a"], 5).clear()
    assert not p.exists()


def test_target_section_verdicts(qpb):
    """The targets table picks, at each competitor's size, the tasa row of at most that size
    closest to the reference (fits that may re-use the reference's grid left out), and words
    the paired difference by its interval: below, on (within noise), above, or no tasa row."""
    g = torch.Generator().manual_seed(0)

    def seqs(level, noise=0.01):
        return (level + noise * torch.randn(40, generator=g)).tolist()

    rows = {"reference": {"bpp": 32.0}, "GPTQ W3 g128": {"bpp": 4.0}, "TASA c3.0": {"bpp": 4.1},
            "tasa W3 +had": {"bpp": 4.0}, "GPTQ W4 g128": {"bpp": 5.0}, "TASA c3.5": {"bpp": 4.6},
            "llama.cpp Q4_K_M": {"bpp": 5.5}, "TASA fit @Q4_K_M": {"bpp": 5.5},
            "llama.cpp Q3_K_S": {"bpp": 3.5}}
    level = {"reference": 0.0, "GPTQ W3 g128": 0.6, "tasa W3 +had": 0.4, "TASA c3.0": 0.3,
             "GPTQ W4 g128": 0.2, "TASA c3.5": 0.2, "llama.cpp Q4_K_M": 0.15,
             "TASA fit @Q4_K_M": 0.01, "llama.cpp Q3_K_S": 0.9}
    scores = {t: {n: {"kl_seq": seqs(v), "nll_seq": seqs(1 + v)} for n, v in level.items()}
              for t in ("general", "gsm8k")}
    text = "\n".join(qpb.target_section(rows, scores))
    line = {ln.split(" |")[0][2:]: ln for ln in text.splitlines() if ln.startswith("| ")}
    # W3 at 4.0 bits: the same-size rotated row, not TASA c3.0 (4.1 bits, larger)
    assert "tasa W3 +had (4.000)" in line["GPTQ W3 g128"] and "below" in line["GPTQ W3 g128"]
    # W4 at 5.0: TASA c3.5 equals it (same level, independent noise): within noise
    assert "TASA c3.5 (4.600)" in line["GPTQ W4 g128"] and "on (within noise)" in line["GPTQ W4 g128"]
    # Q4_K_M: the fit (0.01) is left out; TASA c3.5 (0.2) is above the mix (0.15)
    assert "TASA fit" not in line["llama.cpp Q4_K_M"] and "above" in line["llama.cpp Q4_K_M"]
    assert line["llama.cpp Q3_K_S"].count("no tasa row this small") == 3
    assert re.search(r"TASA fit @Q4_K_M: -0\.1[34]\d* ± 0\.0\d+ \(below\)", text), text
