"""Generation for tasa models (greedy by default, sampling on request), with a lean decode loop.

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

Sampling (:class:`Sampling`: temperature, top-k, top-p, seed) picks each token from the same
logits with its own seeded ``torch.Generator`` (the global RNG is untouched, so a seed gives the
same text on every run); temperature 0 is greedy. Stop strings (:class:`TextStream`) end the
text before the first occurrence and hold back streamed text that could still become one.
:func:`chat_ids` applies the tokenizer's chat template.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from tasa_ext.ops import decode_attention_, rms_norm

from .layers import TasaLinear

__all__ = ["GenerationResult", "generate", "FastPathUnavailable", "Sampling", "TextStream",
           "chat_ids", "has_chat_template", "BatchDecoder"]


class FastPathUnavailable(RuntimeError):
    """The lean loop cannot drive this model (the eager fallback is used)."""


@dataclasses.dataclass
class GenerationResult:
    tokens: List[int]                # the new tokens
    text: str                        # their decoded text
    n_prompt: int
    prefill_s: float                 # the prompt's forward pass (first new token included)
    decode_s: float                  # every later token
    path: str                        # "fast" | "fast-model" | "eager"
    finish_reason: str = "length"    # "stop" (end-of-sequence token or stop string) | "length"
    threads: List[tuple] = dataclasses.field(default_factory=list)  # (step, threads) switches

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.n_prompt / self.prefill_s if self.prefill_s > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits. ``temperature == 0`` is greedy (argmax:
    the default, identical to ``model.generate(do_sample=False)``); otherwise the logits are
    divided by ``temperature``, cut to the ``top_k`` largest (0: all) and to the smallest set
    whose probability reaches ``top_p`` (1.0: all), and one token is drawn with a
    ``torch.Generator`` seeded with ``seed``."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0) or self.temperature == float("inf"):
            raise ValueError(f"tasa: temperature must be >= 0 and finite, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"tasa: top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"tasa: top_k must be an integer >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def picker(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function logits ``[1, V]`` -> token ids ``[1]``, with its own RNG state."""
        if self.greedy:
            return lambda logits: logits.argmax(-1)
        gen = torch.Generator().manual_seed(int(self.seed))
        t, k, p = float(self.temperature), int(self.top_k), float(self.top_p)

        def pick(logits):
            z = logits.float().cpu() / t
            if 0 < k < z.shape[-1]:
                kth = z.topk(k, -1).values[..., -1:]
                z = z.masked_fill(z < kth, float("-inf"))
            if p < 1.0:
                srt, idx = z.sort(-1, descending=True)
                cum = srt.softmax(-1).cumsum(-1)
                drop = cum - srt.softmax(-1) >= p          # tokens after the nucleus is full
                z = z.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
            probs = z.softmax(-1)
            return torch.multinomial(probs, 1, generator=gen)[:, 0].to(logits.device)

        return pick


class TextStream:
    """Incremental detokenization with stop strings: :meth:`push` a token, get the text that can
    be shown now. Text that could be the start of a stop string, or that ends in a half-decoded
    character, is held back until it is decided; once a stop string appears the text ends just
    before it and :attr:`stopped` is set."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        if isinstance(stop, str):
            stop = [stop]
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: List[int] = []
        self.text, self.shown, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = full[:cut], True
            safe = cut
        else:
            self.text = full
            hold = max((n for s in self.stop for n in range(min(len(s) - 1, len(full)), 0, -1)
                        if full.endswith(s[:n])), default=0)
            safe = len(full) - hold
            while safe > 0 and full[safe - 1] == "\ufffd":     # a character still being decoded
                safe -= 1
        out = self.text[self.shown:safe] if safe > self.shown else ""
        self.shown = max(self.shown, safe)
        return out

    def flush(self) -> str:
        """The text still held back (at the end of generation)."""
        out, self.shown = self.text[self.shown:], len(self.text)
        return out


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer, messages: Sequence[dict]) -> torch.Tensor:
    """Token ids ``[1, T]`` of ``messages`` (``{"role", "content"}`` dicts) through the
    tokenizer's chat template, ending with the assistant's turn opened."""
    if not has_chat_template(tokenizer):
        raise ValueError("tasa: this tokenizer has no chat template; use raw completion")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise ValueError(f"tasa: a chat message needs string 'role' and 'content', got {m!r}")
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                        tokenize=True, return_dict=True, return_tensors="pt")
    return ids["input_ids"]


def _eos_ids(model, tokenizer) -> set:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        v = getattr(src, "eos_token_id", None)
        if v is None:
            continue
        ids.update(v if isinstance(v, (list, tuple, set)) else [v])
    return {int(i) for i in ids}


class _LeanDecoder:
    """One decode step of a LLaMA-family model (llama, qwen2, mistral: pre-norm blocks, rotary
    attention with grouped KV heads, SiLU-gated MLP) run straight on the model's own modules:
    the same norms, projections (TasaLinear), rotary tables and attention kernel that
    transformers calls, in the same order, without its per-layer Python machinery (argument
    re-packing, output recorders, mask and cache objects). K/V go into preallocated buffers.

    Why: on SmolLM2-135M with the 8-bit head the model's own step took 7.9 ms per token of
    which only 2.8 ms are the projections and ~2 ms the other aten ops (bench_generate.py's
    profile); the rest was Python around them."""

    TYPES = ("llama", "qwen2", "mistral")
    # tasa's own CPU ops for fp32 models: one-token attention (tasa_ext.ops.decode_attention_:
    # rotation, cache writes, attention; ~15 aten calls per layer before) and RMSNorm
    # (tasa_ext.ops.rms_norm; torch's took 16.6 us per 576-wide row as ~6 calls). Measured side
    # by side on the 2-core AVX2 EPYC: benchmarks/results/decode_attention_avx2.md. False
    # restores the aten calls (benchmarks compare both).
    TASA_OPS = True
    # projections called through TasaLinear.bound closures (~13 us less Python per call than
    # a module call: 125 calls per SmolLM2 step); False calls the modules (benchmarks compare)
    BIND = True
    # fp32 one-token steps of models whose layers are all tasa's: every layer in one op
    # (tasa_ext.ops.decode_layers_) instead of ~12 ops and their Python per layer; False keeps
    # the op-by-op path (benchmarks compare)
    LAYER_OP = True
    # the layer op's GEMVs take fp32 x as 2 int8 pieces (error <= 254^-2 of a group's largest
    # |x|, ~100x finer than bf16 activations) instead of the gemm op's 3: one vpmaddubsw less per
    # code vector on AVX2, 1.08-1.13x per decode step; teacher-forced over 1530 positions of
    # SmolLM2, Qwen2.5-Coder and Gemma-3 the greedy token never changed
    # (benchmarks/results/check_x_pieces.md, decode_x_pieces_avx2.md). 3: the gemm op's pieces
    X_PIECES = 2

    def __init__(self, model, max_len: int):
        cfg = model.config
        if getattr(cfg, "model_type", None) not in self.TYPES:
            raise FastPathUnavailable(f"model type {getattr(cfg, 'model_type', None)!r} is not "
                                      f"one of {self.TYPES}")
        if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "use_sliding_window",
                                                                   False):
            raise FastPathUnavailable("only SiLU MLPs and full attention are supported")
        if getattr(cfg, "sliding_window", None) and cfg.model_type == "mistral":
            raise FastPathUnavailable("Mistral's sliding window is not supported")
        try:
            inner = model.model
            self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, model.lm_head
            self.layers = [(l.input_layernorm, l.self_attn.q_proj, l.self_attn.k_proj,
                            l.self_attn.v_proj, l.self_attn.o_proj, l.post_attention_layernorm,
                            l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj)
                           for l in inner.layers]
            scaling = {l.self_attn.scaling for l in inner.layers}
        except AttributeError as e:
            raise FastPathUnavailable(f"unexpected module layout ({e})") from None
        if len(scaling) != 1:
            raise FastPathUnavailable("layers with different attention scalings")
        self.scale = scaling.pop()
        # fp32 RMSNorms as tasa_ext.ops.rms_norm (TASA_OPS) or torch.rms_norm calls on their
        # own weights (the modules' pow/mean/rsqrt in fp32 to rounding, checked by the
        # greedy-equality tests; torch's: 8 vs 12 us on the Intel VM, 16.6 us on the AVX2 EPYC)
        norms = [n for lay in self.layers for n in (lay[0], lay[5])] + [self.norm]
        if not all(hasattr(n, "weight") and hasattr(n, "variance_epsilon") for n in norms):
            raise FastPathUnavailable("unexpected RMSNorm modules")
        self.layers = [(self._norm_fn(l[0], self.TASA_OPS), *l[1:5],
                        self._norm_fn(l[5], self.TASA_OPS), *l[6:]) for l in self.layers]
        self.norm = self._norm_fn(self.norm, self.TASA_OPS)
        # fused q/k/v and gate/up where the formats allow (29/30 and 30/30 blocks of SmolLM2's
        # TASA 3.5 plan); the fused copies add the blocks' q/k/v and gate/up bytes once more
        self.fused = [(self._fuse([q, k, v]), self._fuse([g, u]))
                      for (_, q, k, v, _, _, g, u, _) in self.layers]
        bind = (lambda m: m.bound() if self.BIND and hasattr(m, "bound") else m)
        self.calls = [tuple(None if m is None else bind(m) for m in (q, k, v, o, g, u, d, *f))
                      for (_, q, k, v, o, _, g, u, d), f in zip(self.layers, self.fused)]
        self.splits = [(lay[6].out_features, lay[7].out_features) for lay in self.layers]
        self.head_call = bind(self.head)
        self.H = cfg.num_attention_heads
        self.KV = getattr(cfg, "num_key_value_heads", None) or self.H
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        # a packed embedding (TasaEmbedding) has no weight: its lookups come out in out_dtype
        dtype = getattr(self.embed, "out_dtype", None) or self.embed.weight.dtype
        self.k = [torch.zeros(1, self.KV, max_len, self.hd, dtype=dtype) for _ in self.layers]
        self.v = [torch.zeros(1, self.KV, max_len, self.hd, dtype=dtype) for _ in self.layers]
        pos = torch.arange(max_len)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, 1, self.hd, dtype=dtype), pos)
        self.cos, self.sin = cos[:, None], sin[:, None]          # [1, 1, max_len, hd]
        # one-token steps of fp32 models: rotation, cache writes and attention in one tasa op
        # (tasa_ext.ops.decode_attention_) instead of ~15 aten calls per layer
        self.fused_attention = (self.TASA_OPS and dtype == torch.float32
                                and self.cos.dtype == torch.float32
                                and self.cos.device.type == "cpu")
        self.layer_op = self._layer_op_args(inner) if self.fused_attention else None

    def _layer_op_args(self, inner):
        """The argument lists of tasa_ext.ops.decode_layers_ (every layer's one-token step in one
        op), or None where a layer is not all tasa's: packed projections (q/k/v and gate/up
        fused where their formats allow, apart elsewhere; gate and up of one width), fp32 norms
        of one epsilon."""
        if not self.LAYER_OP:
            return None
        tensors, ints, eps = [], [], set()
        for lay, (fqkv, fgu), (_, q, k, v, o, _, g, u, d) in zip(inner.layers, self.fused,
                                                                 self.layers):
            slots = ([fqkv, None, None] if fqkv is not None else [q, k, v]) + [o] + (
                [fgu, None] if fgu is not None else [g, u]) + [d]
            if (not all(m is None or isinstance(m, TasaLinear) for m in slots)
                    or g.out_features != u.out_features):
                return None
            norms = (lay.input_layernorm, lay.post_attention_layernorm)
            if not all(n.weight.dtype == torch.float32 for n in norms):
                return None
            eps |= {float(n.variance_epsilon) for n in norms}
            tensors += [n.weight.detach().contiguous() for n in norms]
            for m in slots:
                if m is None:
                    tensors += [None] * 6
                    ints += [0, 0]
                    continue
                tensors += [m.qweight, m.scales, m.zeros, m.gtable, m.perm,
                            None if m.bias is None else m.bias.detach().float().contiguous()]
                ints += [int(m.group_size), int(bool(m.hadamard))]
        if len(eps) != 1:
            return None
        hd = self.hd
        return (tensors, ints, [k[0] for k in self.k], [v[0] for v in self.v],
                self.cos.reshape(-1, hd).contiguous(), self.sin.reshape(-1, hd).contiguous(),
                eps.pop())

    @staticmethod
    def _norm_fn(n, tasa_ops: bool):
        if n.weight.dtype != torch.float32:
            return n          # half types: the module upcasts to fp32 inside; keep its math
        w, eps, shape = n.weight, n.variance_epsilon, (n.weight.shape[0],)
        if tasa_ops and w.device.type == "cpu":
            # fp32 activations of an fp32 model (a bf16 model's norms keep the module)
            return lambda x: rms_norm(x, w, eps) if x.dtype == torch.float32 else F.rms_norm(
                x, shape, w, eps)
        return lambda x: F.rms_norm(x, shape, w, eps)

    @staticmethod
    def _fuse(mods):
        # one call instead of two or three (per call ~3 us of dispatch, and larger streams)
        return TasaLinear.concat(mods)

    @staticmethod
    def _rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits of the last of ``ids`` ([1, T], at positions start..start+T-1)."""
        T = ids.shape[1]
        h = self.embed(ids)
        if T == 1 and self.layer_op is not None:
            tensors, ints, kc, vc, cos_tab, sin_tab, eps = self.layer_op
            h = h.clone(memory_format=torch.contiguous_format)     # written in place
            torch.ops.tasa.decode_layers_(h, tensors, ints, kc, vc, cos_tab, sin_tab, self.H,
                                          [start], eps, self.scale, self.X_PIECES)
            return self.head_call(self.norm(h))[:, -1]
        end = start + T
        H, KV, hd = self.H, self.KV, self.hd
        cos, sin = self.cos[:, :, start:end], self.sin[:, :, start:end]     # [1, 1, T, hd]
        cos_t, sin_t = cos.transpose(1, 2), sin.transpose(1, 2)              # [1, T, 1, hd]
        rot = self._rotate_half
        for li, (n1, _, _, _, _, n2, _, _, _) in enumerate(self.layers):
            q, k, v, o, g, u, d, fqkv, fgu = self.calls[li]
            x = n1(h)
            if fqkv is not None and T == 1 and self.fused_attention:
                a = decode_attention_(fqkv(x).view(-1), self.cos[0, 0, start],
                                      self.sin[0, 0, start], self.k[li][0], self.v[li][0], H,
                                      start, self.scale).view(1, 1, H * hd)
            else:
                if fqkv is not None:
                    # q and k rotated together: the same elementwise products, half the calls
                    y = fqkv(x).view(1, T, H + 2 * KV, hd)
                    qk = y[:, :, :H + KV]
                    qk = (qk * cos_t) + (rot(qk) * sin_t)
                    qs, ks = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
                    vs = y[:, :, H + KV:].transpose(1, 2)
                else:
                    qs = q(x).view(1, T, H, hd).transpose(1, 2)
                    ks = k(x).view(1, T, KV, hd).transpose(1, 2)
                    vs = v(x).view(1, T, KV, hd).transpose(1, 2)
                    qs = (qs * cos) + (rot(qs) * sin)
                    ks = (ks * cos) + (rot(ks) * sin)
                self.k[li][:, :, start:end] = ks
                self.v[li][:, :, start:end] = vs
                a = F.scaled_dot_product_attention(qs, self.k[li][:, :, :end],
                                                   self.v[li][:, :, :end], is_causal=T > 1,
                                                   scale=self.scale, enable_gqa=KV != H)
                a = a.transpose(1, 2).reshape(1, T, H * hd)
            h = h + o(a)
            x = n2(h)
            if fgu is not None:
                gs, us = fgu(x).split(self.splits[li], -1)
            else:
                gs, us = g(x), u(x)
            h = h + d(F.silu(gs) * us)
        return self.head_call(self.norm(h[:, -1:]))[:, -1]


class BatchDecoder:
    """Several streams decoded together (batched decode: concurrent requests, speculative
    drafts). Each stream's prompt runs through the lean decoder on its own, into its slot of
    KV caches shared by all streams; then every step is one ``decode_layers_`` call for all of
    them, whose projections are each one gemm over the B rows (the weights read once per step:
    the row-shared GEMV, ``tasa_ext.ops.set_gemv_rows``), and one gemm of the head.

    fp32 models whose decoder linears are all tasa's (the lean decoder's layer op), CPU. A
    stream's 2- to 4-bit groups give its own one-stream values bit for bit on AVX2 (x in the
    decoder's 2 int8 pieces takes the int8 GEMV by pairs of rows); its 8-bit groups, and every
    group elsewhere, differ by rounding (a gemm over B rows against the GEMV), so a greedy token
    can differ where two logits nearly tie. ``benchmarks/bench_decode_step.py --batch`` measures the step against one stream's."""

    def __init__(self, model, max_len: int, streams: int):
        if streams < 1:
            raise ValueError(f"tasa: BatchDecoder needs at least one stream, got {streams}")
        dec = _LeanDecoder(model, max_len)
        if dec.layer_op is None:
            raise FastPathUnavailable("batched decode needs the lean decoder's layer op (an fp32 "
                                      "model whose decoder linears are all tasa's, on the CPU)")
        self.dec, self.streams, self.max_len = dec, streams, max_len
        shape = (streams, dec.KV, max_len, dec.hd)
        self.k = [torch.zeros(shape) for _ in dec.layers]
        self.v = [torch.zeros(shape) for _ in dec.layers]
        self.pos = [0] * streams          # each stream's next position

    def _layers(self, h, k, v, pos):
        tensors, ints, _, _, cos, sin, eps = self.dec.layer_op
        for p in pos:
            if p >= self.max_len:
                raise ValueError(f"tasa: a stream reached max_len={self.max_len} positions")
        torch.ops.tasa.decode_layers_(h, tensors, ints, k, v, cos, sin, self.dec.H, list(pos),
                                      eps, self.dec.scale, self.dec.X_PIECES)

    def prefill(self, stream: int, ids: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] of the last of ``ids`` ([1, T]), the prompt of ``stream`` (its slot's
        cache rows 0..T-1; the stream's next position is then T)."""
        if not 0 <= stream < self.streams:
            raise ValueError(f"tasa: stream {stream} outside 0..{self.streams - 1}")
        T = ids.shape[-1]
        if not 0 < T < self.max_len:
            raise ValueError(f"tasa: a prompt of {T} tokens for max_len={self.max_len}")
        dec = self.dec
        if T == 1:       # the lean decoder's one-token path would use its own caches
            h = dec.embed(ids.view(1, 1)).reshape(1, -1).contiguous()
            self._layers(h, [k[stream] for k in self.k], [v[stream] for v in self.v], [0])
            logits = dec.head_call(dec.norm(h))
        else:
            saved = dec.k, dec.v
            dec.k = [k[stream:stream + 1] for k in self.k]
            dec.v = [v[stream:stream + 1] for v in self.v]
            try:
                logits = dec(ids.view(1, T), 0)
            finally:
                dec.k, dec.v = saved
        self.pos[stream] = T
        return logits.reshape(-1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token of every stream (``tokens`` [streams], stream b's at its next position):
        logits [streams, vocab]."""
        tokens = tokens.reshape(-1)
        if tokens.numel() != self.streams:
            raise ValueError(f"tasa: {tokens.numel()} tokens for {self.streams} streams")
        dec = self.dec
        h = dec.embed(tokens.view(-1, 1)).reshape(self.streams, -1).contiguous()
        self._layers(h, self.k, self.v, self.pos)
        self.pos = [p + 1 for p in self.pos]
        return dec.head_call(dec.norm(h))


class ThreadGovernor:
    """Picks the number of threads for the decode steps while they run, from their own timings.

    Why: on a machine whose cores are shared, a parallel region waits for its slowest thread,
    and a thread whose core runs another process waits for a time slice. Measured on this
    2-core Intel VM with one busy competing process (benchmarks/results/threads_contention.md):
    SmolLM2 decode 59 tokens/s on 1 thread but 34 on 2 (llama.cpp: 41 vs 28); idle, 2 threads
    give 119 against 85. No thread count is right for both, and the load changes while a
    model generates, so the governor runs the current count, and every ``interval`` steps
    times ``probe`` steps at another candidate ({max, max/2, 1}); the faster mean wins
    (by at least ``margin``). A losing probe doubles the interval (to ``max_interval``), so an
    idle machine pays well under 1% for the probes. Token results do not depend on the count:
    the kernels split output rows, not sums (tests/test_chat.py checks greedy tokens for 1 and
    2 threads).
    """

    def __init__(self, max_threads: Optional[int] = None, interval: int = 32, probe: int = 9,
                 max_interval: int = 512, margin: float = 0.15, first_probe: int = 8,
                 slow: float = 4.0):
        self.original = torch.get_num_threads()
        n = int(max_threads or self.original)
        self.candidates = sorted({n, (n + 1) // 2, 1}, reverse=True)
        # the start: as many threads as there are CPUs nobody else is running on right now
        busy = other_running_threads()
        free = (os.cpu_count() or n) - busy if busy is not None else n
        self.current = max(c for c in self.candidates if c <= max(free, 1))
        self.base_interval, self.interval = interval, interval
        self.probe_len, self.max_interval, self.margin, self.slow = probe, max_interval, margin, slow
        self.recent: List[float] = []
        self.best = float("inf")            # the fastest step seen, at any count
        self.countdown, self.probing, self.probe_times, self.turn = first_probe, None, [], 0
        self.history: List[tuple] = [(0, self.current)]      # (step, threads) at every switch
        self.steps = 0
        if self.current != self.original:
            torch.set_num_threads(self.current)

    @property
    def active(self) -> bool:
        return len(self.candidates) > 1

    def step_done(self, seconds: float) -> None:
        self.steps += 1
        if not self.active:
            return
        self.best = min(self.best, seconds)
        if self.probing is None:
            self.recent = (self.recent + [seconds])[-16:]
            self.countdown -= 1
            # a collapse (steps many times the best: threads waiting out time slices) is not
            # sat through until the next scheduled probe
            collapsed = len(self.recent) >= 2 and min(self.recent[-2:]) > self.slow * self.best
            if (self.countdown <= 0 and len(self.recent) >= 8) or collapsed:
                others = [c for c in self.candidates if c != self.current]
                self.probing = others[self.turn % len(others)]
                self.turn += 1
                self.probe_times = []
                torch.set_num_threads(self.probing)
            return
        self.probe_times.append(seconds)
        mine = sum(self.recent) / len(self.recent)
        # a probe that is clearly losing ends at once: under contention one probe step of a
        # wider team can cost 10x a normal step, and nine of them would cost more than the
        # probe could ever win back
        losing = len(self.probe_times) > 1 and seconds > 2 * mine
        if len(self.probe_times) < self.probe_len and not losing:
            return
        # means, not medians: under contention a team of threads pays in rare long steps (a
        # thread that waits a whole time slice at a barrier: 120-220 ms among 20 ms steps), and
        # those are the cost; the first probe step is a warm-up (the team changes size)
        probe = sum(self.probe_times[1:]) / (len(self.probe_times) - 1)
        if not losing and probe < mine * (1 - self.margin):
            self.current, self.recent = self.probing, self.probe_times[1:]
            self.interval = self.base_interval
            self.history.append((self.steps, self.current))
        else:
            self.interval = min(2 * self.interval, self.max_interval)
            torch.set_num_threads(self.current)
        self.probing, self.countdown = None, self.interval

    def close(self) -> None:
        torch.set_num_threads(self.original)


def other_running_threads() -> Optional[int]:
    """Threads of other processes running or runnable right now (Linux: ``procs_running`` of
    /proc/stat less this process's own running threads); None where that cannot be read."""
    try:
        with open("/proc/stat") as f:
            total = next(int(ln.split()[1]) for ln in f if ln.startswith("procs_running"))
        mine = 0
        for t in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{t}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "R":
                    mine += 1
        return max(total - mine, 0)
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _loop(first, after, max_new_tokens, min_new_tokens, eos, on_token, stop=None, pick=None,
          governor: Optional[ThreadGovernor] = None):
    """The decode loop: ``first()`` -> logits of the prompt's last position, ``after(token ids
    [1])`` -> logits after that token, ``pick(logits)`` -> the next token (default argmax);
    ``stop(tokens so far)`` ends it early (after ``min_new_tokens``); ``governor`` times each
    step and sets the thread count. Returns (tokens, prefill seconds, decode seconds)."""
    pick = pick or (lambda logits: logits.argmax(-1))
    if governor is not None:
        inner = after

        def after(nxt):
            t = time.perf_counter()
            logits = inner(nxt)
            governor.step_done(time.perf_counter() - t)
            return logits

    out_tokens: List[int] = []
    t0 = time.perf_counter()
    nxt = pick(first())
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    while True:
        tok = int(nxt)
        out_tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out_tokens) >= max_new_tokens or (len(out_tokens) >= min_new_tokens and (
                tok in eos or (stop is not None and stop(out_tokens)))):
            break
        nxt = pick(after(nxt))
    return out_tokens, prefill, time.perf_counter() - t1


def _lean(model, input_ids, max_new_tokens, *args):
    T = input_ids.shape[1]
    step = _LeanDecoder(model, T + max_new_tokens)
    pos = [T]

    def after(nxt):
        logits = step(nxt[:, None], pos[0])
        pos[0] += 1
        return logits

    return _loop(lambda: step(input_ids, 0), after, max_new_tokens, *args)


def _model_loop(model, input_ids, max_new_tokens, *args):
    if not getattr(model, "_supports_cache_class", True) or not hasattr(model, "forward"):
        raise FastPathUnavailable(f"{type(model).__name__} does not take a KV cache object")
    cache = DynamicCache(config=model.config)

    def first():
        try:
            return model(input_ids=input_ids, cache=cache, use_cache=True,
                         logits_to_keep=1).logits[:, -1]
        except TypeError as e:       # a model class without logits_to_keep / cache support
            raise FastPathUnavailable(str(e)) from None

    def after(nxt):
        return model(input_ids=nxt[:, None], cache=cache, use_cache=True,
                     logits_to_keep=1).logits[:, -1]

    return _loop(first, after, max_new_tokens, *args)


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


class _StopCriteria(StoppingCriteria):
    """``stop(new tokens so far)`` as a transformers stopping criterion (batch 1), from
    ``min_new`` tokens on (transformers' min_new_tokens only holds back the end-of-sequence
    token, not a stopping criterion)."""

    def __init__(self, stop, prompt_len: int, min_new: int):
        self.stop, self.prompt_len, self.min_new = stop, prompt_len, min_new

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[0, self.prompt_len:].tolist()
        done = len(new) >= self.min_new and bool(self.stop(new))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _eager(model, input_ids, max_new_tokens, min_new_tokens, on_token, stop=None,
           sampling: Optional["Sampling"] = None):
    s = _Streamer(on_token)
    t0 = time.perf_counter()
    crit = StoppingCriteriaList([_StopCriteria(stop, input_ids.shape[1], min_new_tokens)]
                                if stop else [])
    kw = dict(do_sample=False)
    if sampling is not None and not sampling.greedy:
        kw = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                  top_k=sampling.top_k or None)
    with torch.random.fork_rng(devices=[]):     # the seed, without touching the caller's RNG
        if sampling is not None:
            torch.manual_seed(int(sampling.seed))
        model.generate(input_ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                       streamer=s, attention_mask=torch.ones_like(input_ids),
                       stopping_criteria=crit, **kw)
    t_end = time.perf_counter()
    t_first = s.t_first or t_end
    return s.tokens, t_first - t0, t_end - t_first


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompt: Union[str, torch.Tensor],
             max_new_tokens: int = 128, *, fast: bool = True, min_new_tokens: int = 0,
             on_token: Optional[Callable[[int], None]] = None,
             stop: Optional[Callable[[List[int]], bool]] = None,
             sampling: Optional[Sampling] = None, stop_strings: Sequence[str] = (),
             on_text: Optional[Callable[[str], None]] = None,
             adapt_threads: bool = True) -> GenerationResult:
    """Continuation of ``prompt`` (text, or token ids ``[1, T]``: e.g. :func:`chat_ids`),
    batch 1; greedy unless ``sampling`` says otherwise.

    ``on_token(id)`` is called for every new token as it is produced; ``on_text(str)`` with the
    text that can be shown so far (streaming, stop strings held back). Stops at an
    end-of-sequence token, at the first of ``stop_strings`` (the text ends before it) or when
    ``stop(new token ids so far)`` is true (each after ``min_new_tokens``), or after
    ``max_new_tokens``; ``finish_reason`` says which ("stop" or "length"). ``adapt_threads``:
    the decode steps choose their thread count (up to torch's) by timing
    (:class:`ThreadGovernor`); ``GenerationResult.threads`` lists the switches."""
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
    ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if isinstance(ctx, int) and input_ids.shape[1] + max_new_tokens > ctx:
        # past the context the positions have no rotary table / embedding (garbage, or a KV
        # cache preallocated for 10^9 positions): refuse before anything is allocated
        raise ValueError(f"tasa: the prompt ({input_ids.shape[1]} tokens) + max_new_tokens "
                         f"({max_new_tokens}) exceed the model's context of {ctx} positions; "
                         f"ask for at most {max(ctx - input_ids.shape[1], 0)} new tokens")
    input_ids = input_ids.to(next(model.parameters()).device)
    model.eval()
    stream = TextStream(tokenizer, stop_strings) if (stop_strings or on_text) else None
    user_token, user_stop = on_token, stop
    if stream is not None:
        def on_token(tok):
            delta = stream.push(tok)
            if user_token is not None:
                user_token(tok)
            if delta and on_text is not None:
                on_text(delta)

        def stop(tokens):
            return stream.stopped or (user_stop is not None and user_stop(tokens))
    pick = sampling.picker() if sampling is not None else None
    eos = _eos_ids(model, tokenizer)
    path = "eager"
    gov = ThreadGovernor() if (adapt_threads and fast and input_ids.device.type == "cpu") \
        else None
    try:
        if fast:
            try:
                tokens, pre, dec = _lean(model, input_ids, max_new_tokens, min_new_tokens, eos,
                                         on_token, stop, pick, gov)
                path = "fast"
            except FastPathUnavailable:
                try:     # another architecture: the model's own forward, one call per token
                    tokens, pre, dec = _model_loop(model, input_ids, max_new_tokens, min_new_tokens,
                                             eos, on_token, stop, pick, gov)
                    path = "fast-model"
                except FastPathUnavailable as e:
                    warnings.warn(f"tasa: the fast decode loop cannot drive this model ({e}); "
                                  f"using transformers' generate")
    finally:
        if gov is not None:
            gov.close()
    if path == "eager":
        tokens, pre, dec = _eager(model, input_ids, max_new_tokens, min_new_tokens, on_token,
                                  stop, sampling)
    if stream is not None:
        rest = stream.flush()
        if rest and on_text is not None:
            on_text(rest)
        text = stream.text
    else:
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
    stopped = (stream is not None and stream.stopped) or (bool(tokens) and tokens[-1] in eos) \
        or (user_stop is not None and bool(tokens) and len(tokens) < max_new_tokens)
    return GenerationResult(tokens, text, int(input_ids.shape[1]), pre, dec, path,
                            "stop" if stopped else "length",
                            list(gov.history) if gov is not None else [])
