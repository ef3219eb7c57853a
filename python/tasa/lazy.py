"""Models larger than memory: the skeleton on the meta device, one decoder block at a time.

:func:`quantize_lazy` quantizes a transformers checkpoint folder (safetensors, one file or a
sharded ``model.safetensors.index.json``) without ever holding the model:

1. the model is built on the ``meta`` device (no storage) from the folder's ``config.json``;
2. the modules outside the decoder blocks that the capture needs (the input embedding, the
   final norm; rotary tables are recomputed, they are not in a checkpoint) are read with
   ``safe_open`` (only their tensors) and released to ``meta`` as soon as the hidden states
   entering block 0 are captured; the ``lm_head`` is never materialized (its tensor is copied
   from the source file to the output at the end);
3. for block ``l``: its tensors are read from the checkpoint (``load_state_dict(assign=True)``:
   no second copy), its Hessians accumulated, the block quantized (GPTQ through
   :func:`tasa.modelquant.quantize_model`, or RTN), its outputs recomputed for block ``l+1``, then
   the quantized block is written as its own shard ``model-000{l+1}-of-...safetensors`` and the
   block goes back to ``meta``;
4. the non-block tensors are copied into the last shard, then ``model.safetensors.index.json``,
   then ``config.json`` (the tasa ``quantization_config`` with the sha256 of every shard) last:
   a kill before the end leaves a folder that does not claim a model.

Peak host memory: one block in full precision + its quantized copy + its Hessians and GPTQ's
temporaries + the calibration activations (measured factor over one fp32 block: see
tests/test_lazy.py and benchmarks/results/scale.md). The result loads with :func:`tasa.load` /
``from_pretrained`` like any tasa folder.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from . import calib, defaults
from .modelquant import quantize_embeddings, quantize_model
from .hf import TasaConfig, tensor_hashes
from .storage import (HF_CONFIG_NAME, WEIGHTS_NAME, check_output_folder, config_with_checksums,
                 retire_model)
from .quant import LayerSpec, get_method
from .util import atomic_write_bytes, fault_point, folder_lock, read_json

__all__ = ["Checkpoint", "skeleton", "materialize", "release", "quantize_lazy", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of a checkpoint folder by name, read on demand (``safe_open`` maps the file
    and copies only the tensors asked for)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        idx = self.folder / INDEX_NAME
        if idx.is_file():
            wm = read_json(idx, "safetensors index").get("weight_map", {})
            self.files = {k: self.folder / v for k, v in wm.items()}
        elif (self.folder / WEIGHTS_NAME).is_file():
            with safe_open(str(self.folder / WEIGHTS_NAME), framework="pt") as f:
                self.files = {k: self.folder / WEIGHTS_NAME for k in f.keys()}
        else:
            raise FileNotFoundError(f"tasa: {self.folder} has neither {WEIGHTS_NAME} nor "
                                    f"{INDEX_NAME} (lazy loading reads safetensors only)")

    def keys(self):
        return self.files.keys()

    def linear_shapes(self, names) -> Dict[str, tuple]:
        """``{name: (n_out, k_in)}`` of the linears ``names`` from the files' headers (no
        tensor is read)."""
        out = {}
        for n in names:
            key = f"{n}.weight"
            if key not in self.files:
                raise KeyError(f"tasa: {key!r} is not in the checkpoint {self.folder}")
            with safe_open(str(self.files[key]), framework="pt") as f:
                out[n] = tuple(int(x) for x in f.get_slice(key).get_shape())
        return out

    def read(self, names) -> Dict[str, torch.Tensor]:
        """``{name: tensor}`` for ``names`` (each file opened once)."""
        by_file: Dict[Path, list] = {}
        for n in names:
            if n not in self.files:
                raise KeyError(f"tasa: tensor {n!r} is not in the checkpoint {self.folder}")
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, ns in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for n in ns:
                    out[n] = f.get_tensor(n)
        return out


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside goes to the meta device; buffers stay real. Why not
    ``with torch.device("meta")``: non-persistent buffers (rotary tables, Gemma3's embedding
    scale) are computed in ``__init__`` and are in no checkpoint. A parameter's own
    ``torch.empty`` before the move is never touched, so it costs no resident memory."""
    orig = nn.Module.register_parameter

    def register(module, name, param):
        orig(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def skeleton(folder, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``folder/config.json`` with its parameters on the meta device (no storage)
    and its buffers real."""
    config = AutoConfig.from_pretrained(str(folder))
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def materialize(module: nn.Module, ckpt: Checkpoint, prefix: str, dtype: torch.dtype,
                skip=()) -> None:
    """Loads ``module``'s tensors (``prefix.<name>`` in the checkpoint) onto the CPU, floating
    ones cast to ``dtype``. ``skip``: local names of submodules left on meta."""
    pre = f"{prefix}." if prefix else ""
    sd = module.state_dict(keep_vars=True)
    wanted = [k for k in sd if not any(k == s or k.startswith(s + ".") for s in skip)]
    have = set(ckpt.keys())
    missing = [k for k in wanted if pre + k not in have]
    present = [k for k in wanted if pre + k in have]
    tensors = ckpt.read([pre + k for k in present])
    state = {}
    for k in present:
        t = tensors[pre + k]
        state[k] = t.to(dtype) if t.is_floating_point() else t
    module.load_state_dict(state, strict=False, assign=True)
    # tied weights (lm_head = embed) are absent from the file and may stay on meta; anything
    # else still on meta is a tensor the checkpoint lacks
    tied = {k for k in missing if any(sd[k] is sd[j] for j in present)}
    if [k for k in missing if k not in tied and k.split(".")[0] not in skip]:
        raise ValueError(f"tasa: the checkpoint {ckpt.folder} lacks "
                         f"{[pre + k for k in missing if k not in tied][:8]}")


def release(module: nn.Module) -> None:
    """Parameters and persistent buffers back to the meta device: their storage is freed (the
    module keeps its structure; non-persistent buffers, small, stay)."""
    for sub in module.modules():
        for n, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[n] = type(p)(p.to("meta"), requires_grad=p.requires_grad)
        for n, b in list(sub._buffers.items()):
            if b is not None and n not in sub._non_persistent_buffers_set:
                sub._buffers[n] = b.to("meta")


_M_MMAP_THRESHOLD = -3          # glibc mallopt parameter


def _bound_heap() -> None:
    """Allocations of 1 MiB and more get their own mmap, returned to the OS when freed (glibc
    ``mallopt(M_MMAP_THRESHOLD)``; process-wide). Why: by default glibc raises its mmap
    threshold after large frees, so the next block's tensors come from the heap, which only
    grows: measured on 6 blocks of 42 MB, the resident set's peak rose block after block to
    +354 MB (+326 MB with a ``malloc_trim`` after each block) against +203 MB with this."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):      # not glibc: nothing to do
        pass


def _save_shard(tensors: Mapping[str, torch.Tensor], path: Path) -> int:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt", **tensor_hashes(tensors)})
    os.replace(tmp, path)
    return sum(v.numel() * v.element_size() for v in tensors.values())


def _quantize_rest_embeddings(model: nn.Module, tensors: Dict[str, torch.Tensor], bits: int,
                              group_size: int, mode: str,
                              head_bits: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The checkpoint's embedding (and untied head) tensors replaced by their packed buffers,
    the modules of ``model`` swapped as :func:`tasa.modelquant.quantize_embeddings` swaps them."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    ename = names[id(emb)]
    ekey = f"{ename}.weight"
    if ekey not in tensors:
        raise ValueError(f"tasa: the checkpoint has no {ekey}; cannot quantize the embedding "
                         f"(use --embed-bits 0)")
    emb.weight = nn.Parameter(tensors.pop(ekey), requires_grad=False)
    hname = names.get(id(head)) if head is not None else None
    if hname is not None:
        hkey = f"{hname}.weight"
        # absent from the file: tied to the embedding (transformers writes tied tensors once)
        head.weight = (nn.Parameter(tensors.pop(hkey), requires_grad=False) if hkey in tensors
                       else emb.weight)
    quantize_embeddings(model, bits, group_size, mode, head_bits)
    for n in filter(None, (ename, hname)):
        for k, v in model.get_submodule(n).state_dict().items():
            tensors[f"{n}.{k}"] = v
    return tensors


def quantize_lazy(folder, plan: Mapping[str, LayerSpec], out, method: str = defaults.METHOD,
                  calib_ids: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                  damp: float = 0.01, batch_size: int = 8, meta: Optional[dict] = None,
                  progress: bool = True, dist=None, embed_bits: Optional[int] = 0,
                  group_size: int = 128, mode: str = "asym",
                  head_bits: Optional[int] = None, lock: bool = True) -> dict:
    """Quantizes the checkpoint ``folder`` per ``plan`` block by block (module docstring) into
    the transformers folder ``out``. ``embed_bits`` / ``head_bits`` (embed_bits 0, the default
    here: as stored; None: the measured defaults of the job): the token embedding and the
    output projection RTN-quantized last, as :func:`tasa.modelquant.quantize_embeddings` does in
    memory (``group_size`` / ``mode`` of that table). ``method``: a name of
    :data:`tasa.quant.METHODS` (one that needs a Hessian, ``"gptq"``, needs ``calib_ids``,
    int64 [n, T]). ``dist``: a :class:`tasa.distributed.Dist` (GPTQ data parallel as in
    :func:`tasa.modelquant.quantize_model`; every rank reads each block, rank 0 alone writes).
    ``lock``: take the output folder's lock (False: the caller holds it). Returns
    ``{"seconds", "block_seconds", "shards", "errors"}``."""
    if get_method(method).needs_hessian and calib_ids is None:
        raise ValueError(f"tasa: {method} needs calibration token ids (calib_ids)")
    folder, out = Path(folder), Path(out)
    if out.resolve() == folder.resolve():
        raise ValueError(f"tasa: --out {out} is the model folder; choose another")
    t0 = time.perf_counter()
    _bound_heap()
    ckpt = Checkpoint(folder)
    model = skeleton(folder, dtype)
    layers, prefix = calib.decoder_layers(model)
    L = len(layers)
    bad = [n for n in plan if not n.startswith(prefix + ".")]
    if bad:
        raise ValueError(f"tasa: lazy quantization covers decoder-block linears only; the plan "
                         f"names {bad[:5]}")
    writer = dist is None or not dist.active or dist.is_writer
    if writer:
        check_output_folder(out)
    n_shards = L + 1
    shard = lambda i: f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"   # noqa: E731
    weight_map: Dict[str, str] = {}
    total = 0
    block_seconds = []
    errors: dict = {}
    # the job (tasa.pipeline.run_lazy) holds the folder lock as tasa.pipeline.run does, and says
    # lock=False; a direct call takes it here
    with (folder_lock(out) if writer and lock else contextlib.nullcontext()):
        if writer:
            retire_model(out)
        # what the capture needs: everything but the blocks and the head
        base = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
        base_name = prefix.rpartition(".")[0]
        materialize(base, ckpt, base_name, dtype, skip=[prefix.rpartition(".")[2]])
        state = {"t": time.perf_counter()}

        def on_enter(li):
            if li == 0:            # block 0's input is captured: the embedding is done with
                for n, m in base.named_children():
                    if n != prefix.rpartition(".")[2]:
                        release(m)
            state["t"] = time.perf_counter()
            materialize(layers[li], ckpt, f"{prefix}.{li}", dtype)

        def on_leave(li, block):
            nonlocal total
            sd = {f"{prefix}.{li}.{k}": v for k, v in block.state_dict().items()}
            if writer:
                total += _save_shard(sd, out / shard(li))
            weight_map.update({k: shard(li) for k in sd})
            release(block)
            block_seconds.append(time.perf_counter() - state["t"])
            fault_point("lazy:block")

        res = quantize_model(model, plan, method, calib_ids=calib_ids, damp=damp,
                             batch_size=batch_size, progress=progress, dist=dist,
                             block_hooks={"on_enter": on_enter, "on_leave": on_leave})
        errors = res["errors"]
        if not writer:
            return {"seconds": time.perf_counter() - t0, "block_seconds": block_seconds,
                    "shards": n_shards, "errors": errors}
        # the rest (embedding, final norm, head), copied from the source as stored, except the
        # embedding and head when they are quantized
        rest = [k for k in ckpt.keys() if not k.startswith(prefix + ".")]
        tensors = ckpt.read(rest)
        if embed_bits != 0:
            tensors = _quantize_rest_embeddings(model, tensors, embed_bits, group_size, mode,
                                                head_bits)
        total += _save_shard(tensors, out / shard(L))
        weight_map.update({k: shard(L) for k in tensors})
        del tensors
        names = {shard(i) for i in range(n_shards)}
        for f in out.glob("*.safetensors"):          # an earlier run's files would lack checksums
            if f.name not in names:
                f.unlink()
        atomic_write_bytes(out / INDEX_NAME, json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2).encode())
        for f in folder.iterdir():                   # tokenizer, generation config
            if (f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt")
                    and f.name not in (HF_CONFIG_NAME, INDEX_NAME) and not f.name.startswith(".")):
                shutil.copyfile(f, out / f.name)
        model.config.quantization_config = TasaConfig.for_model(
            model, plan, meta={"method": method, "lazy": True, "base_model": str(folder),
                               **(meta or {})})
        manifest = config_with_checksums(json.loads(model.config.to_json_string(use_diff=False)),
                                         out, names)
        fault_point("save:before-config")
        atomic_write_bytes(out / HF_CONFIG_NAME, manifest)
    return {"seconds": time.perf_counter() - t0, "block_seconds": block_seconds,
            "shards": n_shards, "errors": errors}
