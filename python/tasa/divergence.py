"""How far a quantized model drifts from its reference: KL divergence of the next-token
distribution at every position, top-1 agreement, and the task NLL, on the same token ids.

This is the field's yardstick (llama.cpp's ``llama-perplexity --kl-divergence``, exllamav3's
KL-vs-bpw charts): every token of held-out text is scored, so it is far less noisy than a few
dozen multiple-choice items. Two texts, both held out from every calibration and sensitivity
set of tasa:

* ``general``: WikiText-2 *test*, cut into windows of ``seqlen`` tokens;
* ``gsm8k``: GSM8K *test* items as ``Question: ...\\nAnswer: <solution>``: KL over every
  position of the item, the gold-solution NLL over the solution tokens (given the question).

* a path to a UTF-8 text file of the user's own (``tasa eval --kl --text FILE``), cut into
  windows like ``general``.

Per-sequence values are kept, so two models compared on the same sequences give paired
differences (:func:`summarize` / ``tasa.stats.mean_ci95`` turn them into intervals).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import corpora as tdata
from .stats import mean_ci95

__all__ = ["ScoredSeq", "kl_sequences", "compare", "summarize", "TEXTS", "reference_top",
           "drift", "text_windows", "KL_TOP_K", "bucketed_kl", "kl_nll_from_logits", "paired_kl"]

TEXTS = ("general", "gsm8k")

# reference log-probabilities kept per scored position for the KL scoring: 256 of 49152
# (SmolLM2) to 262144 (Gemma-3) tokens
KL_TOP_K = 256
# positions per slice of the [T, vocabulary] work arrays: the top-k / rest-mass / KL of a
# 2048-token SmolLM2 window in one piece held ~2 GB of temporaries (the job's peak RSS went
# 2.3 -> 4.3 GB); slices of 256 positions hold ~100 MB
ROWS = 256


def _log_rest(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``idx`` per row (float64; ``-inf`` when ``idx`` holds
    every token), summed over the other entries: no ``1 - sum`` cancellation.

    The sum runs in fp32 over exp(logp) with ``idx``'s entries zeroed (positive terms only, so
    relative error ~1e-6, far below a probe's effect); rows whose rest underflows fp32 (< 1e-30)
    are redone by a float64 logsumexp. The float64 logsumexp over every row took 29% of a
    SmolLM2 sensitivity probe (2.6 of 9.0 s, AMD EPYC, torch profiler): 4 passes over
    [rows, vocab] float64 temporaries for each batch."""
    if logp.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=logp.device)
    e = logp.float().exp().scatter_(1, idx, 0.0)
    s = e.sum(1)
    out = s.double().log()
    tiny = s < 1e-30
    if bool(tiny.any()):
        rest = logp[tiny].scatter(1, idx[tiny], float("-inf"))
        out[tiny] = torch.logsumexp(rest.double(), 1)
    return out


def bucketed_kl(ref_top: torch.Tensor, ref_idx: torch.Tensor, logq: torch.Tensor,
                ref_log_rest: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``KL(p || q)`` per row over the reference's top tokens ``ref_idx [P, K]`` (log-probs
    ``ref_top [P, K]``) plus one bucket for every other token (its log-mass ``ref_log_rest
    [P]``, kept when the reference was complete; None: ``1 - sum`` of the top); ``logq [P, V]``
    the probed log-probabilities. Returns float64 ``[P]`` (clamped at 0 against round-off)."""
    return _kl_terms(ref_top, logq.gather(1, ref_idx), ref_log_rest, _log_rest(logq, ref_idx))


def _kl_terms(ref_top, lq, ref_log_rest, lqr) -> torch.Tensor:
    """bucketed_kl from the probed log-probs of the reference's top tokens ``lq [P, K]`` and the
    probed log-mass of the rest ``lqr [P]``."""
    lq = lq.double()
    lp = ref_top.double()
    head = (lp.exp() * (lp - lq)).sum(1)
    if ref_log_rest is None:
        ref_log_rest = (1 - lp.exp().sum(1)).clamp_min(0).log()
    lpr = ref_log_rest.double()
    finite = torch.isfinite(lpr)
    tail = torch.where(finite, lpr.clamp_min(-1e300).exp() * (lpr - lqr.clamp_min(-1e300)),
                       torch.zeros_like(lpr))
    return (head + tail).clamp_min(0)


def kl_nll_from_logits(logits: torch.Tensor, ref_top: torch.Tensor, ref_idx: torch.Tensor,
                       ref_log_rest: Optional[torch.Tensor], gold: torch.Tensor):
    """``(bucketed_kl(ref_top, ref_idx, log_softmax(logits), ref_log_rest), gold NLL)``, both
    float64 ``[P]``, from one softmax pass: the probes' scoring (tasa.sensitivity). log of the
    softmax's probabilities instead of log_softmax (absolute error ~1e-7 per log-prob); rows
    where a needed probability underflows fp32 (or the rest mass is < 1e-30) are redone
    exactly from log_softmax. log_softmax + the float64 logsumexp of the rest were 34% of a
    SmolLM2 probe from block 0 (3.1 of 9.0 s, AMD EPYC, torch profiler); with _log_rest and the
    probes' bf16 weight copies it took 6.9 s, and 8 probes + the baseline went 48 -> 38 s with
    this function."""
    q = torch.softmax(logits.float(), -1)
    q_top = q.gather(1, ref_idx)
    q_gold = q.gather(1, gold[:, None])[:, 0]
    rest = q.scatter_(1, ref_idx, 0.0).sum(1)
    del q
    lq, lqr, nll = q_top.double().log(), rest.double().log(), -q_gold.double().log()
    bad = ~((q_top > 0).all(1) & (q_gold > 0) & (rest >= 1e-30))
    if bool(bad.any()):
        lp = F.log_softmax(logits[bad].float(), -1)
        lq[bad] = lp.gather(1, ref_idx[bad]).double()
        lqr[bad] = _log_rest(lp, ref_idx[bad])
        nll[bad] = -lp.gather(1, gold[bad][:, None])[:, 0].double()
    return _kl_terms(ref_top, lq, ref_log_rest, lqr), nll


def top_and_rest(lp: torch.Tensor, k: int = KL_TOP_K):
    """What the KL against a reference keeps of its log-probs ``lp [P, V]``: the top-``k``
    values and ids (int64) per row and the log-mass of all other tokens, computed ``ROWS`` rows
    at a time (the rest mass needs [rows, V] float64 temporaries)."""
    tops, idxs, rests = [], [], []
    for i in range(0, lp.shape[0], ROWS):
        top, idx = lp[i:i + ROWS].topk(min(k, lp.shape[-1]), -1)
        tops.append(top)
        idxs.append(idx)
        rests.append(_log_rest(lp[i:i + ROWS], idx))
    return torch.cat(tops), torch.cat(idxs), torch.cat(rests)


class ScoredSeq:
    """Token ids of one scored sequence; NLL is scored on targets ``ids[t]`` for
    ``t >= nll_from`` (KL on every position)."""

    __slots__ = ("ids", "nll_from")

    def __init__(self, ids: torch.Tensor, nll_from: int):
        self.ids, self.nll_from = ids, int(nll_from)


def _file(data, key: str):
    if data is None:
        return tdata.shipped_file(key)
    found = tdata.folder_files(data, key)
    if not found:
        raise FileNotFoundError(f"tasa: no {key} file under {data} (layout of shared/data)")
    return found[0]


def _windows(ids: torch.Tensor, max_tokens: int, seqlen: int, what: str) -> list:
    n = min(len(ids), max_tokens) // seqlen
    if n < 2:
        raise ValueError(f"tasa: {what} has {len(ids)} tokens: fewer than 2 windows of {seqlen} "
                         f"(give more text or a smaller --seqlen)")
    return [ScoredSeq(ids[i * seqlen:(i + 1) * seqlen], 1) for i in range(n)]


def kl_sequences(tokenizer, text: str = "general", data=None, max_tokens: int = 16384,
                 seqlen: int = 512) -> list:
    """The scored sequences of ``text`` (module docstring: ``general``, ``gsm8k`` or the path of
    a UTF-8 text file), up to ``max_tokens`` tokens."""
    if seqlen < 2:
        raise ValueError(f"tasa: seqlen must be >= 2, got {seqlen}")
    if text == "general":
        ids = tokenizer(tdata.read_text(_file(data, "wikitext_test")),
                        return_tensors="pt").input_ids[0]
        return _windows(ids, max_tokens, seqlen, "the general text")
    if text not in TEXTS:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tasa: --text {text!r} is neither one of {TEXTS} nor a file")
        try:
            body = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"tasa: {path} is not UTF-8 text ({e.reason} at byte {e.start})") \
                from None
        ids = tokenizer(body, return_tensors="pt").input_ids[0]
        return _windows(ids, max_tokens, seqlen, str(path))
    if text == "gsm8k":
        out, total = [], 0
        for line in tdata.read_text(_file(data, "gsm8k_test")).splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            prompt = tdata.qa_prompt(item["question"])
            # (return_tensors="pt": every tokenizer tasa takes gives that form)
            p_ids = tokenizer(prompt, return_tensors="pt").input_ids[0].tolist()
            ids = tokenizer(f"{prompt} {item['answer']}",
                            return_tensors="pt").input_ids[0].tolist()[:seqlen]
            if len(ids) <= len(p_ids) or ids[:len(p_ids)] != p_ids:
                continue       # the prompt does not tokenize as a prefix: skip, never misalign
            out.append(ScoredSeq(torch.tensor(ids), len(p_ids)))
            total += len(ids)
            if total >= max_tokens:
                break
        if len(out) < 2:
            raise ValueError("tasa: fewer than 2 GSM8K items to score")
        return out
    raise AssertionError(text)      # unreachable: every other text is a file path


@torch.no_grad()
def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    # (no KV cache for a one-pass score; adapters such as gguf_export.LlamaCppLogits take ids only)
    kw = {"use_cache": False} if isinstance(model, torch.nn.Module) else {}
    logits = model(ids[None], **kw).logits[0].float()
    # in place, a slice at a time: log_softmax (and logsumexp's exp) would allocate second
    # [T, vocabulary] arrays (400 MB each for a 2048-token SmolLM2 window)
    for i in range(0, logits.shape[0], ROWS):
        c = logits[i:i + ROWS]
        c.sub_(torch.logsumexp(c, -1, keepdim=True))
    return logits


class _Scores:
    """Per-sequence and pooled KL / top-1 / gold NLL of one model (:func:`compare`,
    :func:`drift`)."""

    def __init__(self):
        self.seq = {"kl": [], "top1": [], "nll": []}
        self.kl = self.top1 = self.nll = 0.0
        self.pos = self.nll_n = 0

    def add(self, kl: torch.Tensor, top1: torch.Tensor, nll: torch.Tensor) -> None:
        for k, v in (("kl", kl), ("top1", top1), ("nll", nll)):
            self.seq[k].append(float(v.mean()))
        self.kl += float(kl.sum())
        self.top1 += float(top1.sum())
        self.nll += float(nll.sum())
        self.pos += kl.numel()
        self.nll_n += nll.numel()

    def result(self) -> dict:
        return {"kl": self.kl / self.pos, "top1": self.top1 / self.pos,
                "nll": self.nll / self.nll_n, "tokens": self.pos, "kl_seq": self.seq["kl"],
                "top1_seq": self.seq["top1"], "nll_seq": self.seq["nll"]}


@torch.no_grad()
def compare(reference, candidates: Mapping[str, torch.nn.Module], sequences: Sequence,
            progress: bool = True, desc: str = "KL") -> dict:
    """Scores every candidate against ``reference`` on ``sequences`` (reference logits computed
    once per sequence). Returns ``{name: {"kl", "top1", "nll", "kl_seq", "top1_seq", "nll_seq",
    "tokens"}}`` (``"reference"`` gets its own NLL too): ``kl`` / ``top1`` are means over every
    scored position, ``nll`` the mean gold NLL in nats per scored target token; the ``*_seq``
    lists hold each sequence's means (for paired differences)."""
    names = ["reference", *candidates]
    acc = {n: _Scores() for n in names}
    for s in tqdm(sequences, desc=desc, disable=not progress):
        ids = s.ids
        lr = _log_probs(reference, ids)
        pr = lr.exp()
        top_r = lr.argmax(-1)
        tgt = ids[s.nll_from:]
        for n in names:
            lq = lr if n == "reference" else _log_probs(candidates[n], ids)
            if not torch.isfinite(lq).all():
                raise ValueError(f"tasa: {n} gives non-finite log-probabilities")
            kl = (pr * (lr - lq)).sum(-1).clamp_min(0)       # [T]; round-off can dip below 0
            top1 = (lq.argmax(-1) == top_r).float()
            acc[n].add(kl, top1, -lq[s.nll_from - 1:-1].gather(1, tgt[:, None])[:, 0])
    return {n: a.result() for n, a in acc.items()}


def text_windows(tokenizer, text: str, windows: int, seqlen: int) -> list:
    """The first ``windows`` windows of ``seqlen`` tokens of ``text`` (as :func:`tasa.ppl.
    perplexity` cuts them: same scored targets), at least one."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(windows, len(ids) // seqlen)
    if n < 1:
        raise ValueError(f"tasa: the text has {len(ids)} tokens, fewer than seqlen={seqlen}")
    return [ScoredSeq(ids[i * seqlen:(i + 1) * seqlen], 1) for i in range(n)]


@torch.no_grad()
def reference_top(model, sequences: Sequence, k: int = KL_TOP_K, progress: bool = True,
                  desc: str = "reference") -> list:
    """What :func:`drift` needs of the reference, kept while the model is quantized in place:
    per sequence its top-``k`` next-token log-probabilities at every position (fp32 ``[T, k]``,
    ids int32), the log-mass of all other tokens ``[T]`` and the gold NLL of each scored
    target. ~3 KB per position at k = 256 (a full SmolLM2 distribution is 196 KB)."""
    out = []
    for s in tqdm(sequences, desc=desc, disable=not progress):
        lr = _log_probs(model, s.ids)
        top, idx, rest = top_and_rest(lr, k)
        nll = -lr[s.nll_from - 1:-1].gather(1, s.ids[s.nll_from:, None])[:, 0]
        out.append({"top": top, "idx": idx.int(), "rest": rest, "nll": nll})
        del lr
    return out


@torch.no_grad()
def drift(model, sequences: Sequence, refs: Sequence, progress: bool = True,
          desc: str = "KL") -> dict:
    """:func:`compare`'s scores (``{"reference": ..., "quantized": ...}``, for
    :func:`summarize`) of ``model`` against a reference known only by :func:`reference_top` on
    the same ``sequences``. The KL is over the reference's top-k tokens plus one bucket for the
    rest: a lower bound of the full KL (merging outcomes never raises a divergence), exact when
    k covers the vocabulary (SmolLM2-135M, RTN 3 bits, 3 windows of WikiText-2 + 1.5k GSM8K
    tokens: k = 64 / 256 / 1024 gave 89% / 94% / 98% of the full 1.40 nats); top-1 agreement
    and the NLLs are exact."""
    if len(refs) != len(sequences):
        raise ValueError(f"tasa: {len(refs)} reference records for {len(sequences)} sequences")
    acc = {"reference": _Scores(), "quantized": _Scores()}
    for s, r in tqdm(list(zip(sequences, refs)), desc=desc, disable=not progress):
        lq = _log_probs(model, s.ids)
        if not torch.isfinite(lq).all():
            raise ValueError("tasa: the quantized model gives non-finite log-probabilities")
        idx = r["idx"].long()
        kl = torch.cat([bucketed_kl(r["top"][i:i + ROWS], idx[i:i + ROWS], lq[i:i + ROWS],
                                    r["rest"][i:i + ROWS]) for i in range(0, len(idx), ROWS)])
        top1 = (lq.argmax(-1) == idx[:, 0]).double()
        acc["reference"].add(torch.zeros_like(kl), torch.ones_like(top1), r["nll"])
        nll = -lq[s.nll_from - 1:-1].gather(1, s.ids[s.nll_from:, None])[:, 0]
        acc["quantized"].add(kl, top1, nll)
    return {n: a.result() for n, a in acc.items()}


def summarize(scores: Mapping[str, dict], reference: str = "reference") -> dict:
    """Per model of :func:`compare`'s result: ``kl`` with its 95% interval over sequences
    (``kl_ci``), ``top1`` (with ``top1_ci``), the mean gold NLL and its perplexity, and the NLL
    increase over the reference as a paired difference (``dnll``, ``dnll_ci``)."""
    ref = scores[reference]
    out = {}
    for name, r in scores.items():
        row = {"tokens": r["tokens"], "kl": r["kl"], "top1": r["top1"], "nll": r["nll"],
               "ppl": math.exp(r["nll"]) if r["nll"] < 700 else float("inf")}
        row["kl_ci"] = mean_ci95(r["kl_seq"])[1]
        row["top1_ci"] = mean_ci95(r["top1_seq"])[1]
        row["dnll"], row["dnll_ci"] = mean_ci95(
            [a - b for a, b in zip(r["nll_seq"], ref["nll_seq"])])
        out[name] = row
    return out


def paired_kl(scores: Mapping[str, dict], a: str, b: str) -> dict:
    """KL and top-1 agreement of model ``b`` minus model ``a`` (:func:`compare`'s result, same
    sequences) as paired differences over sequences: ``dkl``, ``dkl_ci``, ``dtop1``,
    ``dtop1_ci`` (95% t-half-widths), ``sequences``. Pairing removes the spread between texts
    that both models share, which dominates each model's own interval."""
    ka, kb = scores[a]["kl_seq"], scores[b]["kl_seq"]
    if len(ka) != len(kb):
        raise ValueError(f"tasa: {a} and {b} were scored on different sequences")
    dkl, dkl_ci = mean_ci95([y - x for x, y in zip(ka, kb)])
    dt, dt_ci = mean_ci95([y - x for x, y in zip(scores[a]["top1_seq"], scores[b]["top1_seq"])])
    return {"dkl": dkl, "dkl_ci": dkl_ci, "dtop1": dt, "dtop1_ci": dt_ci, "sequences": len(ka)}


def format_summary(summary: Mapping[str, dict]) -> str:
    """The table ``tasa eval --kl`` prints."""
    lines = [f"{'model':<22} {'KL (nats/token)':>22} {'top-1 agree':>17} {'gold NLL':>9} "
             f"{'PPL':>9} {'NLL - ref':>20}"]
    for name, r in summary.items():
        lines.append(f"{name:<22} {r['kl']:>12.5f} +- {r['kl_ci']:<7.5f} "
                     f"{r['top1']:>9.4f} +- {r['top1_ci']:<5.4f}{r['nll']:>9.4f} {r['ppl']:>9.3f} "
                     f"{r['dnll']:>+10.5f} +- {r['dnll_ci']:<7.5f}")
    return "\n".join(lines)
