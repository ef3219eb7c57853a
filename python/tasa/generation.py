"""Greedy generation for tasa models, with a lean decode loop.

``transformers.generate`` spends a large part of a small model's decode step outside the model
(logits processors, stopping criteria, ``isin`` over the whole sequence, growing attention
masks): measured on SmolLM2-135M here, ~3.5 ms of a 14 ms step. :func:`generate` runs the
model directly instead: one prefill call, then one call per token with the key/value cache
(the same ``DynamicCache`` transformers uses, so the attention sums the same numbers in the
same order), only the last position's logits (``logits_to_keep=1``), argmax, and a token
callback for streaming. Greedy tokens equal ``model.generate(do_sample=False)``'s
(tests/test_generation.py, on a tiny model and on SmolLM2-135M).

The other lever is the output projection: quantizing it (``tasa quantize --lm-head-bits 8``)
removes most of the bytes a small model reads per token.

``fast=False`` (or a model the loop cannot drive: no KV cache support) falls back to
``model.generate`` with a streamer, saying why.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, List, Optional, Union

import torch
from torch import nn
from transformers import DynamicCache

__all__ = ["GenerationResult", "generate", "FastPathUnavailable"]


class FastPathUnavailable(RuntimeError):
    """The lean loop cannot drive this model (the eager fallback is used)."""


@dataclasses.dataclass
class GenerationResult:
    tokens: List[int]                # the new tokens
    text: str                        # their decoded text
    n_prompt: int
    prefill_s: float                 # the prompt's forward pass (first new token included)
    decode_s: float                  # every later token
    path: str                        # "fast" | "eager"

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.n_prompt / self.prefill_s if self.prefill_s > 0 else float("nan")


def _eos_ids(model, tokenizer) -> set:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        v = getattr(src, "eos_token_id", None)
        if v is None:
            continue
        ids.update(v if isinstance(v, (list, tuple, set)) else [v])
    return {int(i) for i in ids}


def _fast(model, input_ids, max_new_tokens, min_new_tokens, eos, on_token):
    if not getattr(model, "_supports_cache_class", True) or not hasattr(model, "forward"):
        raise FastPathUnavailable(f"{type(model).__name__} does not take a KV cache object")
    cache = DynamicCache(config=model.config)
    out_tokens: List[int] = []
    t0 = time.perf_counter()
    try:
        out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    except TypeError as e:           # a model class without logits_to_keep / cache support
        raise FastPathUnavailable(str(e)) from None
    nxt = out.logits[:, -1].argmax(-1)
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    while True:
        tok = int(nxt)
        out_tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out_tokens) >= max_new_tokens or (tok in eos and len(out_tokens) >= min_new_tokens):
            break
        out = model(input_ids=nxt[:, None], cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1)
    return out_tokens, prefill, time.perf_counter() - t1


class _Streamer:
    """transformers streamer protocol -> a per-token callback, with timings."""

    def __init__(self, on_token):
        self.on_token = on_token
        self.first = True
        self.t_first = None
        self.tokens: List[int] = []

    def put(self, value):
        if self.first:                      # the prompt
            self.first = False
            return
        self.t_first = self.t_first or time.perf_counter()
        for t in value.reshape(-1).tolist():
            self.tokens.append(int(t))
            if self.on_token is not None:
                self.on_token(int(t))

    def end(self):
        pass


def _eager(model, input_ids, max_new_tokens, min_new_tokens, on_token):
    s = _Streamer(on_token)
    t0 = time.perf_counter()
    model.generate(input_ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                   do_sample=False, streamer=s, attention_mask=torch.ones_like(input_ids))
    t_end = time.perf_counter()
    t_first = s.t_first or t_end
    return s.tokens, t_first - t0, t_end - t_first


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompt: Union[str, torch.Tensor],
             max_new_tokens: int = 128, *, fast: bool = True, min_new_tokens: int = 0,
             on_token: Optional[Callable[[int], None]] = None) -> GenerationResult:
    """Greedy continuation of ``prompt`` (text, or token ids ``[1, T]``), batch 1.

    ``on_token(id)`` is called for every new token as it is produced (streaming). Stops at an
    end-of-sequence token (after ``min_new_tokens``) or after ``max_new_tokens``."""
    if max_new_tokens < 1 or min_new_tokens < 0 or min_new_tokens > max_new_tokens:
        raise ValueError(f"tasa: need 1 <= max_new_tokens and 0 <= min_new_tokens <= "
                         f"max_new_tokens, got {max_new_tokens}, {min_new_tokens}")
    if isinstance(prompt, str):
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        input_ids = prompt if prompt.dim() == 2 else prompt[None]
    if input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"tasa: generate takes one non-empty prompt, got ids of shape "
                         f"{tuple(input_ids.shape)}")
    input_ids = input_ids.to(next(model.parameters()).device)
    model.eval()
    path = "eager"
    if fast:
        try:
            tokens, pre, dec = _fast(model, input_ids, max_new_tokens, min_new_tokens,
                                     _eos_ids(model, tokenizer), on_token)
            path = "fast"
        except FastPathUnavailable as e:
            warnings.warn(f"tasa: the fast decode loop cannot drive this model ({e}); using "
                          f"transformers' generate")
    if path == "eager":
        tokens, pre, dec = _eager(model, input_ids, max_new_tokens, min_new_tokens, on_token)
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationResult(tokens, text, int(input_ids.shape[1]), pre, dec, path)
