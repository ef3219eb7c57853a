"""The whole-model quantization driver: feeds the per-matrix quantizers of :mod:`tasa.quant`
(RTN, GPTQ) one decoder block at a time through :mod:`tasa.calib`'s block-wise capture and swaps
the results in as :class:`tasa.layers.TasaLinear` (as gptq's ``llama.py`` feeds ``GPTQ.add_batch`` /
``fasterquant``).
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

import tasa_ext

from . import calib, defaults
from .layers import TasaEmbedding, TasaLinear, TasaTiedHead, set_module
from .quant import LayerSpec, get_method, output_error, quantize_rtn, resolve_group_size

__all__ = ["quantize_model", "quantize_embeddings", "embedding_widths", "whole_model_estimate"]


def quantize_model(model: nn.Module, plan: Mapping[str, LayerSpec], method: str = defaults.METHOD,
                   calib_ids: Optional[torch.Tensor] = None, src: Optional[torch.Tensor] = None,
                   n_sources: int = 1,
                   combine: Optional[Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                   damp: float = 0.01, batch_size: int = 8, progress: bool = True,
                   dist=None, block_hooks: Optional[Mapping[str, Callable]] = None) -> dict:
    """Quantizes the linears named in ``plan`` in place (swapped to :class:`tasa.layers.TasaLinear`).

    ``method``: a name of :data:`tasa.quant.METHODS`. A data-free method (``"rtn"``) needs no
    data (with ``block_hooks``, it walks the decoder blocks in order as the lazy job needs). A
    method that ``needs_hessian`` (``"gptq"``) runs GPTQ's sequential scheme through
    :func:`tasa.calib.run_blockwise`: one decoder block at a time, Hessians from the inputs the
    block receives from the *already quantized* previous blocks. ``src`` (int64 [n], one source
    id per calibration sequence, ``n_sources`` sources) accumulates one Hessian per source;
    ``combine(name, H [S,K,K], count [S]) -> H [K,K]`` merges them (default: the token-weighted
    mean, i.e. the pooled Hessian). Returns ``{"seconds", "layers", "errors"}`` where
    ``errors[name]`` is :func:`output_error` against the block's Hessian (GPTQ only).
    ``dist``: a :class:`tasa.distributed.Dist` (GPTQ data parallel over its ranks: this rank's
    batches of ``calib_ids``, Hessians all-reduced, a block's linears divided among the ranks
    and the packed results broadcast); None or a one-process Dist: all here. ``block_hooks``:
    ``on_enter`` / ``on_leave`` of :func:`tasa.calib.run_blockwise` (:mod:`tasa.lazy` loads,
    writes and releases one block at a time there).
    """
    t0 = time.perf_counter()
    errors = {}
    meth = get_method(method)
    if not meth.needs_hessian:
        mods = dict(model.named_modules())
        missing = [k for k in plan if k not in mods]
        if missing:
            raise KeyError(f"tasa: plan names modules not in the model: {missing[:5]}")
        if block_hooks:         # the lazy job: one block in memory at a time, in order
            layers, prefix = calib.decoder_layers(model)
            for li, blk in enumerate(layers):
                block_hooks["on_enter"](li)
                for lname, lin in list(blk.named_modules()):
                    full = f"{prefix}.{li}.{lname}"
                    if full in plan and isinstance(lin, nn.Linear):
                        set_module(blk, lname, TasaLinear.from_linear(lin, plan[full], meth.name,
                                                                      damp=damp, name=full))
                block_hooks["on_leave"](li, blk)
        else:
            it = list(plan.items())
            if progress:
                it = tqdm(it, desc=meth.name.upper(), unit="layer")
            for name, spec in it:       # the one data-free construction: TasaLinear.from_linear
                set_module(model, name, TasaLinear.from_linear(mods[name], spec, meth.name,
                                                               damp=damp, name=name))
    else:
        if calib_ids is None:
            raise ValueError(f"tasa: {meth.name} needs calibration token ids (calib_ids)")

        def default_combine(name, H, count):
            if H.shape[0] == 1:     # the same value without three float64 K x K temporaries
                return H[0]
            w = count.double() / count.sum().clamp(min=1)
            return (H.double() * w[:, None, None]).sum(0).float()

        comb = combine or default_combine

        def quantize_one(block, lname, full, H, count):
            lin = block.get_submodule(lname)
            Hc = comb(full, H, count)
            q = meth.quantize(lin.weight, plan[full], Hc, damp=damp, name=full)
            errors[full] = output_error(lin.weight, q.dequantize(), Hc)
            set_module(block, lname, TasaLinear.from_quantized(q, lin.bias))

        def on_block(idx, block, prefix, hessians):
            local = {f"{prefix}.{lname}": lname for lname in hessians
                     if f"{prefix}.{lname}" in plan}
            if dist is None or not dist.active:
                for full, lname in local.items():
                    quantize_one(block, lname, full, *hessians[lname])
                return True
            # data parallel: GPTQ costs ~ N K^2 (Cholesky, column loop); owners broadcast
            cost = {f: block.get_submodule(l).out_features * block.get_submodule(l).in_features ** 2
                    for f, l in local.items()}
            owner = dist.assign(cost, "gptq")
            with dist.guard(f"GPTQ of {prefix}"):
                for full, lname in local.items():
                    if owner[full] == dist.rank:
                        quantize_one(block, lname, full, *hessians[lname])
            dist.share_quantized(block, owner, plan, local)
            for errs in dist.gather({f: errors[f] for f in local if f in errors}, "GPTQ errors"):
                errors.update(errs)
            return True

        wanted = set(plan)
        kw = dict(block_hooks or {})
        if dist is not None and dist.active:
            calib_ids, src = dist.shard(calib_ids, src, batch_size)
            kw["reduce"] = dist.reduce_hessians
        calib.run_blockwise(model, calib_ids, on_block, src=src, n_sources=n_sources,
                            batch_size=batch_size, progress=progress,
                            linear_filter=lambda full: full in wanted, **kw)
        # linears outside the decoder blocks named in the plan (rare): RTN
        mods = dict(model.named_modules())
        for name, spec in plan.items():
            if isinstance(mods.get(name), nn.Linear) and name not in errors:
                raise ValueError(f"tasa: {name} is not inside a decoder block; {meth.name} "
                                 f"quantizes decoder-block linears only (use a data-free method "
                                 f"such as 'rtn' for it)")
    return {"seconds": time.perf_counter() - t0, "layers": len(plan), "errors": errors}


def _untie(model: nn.Module, head_name: str) -> None:
    """Drops the tie of the output projection to the input embedding from the config (both
    are stored and loaded by tasa as the modules it swapped in; transformers must not try to
    tie a ``weight`` they no longer have)."""
    for cfg in {id(model.config): model.config,
                id(model.config.get_text_config()): model.config.get_text_config()}.values():
        cfg.tie_word_embeddings = False
    if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
        model.all_tied_weights_keys = {k: v for k, v in model.all_tied_weights_keys.items()
                                       if not k.startswith(head_name + ".")}


def embedding_widths(model: nn.Module, embed_bits: Optional[int] = None,
                     head_bits: Optional[int] = None) -> tuple:
    """``(tied, embedding width, head width)`` for ``--embed-bits`` / ``--head-bits`` (None: the
    measured defaults, defaults.HEAD_BITS for the head and a table tied to it,
    defaults.UNTIED_EMBED_BITS for an untied input embedding; embed_bits 0: both as stored,
    widths 0). A tied table has one width: given both, they must agree."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = (isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding)
            and head.weight.data_ptr() == emb.weight.data_ptr())
    if embed_bits == 0:
        return tied, 0, 0
    if tied:
        if embed_bits is not None and head_bits is not None and embed_bits != head_bits:
            raise ValueError(f"tasa: the output projection is tied to the input embedding (one "
                             f"table): --head-bits {head_bits} cannot differ from --embed-bits "
                             f"{embed_bits}")
        w = embed_bits if embed_bits is not None else (
            head_bits if head_bits is not None else defaults.HEAD_BITS)
        return tied, int(w), int(w)
    return (tied, int(embed_bits if embed_bits is not None else defaults.UNTIED_EMBED_BITS),
            int(head_bits if head_bits is not None else defaults.HEAD_BITS))


def quantize_embeddings(model: nn.Module, bits: Optional[int] = None, group_size: int = 128,
                        mode: str = "asym", head_bits: Optional[int] = None) -> dict:
    """RTN-quantizes the token embedding and the output projection in place and returns what
    ``TasaConfig.embedding`` records: ``{"module", "head", "tied", "bits", "group_size", "mode",
    "embed_scale", "avg_bits", "head_bits"}`` (``head``: the output projection's name; with
    ``tied`` it is a :class:`TasaTiedHead` over the same packed table, else a TasaLinear at
    ``head_bits``); widths from :func:`embedding_widths` (``bits``, ``head_bits`` None: the
    measured defaults).

    Why: the embedding and head were full precision and most of a small model's file
    (SmolLM2-135M: 113 of 160 MB fp32), and at batch 1 the fp32 head is most of the bytes
    read per token. RTN because they are outside the decoder blocks GPTQ calibrates; the
    quality cost of each width is measured in benchmarks/results/embed_bits.md."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"tasa: the input embedding is a {type(emb).__name__}, not an "
                         f"nn.Embedding (already quantized?)")
    names = {id(m): n for n, m in model.named_modules()}
    ename = names[id(emb)]
    tied, bits, hb = embedding_widths(model, bits, head_bits)
    if not bits:
        raise ValueError("tasa: quantize_embeddings with width 0 (keep as stored) has nothing "
                         "to do")
    V, K = emb.weight.shape
    G = resolve_group_size(K, group_size)
    spec = LayerSpec([int(bits)] * (K // G), G, mode)
    scale = getattr(emb, "embed_scale", None)
    scale = None if scale is None else float(torch.as_tensor(scale).float())
    q = quantize_rtn(emb.weight, spec, name=ename)
    new = TasaEmbedding.from_quantized(q, embed_scale=scale, out_dtype=emb.weight.dtype)
    set_module(model, ename, new)
    hname = None
    if isinstance(head, nn.Linear):
        hname = names[id(head)]
        if tied:
            set_module(model, hname, TasaTiedHead(new))
        else:
            hq = quantize_rtn(head.weight, LayerSpec([hb] * (K // G), G, mode), name=hname)
            set_module(model, hname, TasaLinear.from_quantized(hq, head.bias))
        _untie(model, hname)
    return {"module": ename, "head": hname, "tied": bool(tied), "bits": int(bits),
            "group_size": G, "mode": mode, "embed_scale": scale,
            "avg_bits": new.average_bits(), "head_bits": hb if isinstance(head, nn.Linear) else None}


def whole_model_estimate(model: nn.Module, plan: Mapping[str, LayerSpec],
                         embed_bits: Optional[int] = None,
                         group_size: int = 128, mode: str = "asym",
                         head_bits: Optional[int] = None) -> dict:
    """What the file of ``model`` quantized per ``plan`` (and ``embed_bits``, 0: as stored)
    will weigh, from exact format costs, before anything is quantized: ``{"params", "bytes",
    "bits_per_param"}`` over every parameter (each stored tensor once: a tied head is the
    embedding). The saved folder's :func:`tasa.storage.model_size` counts the file itself (plus its
    header, a few kB)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    _, ew, hw = embedding_widths(model, embed_bits, head_bits)
    widths = {id(emb.weight): ew} if isinstance(emb, nn.Embedding) else {}
    if isinstance(head, nn.Linear) and id(head.weight) not in widths:
        widths[id(head.weight)] = hw
    params, bits = 0, 0
    for name, p in model.named_parameters():        # tied parameters once
        mod, _, leaf = name.rpartition(".")
        params += p.numel()
        if leaf == "weight" and mod in plan:
            s = plan[mod]
            bits += tasa_ext.cost_bits(p.shape[0], p.shape[1], s.group_size, s.bits, s.mode,
                                       s.act_order)
        elif widths.get(id(p)) and p.dim() == 2:
            V, K = p.shape
            G = resolve_group_size(K, group_size)
            bits += tasa_ext.cost_bits(V, K, G, [int(widths[id(p)])] * (K // G), mode)
        else:
            bits += p.numel() * p.element_size() * 8
    return {"params": params, "bytes": bits // 8, "bits_per_param": bits / params}
