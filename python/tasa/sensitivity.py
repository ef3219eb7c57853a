"""Per-layer sensitivity for several objectives, measured by quantization perturbation.

For each *unit* ``u`` (a decoder block by default, its attention or MLP, or a single linear) we
quantize only ``u`` with round-to-nearest at each probe width ``b`` (default 3 and 4 bits, group
size 128, the same format and parameters as the real quantizer, :func:`tasa.quant.quantize_rtn`),
keep everything else in full precision, and measure the increase of each objective's loss:

    s_k[u](b) = L_k(model with u quantized at b) - L_k(model)     (nats per scored token)

The loss of every item (sequence) is kept, so the noise of the rankings can be bounded by
resampling items (:mod:`tasa.stats`).

Objectives (:class:`Objective`) are token sequences with a mask of the tokens that are scored:

* ``ppl``  -- general-text NLL: every token of random windows of held-out general text;
* ``math`` -- GSM8K gold-solution NLL: the tokens of the reference chain-of-thought solution
  given ``"Question: ...\\nAnswer:"`` (exact match is near zero for small models; the NLL of the
  gold solution is the sensitive, smooth signal);
* ``arc``  -- ARC correct-answer log-likelihood: the tokens of the correct choice given the
  question (the continuation lm-eval scores for ARC multiple choice).

Cost: a probe of the unit in block ``l`` recomputes only blocks ``l .. L-1``: the hidden states
entering every block are cached once for the full-precision model (``L * tokens * hidden``
floats), blocks before ``l`` are replaced by pass-throughs and block ``l`` receives its cached
input. Everything else (embeddings, masks, rotary tables, the final norm, lm_head and any logit
soft-capping) runs through the model's own ``forward``, so any transformers decoder-only model
whose blocks take the hidden states as first argument works (LLaMA, Qwen2, Gemma3, ...).
Losses are computed on the scored positions only (the hidden states are gathered before
``lm_head``), so no ``[batch, T, vocab]`` logits tensor is materialised.

Two scorings of a probe (``scoring``, issue 27 item 1):

* ``"nll"`` -- the increase of the gold-token NLL (above);
* ``"kl"``  -- the KL divergence of the probed model's next-token distribution from the
  full-precision one at every scored position, ``KL(p_ref || p_probe)`` summed per item (nats;
  the objective's value is its mean per scored token). The gold NLL moves by the log-probability
  of ONE token, whose change can have either sign; the KL sums the move of the whole
  distribution, is never negative and is what the field measures a quantized model by. The
  reference distribution is kept as its top :data:`KL_TOP_K` log-probabilities plus the rest
  as one bucket (``K x 8`` bytes per position instead of the vocabulary): the bucketed KL is a
  lower bound of the full one (coarse-graining never increases a KL) and equals it when the
  top K hold the reference's mass.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tqdm.auto import tqdm

from . import calib, defaults
from .corpora import calibration_batch, qa_prompt
from .divergence import KL_TOP_K, bucketed_kl, kl_nll_from_logits, top_and_rest  # noqa: F401 (re-exported)
from .quant import LayerSpec, quantize_rtn, resolve_group_size
from .util import flush_denormals

__all__ = ["Objective", "text_objective", "qa_objective", "gsm8k_objective", "arc_objective",
           "block_units", "sublayer_units", "linear_units", "UNIT_BUILDERS", "objective_losses",
           "measure_sensitivity", "SCORINGS", "KL_TOP_K", "bucketed_kl"]

SCORINGS = defaults.SENS_SCORINGS
@dataclasses.dataclass
class Objective:
    """``input_ids`` int64 [n, T] (right-padded), ``score`` bool [n, T]: token ``t`` is scored
    (its NLL given tokens ``< t`` counts); position 0 is never scored. Loss = mean NLL over the
    scored tokens."""

    name: str
    input_ids: torch.Tensor
    score: torch.Tensor
    description: str = ""

    def __post_init__(self):
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.score.shape:
            raise ValueError(f"tasa: objective {self.name!r}: input_ids and score must both be "
                             f"[n, T], got {tuple(self.input_ids.shape)} and {tuple(self.score.shape)}")
        self.score = self.score.bool().clone()
        self.score[:, 0] = False
        if int(self.score.sum()) == 0:
            raise ValueError(f"tasa: objective {self.name!r} scores no tokens")

    @property
    def n_scored(self) -> int:
        return int(self.score.sum())

    def summary(self) -> dict:
        return {"name": self.name, "sequences": int(self.input_ids.shape[0]),
                "seq_len": int(self.input_ids.shape[1]), "scored_tokens": self.n_scored,
                "description": self.description}


def text_objective(name: str, tokenizer, texts: Sequence[str], n: int, seqlen: int,
                   seed: int = 0, description: str = "") -> Objective:
    """``n`` random ``seqlen``-token windows of the ``"\\n\\n"``-joined texts, all scored."""
    b = calibration_batch(tokenizer, list(texts), n, seqlen, seed=seed)
    return Objective(name, b.input_ids, torch.ones_like(b.input_ids, dtype=torch.bool),
                     description or f"{n} x {seqlen}-token windows, every token scored")


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def qa_objective(name: str, tokenizer, pairs: Sequence[tuple], max_len: int = 384,
                 description: str = "", span: str = "answer") -> Objective:
    """Prompt/continuation pairs: the continuation's tokens are scored given the prompt
    (``span="answer"``), or every token of the item after the first (``span="item"``: the
    prompt's tokens too, see :data:`tasa.defaults.SENS_ITEM_SPAN`).
    Tokenized as ``prompt`` and ``prompt + continuation`` (so BPE merges across the boundary
    are those of the full text); sequences are right-padded (causal attention never looks
    right, so padding needs no mask) and truncated to ``max_len`` tokens (the prompt keeps at
    least one scored continuation token, or the pair is dropped)."""
    def enc(text):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return list(ids)

    if span not in ("answer", "item"):
        raise ValueError(f"tasa: objective {name!r}: span must be 'answer' or 'item', "
                         f"got {span!r}")
    seqs, marks = [], []
    for prompt, cont in pairs:
        p = enc(prompt)
        full = enc(prompt + cont)
        k = len(p)
        while k > 0 and (k > len(full) or full[:k] != p[:k]):
            k -= 1      # the boundary token merged with the continuation: score from there
        full = full[:max_len]
        if len(full) <= max(k, 1):
            continue
        seqs.append(full)
        marks.append(max(k, 1))
    if not seqs:
        raise ValueError(f"tasa: objective {name!r}: no usable prompt/continuation pair")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), _pad_id(tokenizer), dtype=torch.int64)
    score = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, k) in enumerate(zip(seqs, marks)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.int64)
        score[i, (1 if span == "item" else k):len(s)] = True
    return Objective(name, ids, score, description)


def gsm8k_objective(tokenizer, items: Sequence[Mapping], n: int, seed: int = 0,
                    max_len: int = 384, span: str = "answer") -> Objective:
    """``math``: NLL of the gold chain-of-thought solution given the question (``n`` items
    drawn with ``seed``; ``span="item"`` scores the question's tokens too)."""
    items = list(items)
    pick = random.Random(seed).sample(items, min(n, len(items)))
    pairs = [(qa_prompt(it["question"]), " " + it["answer"]) for it in pick]
    what = "question + gold solution" if span == "item" else "gold solution given the question"
    return qa_objective("math", tokenizer, pairs, max_len, f"GSM8K {what}, {len(pairs)} items",
                        span=span)


def arc_objective(tokenizer, items: Sequence[Mapping], n: int, seed: int = 0,
                  max_len: int = 256, span: str = "answer") -> Objective:
    """``arc``: log-likelihood of the correct choice's text given the question (lm-eval's
    ARC continuation), ``n`` items drawn with ``seed``; ``span="item"`` scores the question's
    tokens too."""
    items = list(items)
    pick = random.Random(seed).sample(items, min(n, len(items)))
    pairs = [(qa_prompt(it["question"]), " " + it["choices"][it["gold"]]) for it in pick]
    what = "question + correct answer" if span == "item" else "correct answer given the question"
    return qa_objective("arc", tokenizer, pairs, max_len, f"ARC {what}, {len(pairs)} items",
                        span=span)


# ---- units ----------------------------------------------------------------------------------

def block_units(model: nn.Module, targets: Optional[Sequence[str]] = None) -> Dict[str, tuple]:
    """``{block prefix: (block index, [linear fqns])}`` -- one unit per decoder block, holding the
    block's nn.Linear modules (restricted to ``targets`` when given)."""
    layers, prefix = calib.decoder_layers(model)
    wanted = None if targets is None else set(targets)
    out = {}
    for i, blk in enumerate(layers):
        p = f"{prefix}.{i}"
        lins = [f"{p}.{n}" for n, m in blk.named_modules() if isinstance(m, nn.Linear)
                and (wanted is None or f"{p}.{n}" in wanted)]
        if lins:
            out[p] = (i, lins)
    return out


def sublayer_units(model: nn.Module, targets: Optional[Sequence[str]] = None) -> Dict[str, tuple]:
    """``{block prefix + "." + child: (block index, [linear fqns])}`` -- one unit per direct child
    of a decoder block that holds linears: attention (``self_attn``) and MLP (``mlp``) on
    LLaMA/Qwen2/Gemma3, so each block is probed twice."""
    out: Dict[str, tuple] = {}
    for p, (i, lins) in block_units(model, targets).items():
        for f in lins:
            child = f[len(p) + 1:].split(".")[0]
            out.setdefault(f"{p}.{child}", (i, []))[1].append(f)
    return out


def linear_units(model: nn.Module, targets: Optional[Sequence[str]] = None) -> Dict[str, tuple]:
    """``{linear fqn: (block index, [fqn])}`` -- one unit per linear."""
    return {f: (i, [f]) for _, (i, lins) in block_units(model, targets).items() for f in lins}


UNIT_BUILDERS = {"block": block_units, "sublayer": sublayer_units, "linear": linear_units}


# ---- measurement ----------------------------------------------------------------------------

class _PassThrough(nn.Module):
    """Stands in for a decoder block that a probe does not need to recompute."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        calib.copy_block_attrs(self, inner)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _batches(obj: Objective, tokens_per_batch: int) -> List[tuple]:
    """``(row indices, length)`` batches: rows sorted by their used length (last scored token +
    1) and cut to that length per batch -- trailing padding never influences earlier tokens
    under causal attention, so it need not be computed."""
    n, T = obj.input_ids.shape
    pos = torch.arange(T).expand(n, T)
    used = torch.where(obj.score, pos + 1, torch.zeros_like(pos)).amax(1)
    order = torch.argsort(used, descending=True, stable=True)
    out, i = [], 0
    while i < n:
        L = int(used[order[i]])
        bs = max(1, tokens_per_batch // max(L, 1))
        rows = order[i:i + bs]
        out.append((rows, L))
        i += bs
    return out


class _Prober:
    """Runs the objectives through the model; with ``record`` it caches every block's input of
    every objective batch, which :meth:`probe` needs.

    Losses are kept per item (sequence): ``items[obj]`` is the summed NLL of each sequence's
    scored tokens (float64 [n]), ``tokens[obj]`` their counts; an objective's loss is
    ``items.sum() / tokens.sum()``. The per-item sums are what the noise bounds
    (:mod:`tasa.stats`: split halves, bootstrap) resample.

    ``compute_dtype=torch.bfloat16`` runs the decoder blocks under CPU/GPU autocast (matmuls in
    bf16, the residual stream, norms and the output head in fp32): on the AVX-512-BF16 CPUs
    measured here a [2048 x 576] x [576 x 1536] linear takes 3.6 ms in bf16 against 17.0 ms in
    fp32. The baseline and every probe run at the same precision, so the deltas compare like
    with like; :func:`measure_sensitivity`'s docstring gives the measured agreement with fp32.
    """

    def __init__(self, model, objectives: Sequence[Objective], tokens_per_batch: int,
                 record: bool = True, compute_dtype: torch.dtype = torch.float32,
                 scoring: str = "nll"):
        if scoring not in SCORINGS:
            raise ValueError(f"tasa: sensitivity scoring must be one of {SCORINGS}, got "
                             f"{scoring!r}")
        self.scoring = scoring
        self.ref: Dict[tuple, tuple] = {}          # (obj, batch) -> reference top-K (KL scoring)
        # KL scoring: the last probe's summed gold NLL per item (obj -> [items]), same pass
        self.last_nll: Dict[str, np.ndarray] = {}
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"tasa: sensitivity compute dtype must be float32 or bfloat16, "
                             f"got {compute_dtype}")
        self.model = model
        self.layers, _ = calib.decoder_layers(model)
        self.objectives = list(objectives)
        self.dev = next(model.parameters()).device
        self.compute_dtype = compute_dtype
        self.batches = {o.name: _batches(o, tokens_per_batch) for o in self.objectives}
        self.cache: Dict[tuple, torch.Tensor] = {}     # (obj, batch, layer) -> hidden in
        self.tokens = {o.name: o.score[:, 1:].sum(1).to(torch.float64).numpy()
                       for o in self.objectives}
        self.base_items = self._run(start=None, record=record)
        self.base = self.losses(self.base_items)

    def losses(self, items: Mapping[str, np.ndarray]) -> Dict[str, float]:
        return {k: float(v.sum() / self.tokens[k].sum()) for k, v in items.items()}

    def _final(self, hidden, obj: Objective, rows, L: int, key=None,
                base: bool = False) -> torch.Tensor:
        """Summed NLL of the scored tokens of each row of one batch (float64 [rows]), from the
        final hidden; the output head runs in fp32 whatever the blocks ran in. With the KL
        scoring the baseline run (``base``) keeps the reference's top-K at ``key`` and a probe
        returns each row's summed KL to it instead."""
        score = obj.score[rows, :L].to(self.dev)
        tgt = obj.input_ids[rows, :L].to(self.dev)
        pos = score[:, 1:]                       # hidden at t-1 predicts token t
        h = hidden[:, :-1][pos].float()
        head = self.model.get_output_embeddings()
        logits = F.linear(h, head.weight.float(),
                          None if getattr(head, "bias", None) is None else head.bias.float())
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        row = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)[pos]
        if self.scoring == "kl" and not base:
            ref_top, ref_idx, ref_rest = self.ref[key]
            # the gold NLL of the same pass comes free: kept so one probe gives both scorings
            per_pos, nll = kl_nll_from_logits(logits, ref_top, ref_idx, ref_rest,
                                              tgt[:, 1:][pos])
            self.last_nll_rows = torch.zeros(pos.shape[0], dtype=torch.float64).index_add_(
                0, row.cpu(), nll.cpu())
        elif self.scoring == "kl":        # the baseline: keep its top-K, score its NLL
            lp = F.log_softmax(logits, -1)
            self.ref[key] = top_and_rest(lp, KL_TOP_K)
            per_pos = -lp.gather(1, tgt[:, 1:][pos][:, None])[:, 0].double()
        else:
            per_pos = F.cross_entropy(logits, tgt[:, 1:][pos], reduction="none").double()
        return torch.zeros(pos.shape[0], dtype=torch.float64, device=per_pos.device).index_add_(
            0, row, per_pos.to(torch.float64)).cpu()

    def _run(self, start: Optional[int], record: bool = False) -> Dict[str, np.ndarray]:
        """Per-item summed NLL per objective. ``start``: first block to recompute (None: all);
        ``record``: cache every block's input."""
        layers = self.layers
        originals = list(layers)
        handles = []
        state = {}
        if start is not None:
            for i in range(start):
                layers[i] = _PassThrough(originals[i])

            def sub(mod, args, kwargs):
                return (state["h"],) + tuple(args[1:]), kwargs
            handles.append(layers[start].register_forward_pre_hook(sub, with_kwargs=True))
        if record:
            def make_rec(i):
                def rec(mod, args, kwargs):
                    h = args[0] if args else kwargs["hidden_states"]
                    self.cache[(state["obj"], state["b"], i)] = h.detach()
                return rec
            handles += [layers[i].register_forward_pre_hook(make_rec(i), with_kwargs=True)
                        for i in range(len(layers))]
        base_model = getattr(self.model, self.model.base_model_prefix)
        autocast = self.compute_dtype != torch.float32
        out = {}
        cast = []
        try:
            if autocast:
                # the linears of the blocks that run hold compute-dtype copies for this run:
                # autocast casts an fp32 weight on every call (its cache keeps only weights that
                # require grad, per autocast region), 13% of a SmolLM2 probe (1.2 of 9.0 s, AMD
                # EPYC); the same rounding, so the same numbers
                for i in range(start or 0, len(originals)):
                    for mod in originals[i].modules():
                        if isinstance(mod, nn.Linear) and mod.weight.dtype == torch.float32:
                            cast.append((mod, mod.weight.data,
                                         None if mod.bias is None else mod.bias.data))
                            mod.weight.data = mod.weight.data.to(self.compute_dtype)
                            if mod.bias is not None:
                                mod.bias.data = mod.bias.data.to(self.compute_dtype)
            for obj in self.objectives:
                items = torch.zeros(obj.input_ids.shape[0], dtype=torch.float64)
                nll_items = torch.zeros_like(items)
                for bi, (rows, L) in enumerate(self.batches[obj.name]):
                    state["obj"], state["b"] = obj.name, bi
                    if start is not None:
                        state["h"] = self.cache[(obj.name, bi, start)]
                    # run the base model only (not lm_head over every position)
                    with torch.autocast(self.dev.type, dtype=self.compute_dtype, enabled=autocast):
                        res = base_model(input_ids=obj.input_ids[rows, :L].to(self.dev),
                                         use_cache=False)
                    items[rows] = self._final(res.last_hidden_state, obj, rows, L,
                                              key=(obj.name, bi), base=start is None)
                    if self.scoring == "kl" and start is not None:
                        nll_items[rows] = self.last_nll_rows
                out[obj.name] = items.numpy()
                if self.scoring == "kl" and start is not None:
                    self.last_nll[obj.name] = nll_items.numpy()
        finally:
            for mod, w, b in cast:
                mod.weight.data = w
                if b is not None:
                    mod.bias.data = b
            for h in handles:
                h.remove()
            for i, blk in enumerate(originals):
                layers[i] = blk
        return out

    def probe(self, start: int, linears: Sequence[nn.Linear],
              specs: Sequence[LayerSpec],
              weights: Optional[Sequence[Optional[torch.Tensor]]] = None) -> Dict[str, np.ndarray]:
        """Per-item summed NLL with ``linears`` RTN-quantized per ``specs``, or set to
        ``weights`` (dequantized, one per linear; None entries: RTN) where given."""
        saved = [lin.weight.data for lin in linears]
        try:
            for i, (lin, spec) in enumerate(zip(linears, specs)):
                w = weights[i] if weights is not None else None
                if w is None:
                    w = quantize_rtn(lin.weight, spec).dequantize()
                elif tuple(w.shape) != tuple(lin.weight.shape):
                    raise ValueError(f"tasa: probe weight of shape {tuple(w.shape)} for a linear "
                                     f"of shape {tuple(lin.weight.shape)}")
                lin.weight.data = w.to(lin.weight.dtype).to(lin.weight.device)
            return self._run(start)
        finally:
            for lin, w in zip(linears, saved):
                lin.weight.data = w


def objective_losses(model: nn.Module, objectives: Sequence[Objective],
                     tokens_per_batch: int = 2048,
                     compute_dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """Mean scored NLL of each objective (nats per token) for the model as it is."""
    with torch.no_grad():
        return _Prober(model, objectives, tokens_per_batch, record=False,
                       compute_dtype=compute_dtype).base


def _check_base(recorded: Mapping[str, float], now: Mapping[str, float]) -> None:
    for k, v in now.items():
        if k in recorded and not math.isclose(v, float(recorded[k]), rel_tol=1e-4, abs_tol=1e-5):
            raise ValueError(f"tasa: resumed sensitivity run: baseline {k} loss {v:.6f} "
                             f"differs from the recorded {float(recorded[k]):.6f}; the model "
                             f"or data changed -- start afresh")


def measure_sensitivity(model: nn.Module, objectives: Sequence[Objective],
                        units: Mapping[str, tuple], widths: Sequence[int] = (defaults.SENS_BITS,),
                        group_size: int = 128, mode: str = "asym", tokens_per_batch: int = 2048,
                        done: Optional[Mapping[int, Mapping[str, Mapping]]] = None,
                        on_result: Optional[Callable[[int, str, Dict[str, float],
                                                      Dict[str, list]], None]] = None,
                        base: Optional[Mapping[str, float]] = None,
                        compute_dtype: torch.dtype = torch.float32,
                        progress: bool = True, dist=None, scoring: str = "nll",
                        probe_weights: Optional[Mapping[tuple, torch.Tensor]] = None,
                        probe_name: str = "RTN") -> dict:
    """Loss increase of every objective when only unit ``u`` is RTN-quantized at each width of
    ``widths`` (``scoring="kl"``: the KL divergence from the full-precision model instead,
    module docstring).

    ``probe_weights``: ``{(bits, linear fqn): dequantized weight}`` -- the probe of unit ``u`` at
    ``bits`` sets its linears to these (e.g. GPTQ's, ``tasa.pipeline.stages.probe_weights``: the
    quantizer the model is then quantized with) instead of quantizing them with RTN; a linear
    missing from it is an error. ``probe_name`` names them in the progress bar.

    ``units``: ``{name: (block index, [linear fqns])}`` (:func:`block_units`,
    :func:`sublayer_units`, :func:`linear_units`). ``done[b][u]``: probes already measured
    (resume; any value) -- not probed again; ``on_result(b, u, deltas, item_deltas)`` is called
    after each new probe (e.g. to persist it). ``base``: the recorded full-precision losses of a
    resumed run -- they must match the recomputed ones (same model and data), otherwise the old
    results are not comparable and a ``ValueError`` is raised. Group size: the largest multiple
    of 32 <= ``group_size`` that divides each linear's K (:func:`tasa.quant.resolve_group_size`).
    ``compute_dtype``: see :class:`_Prober` (bf16 autocast: ~2-4x faster on CPUs with AVX-512
    BF16).

    ``dist``: a :class:`tasa.distributed.Dist` -- the probes are divided among its ranks by
    cost (blocks recomputed) and gathered after every round of one probe per rank, so every
    rank sees (and ``on_result`` gets) every result, in the order one process makes them.

    Returns ``{"base": {obj: loss}, "base_items": {obj: [summed NLL per item]}, "tokens":
    {obj: [scored tokens per item]}, "delta": {b: {unit: {obj: loss increase}}}, "items": {b:
    {unit: {obj: [summed NLL increase per item]}}}`` (``delta`` and ``items``: the new probes
    only; the ``done`` ones stay the caller's), ``"seconds"``; an
    objective's delta is ``sum(items) / sum(tokens)``.
    """
    t0 = time.perf_counter()
    names = {o.name for o in objectives}
    if len(names) != len(objectives):
        raise ValueError("tasa: objective names must be unique")
    widths = [int(b) for b in widths]
    if not widths or len(set(widths)) != len(widths):
        raise ValueError(f"tasa: sensitivity widths must be distinct, got {widths}")
    mods = dict(model.named_modules())
    done = done or {}
    delta: Dict[int, Dict[str, Dict[str, float]]] = {b: {} for b in widths}
    items: Dict[int, Dict[str, Dict[str, list]]] = {b: {} for b in widths}
    nll_items: Dict[int, Dict[str, Dict[str, list]]] = {b: {} for b in widths}
    with torch.no_grad(), flush_denormals():
        prober = _Prober(model, objectives, tokens_per_batch, compute_dtype=compute_dtype,
                         scoring=scoring)
        if base is not None:
            _check_base(base, prober.base)
        todo = [(b, u) for b in widths for u in units if u not in done.get(b, {})]
        if dist is not None and dist.active:
            n_blocks = len(prober.layers)       # a probe recomputes blocks start .. L-1 + head
            rounds = dist.rounds(todo, {p: n_blocks - units[p[1]][0] + 1 for p in todo},
                                 "sensitivity")
        else:
            rounds = [[p] for p in todo]
        it = rounds
        if progress:
            it = tqdm(rounds, desc=f"sensitivity ({probe_name} {'/'.join(map(str, widths))}-bit "
                                   f"probes)", unit="probe")
        for r in it:
            if dist is None or not dist.active:
                got = {p: _probe_unit(prober, mods, units, *p, group_size, mode, probe_weights)
                       for p in r}
            else:
                with dist.guard(f"sensitivity probe {r[0] if r else '(idle)'}"):
                    got = {p: _probe_unit(prober, mods, units, *p, group_size, mode,
                                          probe_weights) for p in r}
                got = {p: v for part in dist.gather(got, "sensitivity results")
                       for p, v in part.items()}
            for p in sorted(got, key=todo.index):
                b, u = p
                delta[b][u], items[b][u], nll = got[p]
                if nll is not None:
                    nll_items[b][u] = nll
                if on_result is not None:
                    on_result(b, u, *got[p][:2])
    # in the units' order, however the ranks' rounds delivered them
    delta = {b: {u: delta[b][u] for u in units if u in delta[b]} for b in widths}
    items = {b: {u: items[b][u] for u in units if u in items[b]} for b in widths}
    out = {"base": prober.base, "base_items": {k: v.tolist() for k, v in prober.base_items.items()},
           "tokens": {k: v.tolist() for k, v in prober.tokens.items()},
           "delta": delta, "items": items, "seconds": time.perf_counter() - t0}
    if scoring == "kl":
        out["nll_items"] = {b: {u: nll_items[b][u] for u in units if u in nll_items[b]}
                            for b in widths}
    return out


def probe_spec(lin: nn.Linear, bits: int, group_size: int, mode: str) -> LayerSpec:
    """The uniform ``bits``-wide spec a probe quantizes ``lin`` with (group size: the largest
    multiple of 32 <= ``group_size`` dividing its K, :func:`tasa.quant.resolve_group_size`)."""
    G = resolve_group_size(lin.in_features, group_size)
    return LayerSpec([bits] * (lin.in_features // G), G, mode)


def _probe_unit(prober, mods, units, bits, u, group_size, mode, probe_weights=None) -> tuple:
    """``(loss increase per objective, summed NLL increase per item per objective)`` with unit
    ``u`` alone quantized at ``bits`` (RTN, or ``probe_weights[(bits, fqn)]``)."""
    start, fqns = units[u]
    lins = []
    for f in fqns:
        m = mods.get(f)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"tasa: sensitivity unit {u!r}: {f!r} is not an nn.Linear")
        lins.append(m)
    specs = [probe_spec(lin, bits, group_size, mode) for lin in lins]
    ws = None
    if probe_weights is not None:
        missing = [f for f in fqns if (bits, f) not in probe_weights]
        if missing:
            raise KeyError(f"tasa: sensitivity unit {u!r}: no {bits}-bit probe weight for "
                           f"{missing[:3]}")
        ws = [probe_weights[(bits, f)] for f in fqns]
    got = prober.probe(start, lins, specs, ws)
    # NLL: the increase over the baseline; KL: already a divergence from it
    di = {k: got[k] if prober.scoring == "kl" else got[k] - prober.base_items[k] for k in got}
    d = {k: float(v.sum() / prober.tokens[k].sum()) for k, v in di.items()}
    # KL scoring: the same pass's gold-NLL increases too (None with NLL scoring: they are ``di``)
    nll = ({k: (prober.last_nll[k] - prober.base_items[k]).tolist() for k in got}
           if prober.scoring == "kl" else None)
    return d, {k: v.tolist() for k, v in di.items()}, nll
