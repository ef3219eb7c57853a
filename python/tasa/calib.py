"""Calibration capture: GPTQ's block-by-block forward with per-linear Hessian hooks.

Only one decoder block and the calibration activations are in play at a time:

1. A *Catcher* stands in for every decoder block and runs the model once per calibration batch
   with identity blocks: it records the hidden states entering block 0 and, per block, the
   keyword arguments the model passes (attention mask, ``position_embeddings`` (cos, sin),
   ``position_ids``, ``cache_position`` ...). Recording per block matters for Gemma3, whose
   sliding-window and global layers get different masks and rotary embeddings.
2. For block l: forward hooks on its nn.Linear modules accumulate ``H = 2/n sum x x^T`` with
   ``tasa_ext.hessian_accumulate_`` (fp32, GPTQ running mean), one Hessian per source
   (``src`` ids per token row). Linears fed the very same input tensor (q/k/v, gate/up) share
   one accumulation.
3. ``on_block`` (e.g. quantization) may modify the block; if it returns True the block's outputs
   are recomputed, so block l+1 sees the outputs of the *quantized* block l.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

import tasa_ext
from tqdm.auto import tqdm

from .util import flush_denormals

__all__ = ["decoder_layers", "run_blockwise", "collect_hessians"]


def decoder_layers(model: nn.Module):
    """``(layers ModuleList, prefix)`` of a transformers causal LM (LLaMA, Qwen2, Gemma3, ...)."""
    for prefix in ("model.layers", "model.language_model.layers", "transformer.h",
                   "model.decoder.layers", "transformer.layers"):
        try:
            mod = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return mod, prefix
    raise ValueError(f"tasa: cannot find the decoder layers of {type(model).__name__}")


# attributes of a decoder block that some models read while looping over the blocks (Gemma3:
# the attention type picks the mask); a stand-in for a block must carry them too
_BLOCK_ATTRS = ("attention_type", "layer_type", "is_sliding", "sliding_window")


def copy_block_attrs(stand_in: nn.Module, block: nn.Module) -> None:
    for attr in _BLOCK_ATTRS:
        if hasattr(block, attr):
            setattr(stand_in, attr, getattr(block, attr))


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, inner: nn.Module, idx: int, last: bool, store: dict):
        super().__init__()
        self.inner = inner
        self.idx = idx
        self.last = last
        self.store = store
        copy_block_attrs(self, inner)

    def forward(self, hidden_states, *args, **kwargs):
        if self.idx == 0:
            self.store["hidden"] = hidden_states.detach()
        if args:
            raise ValueError("tasa: decoder block called with positional arguments beyond the "
                             "hidden states; not supported by the Catcher")
        self.store["kwargs"][self.idx] = kwargs
        if self.last:
            raise _Stop
        return hidden_states


def _capture(model, layers, input_ids: torch.Tensor, batch_size: int):
    """Hidden states entering block 0 (list per batch) and per-batch, per-block kwargs."""
    originals = list(layers)
    hidden, kw = [], []
    try:
        for b0 in range(0, input_ids.shape[0], batch_size):
            store = {"kwargs": {}}
            for i, blk in enumerate(originals):
                layers[i] = _Catcher(blk, i, i == len(originals) - 1, store)
            try:
                model(input_ids=input_ids[b0:b0 + batch_size], use_cache=False)
            except _Stop:
                pass
            hidden.append(store["hidden"])
            kw.append(store["kwargs"])
    finally:
        for i, blk in enumerate(originals):
            layers[i] = blk
    return hidden, kw


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_blockwise(model: nn.Module, input_ids: torch.Tensor,
                  on_block: Optional[Callable] = None, src: Optional[torch.Tensor] = None,
                  n_sources: int = 1, batch_size: int = 8, progress: bool = True,
                  linear_filter: Optional[Callable[[str], bool]] = None,
                  hessian_device=None, reduce: Optional[Callable[[dict], dict]] = None,
                  on_enter: Optional[Callable[[int], None]] = None,
                  on_leave: Optional[Callable[[int, nn.Module], None]] = None) -> None:
    """Runs the calibration ``input_ids`` (int64 [n, T]) block by block.

    For each decoder block with prefix ``p`` (e.g. ``model.layers.3``) the Hessians of its
    nn.Linear modules are accumulated (``linear_filter(full_name)`` selects which) and
    ``on_block(idx, block, p, hessians)`` is called with ``hessians[local_name] = (H f32 [S,K,K],
    count i64 [S])``; ``S = n_sources`` and ``src`` (int64 [n], per sequence) says which source
    each sequence belongs to. If ``on_block`` returns True the block was changed and its outputs
    are recomputed before the next block.

    ``reduce`` (data parallel, :mod:`tasa.distributed`): each batch's Hessians are turned into
    float64 sums ``count_b H_b`` and added up, and ``reduce({name: (S f64, count)})`` returns
    the Hessians ``{name: (H f32, count)}`` handed to ``on_block`` (all ranks' batches summed).
    ``on_enter(idx)`` / ``on_leave(idx, block)`` run before a block is used / after its outputs
    are final (:mod:`tasa.lazy` materializes and releases blocks there).
    """
    with torch.no_grad(), flush_denormals():
        _run_blockwise(model, input_ids, on_block, src, n_sources, batch_size, progress,
                       linear_filter, hessian_device, reduce, on_enter, on_leave)


def _add_batch_sums(hs: dict, sums: dict) -> None:
    """``sums[name] += (count_b H_b in float64, count_b)`` for one batch's running means ``hs``
    (a 24-bit mantissa times an integer: exact in float64); ``hs`` is emptied."""
    for name, (H, cnt) in hs.items():
        if name not in sums:
            sums[name] = (torch.zeros(H.shape, dtype=torch.float64, device=H.device),
                          torch.zeros_like(cnt))
        S, total = sums[name]
        for s in range(H.shape[0]):       # in place: no float64 K x K temporaries (8B: 1.6 GB)
            S[s].add_(H[s], alpha=float(cnt[s]))
        total += cnt
    hs.clear()


def _run_blockwise(model, input_ids, on_block, src, n_sources, batch_size, progress,
                   linear_filter, hessian_device, reduce=None, on_enter=None, on_leave=None):
    layers, prefix = decoder_layers(model)
    n, T = input_ids.shape
    if src is None:
        src = torch.zeros(n, dtype=torch.int64)
    if src.shape != (n,) or (src.numel() and (int(src.min()) < 0 or int(src.max()) >= n_sources)):
        raise ValueError(f"tasa: src must be int64 [n={n}] with ids in [0, {n_sources})")
    dev = next(model.parameters()).device
    input_ids = input_ids.to(dev)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    hidden, kwargs = _capture(model, layers, input_ids, batch_size)
    if use_cache is not None:
        model.config.use_cache = use_cache
    batch_src = [src[b0:b0 + batch_size].repeat_interleave(T).to(dev)
                 for b0 in range(0, n, batch_size)]
    it = range(len(layers))
    if progress:
        it = tqdm(it, desc="blocks", unit="block")
    for li in it:
        if on_enter is not None:
            on_enter(li)
        block = layers[li]
        full_prefix = f"{prefix}.{li}"
        lins = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)
                and (linear_filter is None or linear_filter(f"{full_prefix}.{name}"))}
        hs: dict = {}
        owner: dict = {}          # linear -> name whose accumulation it shares
        state = {"last": None, "last_name": None, "src": None}

        def make_hook(name):
            def hook(mod, inp, out):
                x = inp[0]
                if x is state["last"]:
                    owner.setdefault(name, state["last_name"])
                    return
                state["last"], state["last_name"] = x, name
                if owner.get(name, name) != name:
                    return
                owner[name] = name
                K = x.shape[-1]
                if name not in hs:
                    hdev = hessian_device or x.device
                    hs[name] = (torch.zeros(n_sources, K, K, dtype=torch.float32, device=hdev),
                                torch.zeros(n_sources, dtype=torch.int64, device=hdev))
                H, cnt = hs[name]
                xs = x.reshape(-1, K)
                s = state["src"] if n_sources > 1 else None
                tasa_ext.hessian_accumulate_(H, xs.to(H.device), None if s is None else s.to(H.device), cnt)
            return hook

        handles = [m.register_forward_hook(make_hook(name)) for name, m in lins.items()]
        outs = []
        sums: dict = {}
        try:
            for bi, h in enumerate(hidden):
                state["last"], state["src"] = None, batch_src[bi]
                outs.append(_block_out(block(h, **kwargs[bi][li])))
                if reduce is not None:
                    _add_batch_sums(hs, sums)
        finally:
            for hd in handles:
                hd.remove()
            state["last"] = None
        if reduce is not None:
            hs = reduce(sums)
            del sums
        hessians = {name: hs[owner.get(name, name)] for name in lins if owner.get(name, name) in hs}
        changed = on_block(li, block, full_prefix, hessians) if on_block is not None else False
        del hessians, hs
        if changed:
            outs = [_block_out(block(h, **kwargs[bi][li])) for bi, h in enumerate(hidden)]
        hidden = outs
        if on_leave is not None:
            on_leave(li, layers[li])


def collect_hessians(model: nn.Module, input_ids: torch.Tensor, src: Optional[torch.Tensor] = None,
                     n_sources: int = 1, batch_size: int = 8, progress: bool = True,
                     linear_filter: Optional[Callable[[str], bool]] = None) -> dict:
    """Hessians of every decoder-block linear of an unmodified model:
    ``{full_name: (H f32 [S,K,K], count i64 [S])}`` (shared tensors for linears that read the
    same input, e.g. q/k/v)."""
    result = {}

    def on_block(idx, block, prefix, hessians):
        for name, hc in hessians.items():
            result[f"{prefix}.{name}"] = hc
        return False

    run_blockwise(model, input_ids, on_block, src=src, n_sources=n_sources,
                  batch_size=batch_size, progress=progress, linear_filter=linear_filter)
    return result
