"""Perplexity, GPTQ protocol: tokenize the whole text once, cut it into ``n = len // seqlen``
non-overlapping windows of ``seqlen`` tokens (or windows every ``stride`` tokens, scoring only
the last ``stride`` tokens of each, when ``stride < seqlen``), and report
``exp(mean token NLL)`` over the scored tokens. For WikiText-2 the text is the test rows joined
with ``"\\n\\n"`` (:func:`tasa.corpora.load_wikitext2`)."""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import corpora

__all__ = ["perplexity", "wikitext2_perplexity"]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seqlen: int = 2048, stride: Optional[int] = None,
               max_windows: Optional[int] = None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``text``. Returns ``{"ppl", "nll", "tokens", "windows",
    "seqlen", "stride", "seconds"}`` (``tokens`` = scored tokens). ``max_windows`` caps the
    number of windows (the first ones) for quick runs."""
    t0 = time.perf_counter()
    stride = stride or seqlen
    if not 0 < stride <= seqlen:
        raise ValueError(f"tasa: need 0 < stride <= seqlen, got stride={stride}, seqlen={seqlen}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < seqlen:
        raise ValueError(f"tasa: text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    starts = list(range(0, ids.numel() - seqlen + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    dev = next(model.parameters()).device
    it = starts
    if progress:
        it = tqdm(starts, desc="ppl", unit="win")
    nll, count = 0.0, 0
    for i, s in enumerate(it):
        x = ids[s:s + seqlen][None].to(dev)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        target = x[0, 1:]
        # first window: all seqlen-1 targets; later strided windows: the last `stride` tokens
        first = 0 if (i == 0 or stride == seqlen) else seqlen - 1 - stride
        loss = F.cross_entropy(logits[first:], target[first:], reduction="sum")
        nll += float(loss)
        count += target.numel() - first
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": len(starts), "seqlen": seqlen, "stride": stride,
            "seconds": time.perf_counter() - t0}


def wikitext2_perplexity(model, tokenizer, source=None, seqlen: int = 2048,
                         max_windows: Optional[int] = None, progress: bool = True) -> dict:
    """WikiText-2 *test* perplexity. ``source=None`` uses the slice shipped with tasa (quick
    check only); pass the full test file / data folder / HF name for the reportable number."""
    return perplexity(model, tokenizer, corpora.load_wikitext2(source, "test"), seqlen=seqlen,
                      max_windows=max_windows, progress=progress)
