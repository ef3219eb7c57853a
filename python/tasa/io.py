"""Saving and loading quantized models: safetensors + a JSON config, never pickle.

A saved model is a folder:

* ``model.safetensors``   the full state dict (packed TasaLinear buffers, full-precision rest);
  tensors that share storage (tied embeddings / lm_head) are stored once, the aliases listed in
  the JSON
* ``tasa_config.json``     ``format_version`` (tasa_ext.FORMAT_VERSION), the plan
  (name -> bits per group, group size, mode, act-order), the transformers model config, where
  the base model came from, free-form ``meta`` (method, calibration ...)
* tokenizer files (when a tokenizer is given)

Every file is written to a temporary name and moved into place with ``os.replace``.
:func:`load_quantized` builds a fresh skeleton from the stored config, swaps in empty
TasaLinear modules from the plan and loads the tensors: no re-quantization. A mismatched
format version, missing/unexpected tensors or a shape mismatch is an error naming the problem.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

import tasa_ext

from .nn import swap_linears
from .quant import LayerSpec, plan_from_dict, plan_to_dict
from .util import atomic_write_bytes, write_json_atomic

__all__ = ["save_quantized", "load_quantized", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "tasa_config.json"
WEIGHTS_NAME = "model.safetensors"


def _dedup_state(model: nn.Module):
    """State dict with shared-storage tensors kept once; ``aliases[dropped] = kept``."""
    sd = model.state_dict()
    seen: dict = {}
    out, aliases = {}, {}
    for k, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
            if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = t.detach().contiguous().cpu()
    return out, aliases


def save_quantized(model: nn.Module, path, plan: Mapping[str, LayerSpec], tokenizer=None,
                   base_model: Optional[str] = None, meta: Optional[dict] = None) -> Path:
    """Writes ``model`` (already swapped per ``plan``) to folder ``path``; returns the folder."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedup_state(model)
    cfg = {
        "format_version": tasa_ext.FORMAT_VERSION,
        "plan": plan_to_dict(plan),
        "model_config": model.config.to_dict() if hasattr(model, "config") else None,
        "model_class": type(model).__name__,
        "base_model": base_model,
        "aliases": aliases,
        "meta": meta or {},
    }
    info = getattr(model, "tasa_info", None)
    if info is not None and base_model is None:
        cfg["base_model"] = info.source
    if info is not None and info.prequantized:
        cfg["meta"].setdefault("base_prequantized", info.note())
    atomic_write_bytes(path / WEIGHTS_NAME, save(tensors, metadata={
        "format": "pt", "tasa_format_version": str(tasa_ext.FORMAT_VERSION)}))
    write_json_atomic(path / CONFIG_NAME, cfg, default=str)
    if tokenizer is not None:
        tmp = Path(tempfile.mkdtemp(dir=path, prefix=".tok-"))
        try:
            for f in tokenizer.save_pretrained(str(tmp)):
                f = Path(f)
                if f.is_file():
                    os.replace(f, path / f.name)
        finally:
            for f in tmp.glob("*"):
                f.unlink()
            tmp.rmdir()
    return path


def read_config(path) -> dict:
    """The ``tasa_config.json`` of a saved folder, version-checked."""
    p = Path(path) / CONFIG_NAME
    if not p.is_file():
        raise FileNotFoundError(f"tasa: {p} not found (not a saved tasa model folder?)")
    cfg = json.loads(p.read_text())
    v = cfg.get("format_version")
    if v != tasa_ext.FORMAT_VERSION:
        raise ValueError(f"tasa: {p} has format_version {v}, but this build of tasa_ext reads "
                         f"format_version {tasa_ext.FORMAT_VERSION}; re-quantize or use a "
                         f"matching tasa version")
    return cfg


def _skeleton(cfg: dict, dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = dict(cfg["model_config"])
    model_type = mc.pop("model_type")
    config = AutoConfig.for_model(model_type, **mc)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_quantized(path, model: Optional[nn.Module] = None, dtype: torch.dtype = torch.float32,
                   device="cpu") -> nn.Module:
    """Loads a folder written by :func:`save_quantized`.

    ``model``: an unquantized skeleton to fill (same architecture); by default one is built from
    the stored transformers config. Returns the model in eval mode with ``tasa_plan`` set.
    """
    from safetensors import safe_open

    path = Path(path)
    cfg = read_config(path)
    plan = plan_from_dict(cfg["plan"])
    if model is None:
        if not cfg.get("model_config"):
            raise ValueError(f"tasa: {path} has no model config; pass a model skeleton")
        model = _skeleton(cfg, dtype)
    swap_linears(model, plan, method="skeleton")
    expected = model.state_dict()
    aliases = cfg.get("aliases", {})
    wfile = path / WEIGHTS_NAME
    if not wfile.is_file():
        raise FileNotFoundError(f"tasa: {wfile} not found")
    with safe_open(str(wfile), framework="pt") as f:
        v = (f.metadata() or {}).get("tasa_format_version")
        if v is not None and int(v) != tasa_ext.FORMAT_VERSION:
            raise ValueError(f"tasa: {wfile} has format_version {v}, this build reads "
                             f"{tasa_ext.FORMAT_VERSION}")
        keys = set(f.keys())
        missing = sorted(k for k in expected if k not in keys and k not in aliases)
        unexpected = sorted(k for k in keys if k not in expected)
        if missing or unexpected:
            raise ValueError(f"tasa: {wfile} does not match the model: missing tensors "
                             f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                             f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        state = {}
        for k in keys:
            t = f.get_tensor(k)
            e = expected[k]
            if tuple(t.shape) != tuple(e.shape):
                raise ValueError(f"tasa: tensor {k!r} has shape {tuple(t.shape)} in {wfile} but "
                                 f"the model expects {tuple(e.shape)}")
            if t.dtype != e.dtype and not (t.is_floating_point() and e.is_floating_point()):
                raise ValueError(f"tasa: tensor {k!r} has dtype {t.dtype}, expected {e.dtype}")
            state[k] = t
    for k, src in aliases.items():
        if k in expected and src in state and k not in state:
            state[k] = state[src]
    model.load_state_dict(state, strict=True)
    model.tasa_plan = plan
    model.tasa_config = cfg
    return model.to(device).eval()
