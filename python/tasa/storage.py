"""Saving and loading tasa models: Hugging Face folders (safetensors + config.json), never pickle.

A saved model is a transformers folder, written by ``model.save_pretrained``:

* ``config.json``          the model config with ``quantization_config`` =
  :class:`tasa.hf.TasaConfig` (``quant_method: "tasa"``, version, packing format version, the
  per-module plan, provenance in ``meta``)
* ``model.safetensors``    packed TasaLinear buffers and the full-precision rest (tied tensors
  once, as transformers writes them)
* ``generation_config.json`` and the tokenizer files (when a tokenizer is given)

``quantization_config.checksums`` holds the sha256 of every tensor file, verified before loading.

so, after ``import tasa``, ``AutoModelForCausalLM.from_pretrained(folder)`` loads it (through
:class:`tasa.hf.TasaHfQuantizer`, which checks the tensors against the plan first) and lm-eval's
``HFLM(pretrained=folder)`` evaluates it. :func:`save_quantized` writes into a temporary folder
inside the target and moves the files into place with ``os.replace``, ``config.json`` last: a
reader sees a complete old or new model file, never half of one.

Folders written by earlier tasa versions (``tasa_config.json`` + ``model.safetensors``, the
"layout-1" folders) still load with :func:`load_quantized`; ``tasa convert OLD NEW``
(:func:`convert_legacy`) rewrites one as a transformers folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import tasa_ext

from .hf import QUANT_METHOD, TasaConfig, attach, read_safetensors_header
from .layers import TasaLinear, swap_linears, validate_tables
from .quant import LayerSpec, plan_from_dict
from .util import atomic_write_bytes, fault_point, file_mode, read_json, sha256_file

__all__ = ["ReplacingModel", "save_quantized", "load_quantized", "model_size", "size_line", "convert_legacy", "folder_kind", "retire_model",
           "check_output_folder",
           "HF_CONFIG_NAME",
           "LEGACY_CONFIG_NAME", "WEIGHTS_NAME"]

HF_CONFIG_NAME = "config.json"
LEGACY_CONFIG_NAME = "tasa_config.json"
WEIGHTS_NAME = "model.safetensors"


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=str))


def config_with_checksums(cfg: dict, folder, names) -> bytes:
    """``config.json``'s bytes with the manifest: ``quantization_config.checksums`` = the sha256
    of every tensor file ``names`` in ``folder`` (verified on load). The one writer of the
    manifest, for the in-memory save and the lazy job's shards; the caller writes it last (it
    is what makes a folder a loadable model)."""
    cfg = dict(cfg)
    cfg["quantization_config"] = dict(cfg["quantization_config"])
    cfg["quantization_config"]["checksums"] = {n: sha256_file(Path(folder) / n)
                                               for n in sorted(names)}
    return json.dumps(cfg, indent=2, sort_keys=True).encode()


def save_quantized(model: nn.Module, path, plan: Mapping[str, LayerSpec], tokenizer=None,
                   base_model: Optional[str] = None, meta: Optional[dict] = None) -> Path:
    """Writes ``model`` (already swapped per ``plan``) as a transformers folder ``path`` (module
    docstring); sets ``model.config.quantization_config``. Returns the folder."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"tasa: save_quantized needs a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    meta = dict(meta or {})
    info = getattr(model, "tasa_info", None)
    if base_model is None and info is not None:
        base_model = info.source
    if base_model is not None:
        meta["base_model"] = str(base_model)
    if info is not None and info.prequantized:
        meta.setdefault("base_prequantized", info.note())
    model.config.quantization_config = TasaConfig.for_model(model, plan, meta=_json_safe(meta))
    attach(model)                      # save_pretrained writes every tensor's sha256
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"tasa: {path} exists and is not a folder")
    check_output_folder(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=".save-"))
    try:
        try:
            model.save_pretrained(str(tmp))
        except Exception as e:        # disk full: OSError or safetensors' SafetensorError
            if not (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"):
                raise
            raise ValueError(f"tasa: could not write the model into {path} ({e}); nothing of "
                             f"the model there was replaced") from None
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        cfg_file = tmp / HF_CONFIG_NAME
        atomic_write_bytes(cfg_file, config_with_checksums(
            json.loads(cfg_file.read_text()), tmp, [f.name for f in tmp.glob("*.safetensors")]))
        # an older model's config goes first (the folder stops claiming a model), the new one
        # comes last (it is what makes the folder a loadable model); between the two, a kill
        # leaves a folder that refuses to load, never a mix that loads
        for stale in (path / HF_CONFIG_NAME, path / LEGACY_CONFIG_NAME):
            if stale.exists():
                stale.unlink()
        mode = file_mode()
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == HF_CONFIG_NAME):
            if f.name == HF_CONFIG_NAME:
                fault_point("save:before-config")
            # transformers writes model.safetensors 0600 (a temporary file moved into place);
            # a model folder is shared like any other: the umask's permissions, as config.json
            if f.is_file():
                os.chmod(f, mode)
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def model_size(path) -> dict:
    """Whole-model accounting of a saved folder, as llama.cpp reports a GGUF: the bytes of every
    tensor file (headers included) and bits per parameter over *every* parameter of the model
    (a packed matrix counts its N x K weights, not its int32 words), split into the token
    embedding + output projection, the decoder's quantized linears (what ``--bits`` budgets)
    and the rest (norms, biases, anything stored as is). Returns ``{"file_bytes", "params",
    "bits_per_param", "parts": {part: {"bytes", "params", "bits_per_param"}}}``."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"tasa: {path} has no .safetensors file")
    entries = {k: (v["data_offsets"][1] - v["data_offsets"][0], v["shape"])
               for f in files for k, v in read_safetensors_header(f).items()}
    qc = _quantization_config(path) or {}
    emb = qc.get("embedding") or {}
    packed = dict(qc.get("modules") or {})
    head_names = {emb.get("module"), emb.get("head")} - {None}
    # untied heads and embeddings kept as stored count as "embedding + head" too
    for k in entries:
        if k.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
            head_names.add(k.rpartition(".")[0])
    if emb:
        packed[emb["module"]] = emb
    parts = {p: {"bytes": 0, "params": 0} for p in ("embedding + head", "decoder linears",
                                                      "other")}

    def part_of(mod: str) -> str:
        return "embedding + head" if mod in head_names else (
            "decoder linears" if mod in packed else "other")

    for k, (nbytes, shape) in entries.items():
        mod, _, buf = k.rpartition(".")
        part = parts[part_of(mod)]
        part["bytes"] += nbytes
        if mod in packed and buf in ("qweight", "scales", "zeros", "gtable", "perm"):
            if buf == "scales":            # [n_groups, N]: the matrix has N x n_groups*G weights
                part["params"] += shape[1] * shape[0] * int(packed[mod]["group_size"])
        else:
            n = 1
            for d in shape:
                n *= int(d)
            part["params"] += n
    total_bytes = sum(f.stat().st_size for f in files)
    params = sum(p["params"] for p in parts.values())
    for p in parts.values():
        p["bits_per_param"] = 8 * p["bytes"] / p["params"] if p["params"] else None
    return {"file_bytes": total_bytes, "params": params,
            "bits_per_param": 8 * total_bytes / params if params else None, "parts": parts}


def size_line(size: dict) -> str:
    """One line a person reads: whole file, bits per parameter, and where the bytes are."""
    p = size["parts"]
    return (f"{size['file_bytes'] / 1e6:.1f} MB, {size['bits_per_param']:.2f} bits per parameter "
            f"over all {size['params'] / 1e6:.1f}M parameters (decoder linears "
            f"{p['decoder linears']['bytes'] / 1e6:.1f} MB, embedding + head "
            f"{p['embedding + head']['bytes'] / 1e6:.1f} MB, other {p['other']['bytes'] / 1e6:.1f} MB)")


PREVIOUS_DIR = ".tasa-previous"
_DOCUMENTS = (HF_CONFIG_NAME, LEGACY_CONFIG_NAME, "plan.json", "run.json", "report.md")


class ReplacingModel:
    """Replacing the model in a folder without ever losing it: ``with ReplacingModel(path) as
    r: ...; save; r.commit()``. On entry the folder stops claiming a model (its config.json and
    the documents describing it -- plan.json, run.json, report.md -- move into
    ``.tasa-previous/``), so a new plan never sits beside the old model. If the block fails
    before :meth:`commit` (disk full while saving, an error, Ctrl-C) they move back and the
    previous model loads as before; after ``commit`` (the new model is saved) they are dropped.
    A run killed outright leaves them in ``.tasa-previous/``: the next run moves them back
    first."""

    def __init__(self, path):
        self.path = Path(path)
        self.stash = self.path / PREVIOUS_DIR
        self.moved: list = []

    def _restore(self) -> None:
        if not self.stash.is_dir():
            return
        for f in self.stash.iterdir():
            os.replace(f, self.path / f.name)
        shutil.rmtree(self.stash, ignore_errors=True)

    def __enter__(self) -> "ReplacingModel":
        check_output_folder(self.path)
        self._restore()                       # a killed run's previous model, back first
        for name in _DOCUMENTS:
            f = self.path / name
            if f.exists():
                self.stash.mkdir(exist_ok=True)
                os.replace(f, self.stash / name)
                self.moved.append(name)
        return self

    def commit(self) -> None:
        shutil.rmtree(self.stash, ignore_errors=True)
        self.moved = []

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self.moved:
            for name in _DOCUMENTS:           # what the failed run wrote goes; the old comes back
                if name in self.moved and (self.path / name).exists():
                    (self.path / name).unlink()
            self._restore()
        return False


def retire_model(path) -> None:
    """Makes ``path`` stop claiming a model (its config.json / tasa_config.json removed; the
    tensor files stay until the next save replaces them): called before a run writes a new plan
    beside an older model."""
    check_output_folder(path)
    for name in (HF_CONFIG_NAME, LEGACY_CONFIG_NAME):
        f = Path(path) / name
        if f.exists():
            f.unlink()


def check_output_folder(path) -> None:
    """Refuses an output folder that holds a model tasa did not write (a config.json without a
    tasa quantization_config): writing there would replace someone's checkpoint."""
    qc = _quantization_config(path)
    if qc is not None and qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"tasa: {path} holds a model that tasa did not write "
                         f"({Path(path) / HF_CONFIG_NAME} has no tasa quantization_config); "
                         f"writing there would replace it. Choose another --out")


def _quantization_config(path) -> Optional[dict]:
    """The ``quantization_config`` of ``path/config.json``: None without a config.json, ``{}``
    when it has none (a full-precision model); a config that is not JSON is an error."""
    f = Path(path) / HF_CONFIG_NAME
    if not f.is_file():
        return None
    cfg = read_json(f)
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc if isinstance(qc, dict) else {}


def folder_kind(path) -> str:
    """``"hf"`` (config.json with a tasa quantization_config), ``"legacy"`` (tasa_config.json)
    or a ``ValueError``/``FileNotFoundError`` saying what the folder is not."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tasa: {path} is not a folder")
    qc = _quantization_config(path)
    if qc:
        method = qc.get("quant_method")
        if method != QUANT_METHOD:
            raise ValueError(f"tasa: {path} holds a {method!r}-quantized model, not a tasa one")
        return "hf"
    if (path / LEGACY_CONFIG_NAME).is_file():
        return "legacy"
    raise ValueError(f"tasa: {path} is not a tasa model folder (no config.json with a tasa "
                     f"quantization_config, no {LEGACY_CONFIG_NAME})")


def load_quantized(path, model: Optional[nn.Module] = None, dtype: torch.dtype = torch.float32,
                   device="cpu") -> nn.Module:
    """Loads a tasa folder: a transformers folder through ``from_pretrained`` (the registered
    tasa quantizer) or a layout-1 folder through the legacy reader (``model``: an unquantized
    skeleton to fill, for layout-1 folders only). Returns the model in eval mode with
    ``tasa_plan`` (module -> LayerSpec) and ``tasa_config`` (the quantization_config) set."""
    path = Path(path)
    if folder_kind(path) == "legacy":
        return _load_legacy(path, model, dtype, device)
    if model is not None:
        raise ValueError(f"tasa: {path} is a transformers folder; it builds its own model "
                         f"(pass no skeleton)")
    kw = {} if str(device) == "cpu" else {"device_map": str(device)}
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    qc = m.config.quantization_config
    m.tasa_plan = qc.layer_specs()
    m.tasa_config = qc.to_dict()
    return m.eval()


def convert_legacy(src, dst) -> Path:
    """Rewrites a layout-1 folder (``tasa_config.json``) as a transformers folder ``dst`` (the
    same tensors; tokenizer files carried over when present)."""
    src, dst = Path(src), Path(dst)
    if folder_kind(src) != "legacy":
        raise ValueError(f"tasa: {src} is already a transformers folder; nothing to convert")
    if dst.resolve() == src.resolve():
        raise ValueError("tasa: convert into another folder (the source stays as it is)")
    model = _load_legacy(src, None, torch.float32, "cpu")
    tok = None
    if any((src / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(str(src))
    cfg = model.tasa_config
    meta = dict(cfg.get("meta") or {})
    meta["converted_from"] = "tasa folder layout 1"
    return save_quantized(model, dst, model.tasa_plan, tokenizer=tok,
                          base_model=cfg.get("base_model"), meta=meta)


# ---- layout 1 (tasa_config.json), read only -------------------------------------------------

def read_config(path) -> dict:
    """The ``tasa_config.json`` of a layout-1 folder, version-checked."""
    p = Path(path) / LEGACY_CONFIG_NAME
    cfg = read_json(p, "tasa model config (not a saved tasa model folder?)")
    if not isinstance(cfg, dict) or "plan" not in cfg:
        raise ValueError(f"tasa: {p} has no \"plan\": not a tasa model config")
    tasa_ext.check_format_version(cfg.get("format_version"), str(p))
    return cfg


def _skeleton(cfg: dict, dtype) -> nn.Module:
    mc = dict(cfg["model_config"])
    model_type = mc.pop("model_type")
    mc.pop("quantization_config", None)
    config = AutoConfig.for_model(model_type, **mc)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _load_legacy(path, model: Optional[nn.Module] = None, dtype: torch.dtype = torch.float32,
                 device="cpu") -> nn.Module:
    """Loads a layout-1 folder (``tasa_config.json``).

    ``model``: an unquantized skeleton to fill (same architecture); by default one is built from
    the stored transformers config. Returns the model in eval mode with ``tasa_plan`` set.
    """
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
        if v is not None:     # safetensors metadata is text
            tasa_ext.check_format_version(int(v) if str(v).isdigit() else v, str(wfile))
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
    for name, m in model.named_modules():     # loaded offsets, checked before any kernel runs
        if isinstance(m, TasaLinear):
            validate_tables(m, name)
    model.tasa_plan = plan
    model.tasa_config = cfg
    return model.to(device).eval()
