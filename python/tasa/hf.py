"""tasa checkpoints as ordinary Hugging Face models: a quantization config and a quantizer
registered with transformers (``transformers.quantizers.register_quantization_config`` /
``register_quantizer``) when ``import tasa`` runs.

After ``import tasa``::

    model = AutoModelForCausalLM.from_pretrained(folder)      # TasaLinear layers, packed weights
    model.save_pretrained(folder2)                            # config.json + model.safetensors

A tasa folder is a transformers folder: ``config.json`` carries ``quantization_config`` =
:class:`TasaConfig` (``quant_method: "tasa"``, its own ``version``, the packing
``format_version``, ``modules``: every quantized linear's per-group widths, group size, mode
and act-order, and ``embedding``: the packed token embedding -- its widths, the output
projection it serves when tied, Gemma's ``embed_scale``), ``model.safetensors`` the packed
TasaLinear / TasaEmbedding buffers (``qweight``, ``scales``, ``zeros``, ``gtable``, ``perm``,
``bias``; a tied head stores nothing of its own) and the full-precision rest. Loading is pre-quantized
only (tasa quantizes with ``tasa quantize`` / :func:`tasa.quantize`, which needs calibration):
before the weights load, :class:`TasaHfQuantizer` checks the checkpoint's tensor names, shapes
and dtypes against the plan (from the safetensors header: nothing is read or built first) and
swaps the planned ``nn.Linear`` modules for TasaLinear skeletons on the meta device whose buffer
names are the checkpoint's keys; after loading it validates every group table and permutation
before any kernel can run. Pickle checkpoints (``*.bin``) are refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

import tasa_ext

from .layers import (TasaEmbedding, TasaLinear, TasaTiedHead, expected_buffers, make_gtable,
                 quantized_modules, set_module, validate_tables)
from .quant import LayerSpec
from .util import sha256_file

__all__ = ["QUANT_METHOD", "CONFIG_VERSION", "TasaConfig", "TasaHfQuantizer", "read_safetensors_header",
           "CONVERT_HINT", "embedding_entry", "attach", "tensor_hashes", "TENSOR_HASH_KEY",
           "SKIP_VERIFY_ENV"]

logger = logging.getLogger("tasa")
QUANT_METHOD = "tasa"
# 2: the packed token embedding (``embedding``; a tied head reads it). Version 1 folders (no
# embedding entry: embedding and head as the checkpoint stored them) still load.
CONFIG_VERSION = 2
READS_VERSIONS = (1, 2)
_EMBED_KEYS = {"module", "head", "tied", "bits", "group_size", "mode", "embed_scale"}


def embedding_entry(model: nn.Module) -> Optional[dict]:
    """The ``embedding`` entry of a model whose input embedding is a :class:`TasaEmbedding`
    (None otherwise): read from the modules themselves, so the config cannot disagree with
    what is saved."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, TasaEmbedding):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    tied = isinstance(head, TasaTiedHead) and head.embedding is emb
    return {"module": names[id(emb)], "head": names.get(id(head)) if head is not None else None,
            "tied": tied, "bits": emb.group_bits, "group_size": emb.group_size, "mode": emb.mode,
            "embed_scale": emb.embed_scale}


def _check_embedding_entry(e) -> dict:
    if not isinstance(e, Mapping) or set(e) != _EMBED_KEYS:
        raise ValueError(f"tasa: quantization_config.embedding must have exactly the keys "
                         f"{sorted(_EMBED_KEYS)}, got {sorted(e) if isinstance(e, Mapping) else e!r}")
    if not isinstance(e["module"], str) or not (e["head"] is None or isinstance(e["head"], str)):
        raise ValueError("tasa: quantization_config.embedding module/head must be module names")
    if not isinstance(e["tied"], bool) or (e["tied"] and e["head"] is None):
        raise ValueError("tasa: quantization_config.embedding.tied must be a bool (and a tied "
                         "embedding names its head)")
    sc = e["embed_scale"]
    if sc is not None and (isinstance(sc, bool) or not isinstance(sc, (int, float))
                           or not (0 < float(sc) < float("inf"))):
        raise ValueError(f"tasa: quantization_config.embedding.embed_scale must be a positive "
                         f"finite number or null, got {sc!r}")
    spec = LayerSpec.from_dict({k: e[k] for k in ("bits", "group_size", "mode")},
                               e["module"], "quantization_config.embedding")
    if spec.act_order:
        raise ValueError("tasa: an embedding cannot have act_order")
    if not spec.bits or any(b not in tasa_ext.SUPPORTED_BITS for b in spec.bits):
        raise ValueError(f"tasa: quantization_config.embedding bits must be widths of "
                         f"{list(tasa_ext.SUPPORTED_BITS)}, got {spec.bits}")
    return {**dict(e), **{k: v for k, v in spec.to_dict().items() if k != "act_order"}}
CONVERT_HINT = "tasa convert OLD_FOLDER NEW_FOLDER"


class TasaConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a tasa model (version :data:`CONFIG_VERSION`).

    ``modules[fqn] = {"bits": [width per logical group], "group_size": G, "mode": "sym"|"asym",
    "act_order": bool}``; ``group_size`` / ``mode`` at the top level are those shared by every
    module (None when they differ); ``modules_to_not_convert``: linears kept in full precision
    (lm_head by default); ``meta``: free-form provenance (method, alpha, average bits ...).
    """

    def __init__(self, modules: Optional[Mapping[str, Mapping]] = None, version: int = CONFIG_VERSION,
                 format_version: int = tasa_ext.FORMAT_VERSION, group_size: Optional[int] = None,
                 mode: Optional[str] = None, modules_to_not_convert: Optional[list] = None,
                 meta: Optional[dict] = None, quant_method: str = QUANT_METHOD,
                 checksums: Optional[dict] = None, embedding: Optional[dict] = None, **kwargs):
        if str(getattr(quant_method, "value", quant_method)) != QUANT_METHOD:
            raise ValueError(f"tasa: quantization_config names quant_method {quant_method!r}, "
                             f"not {QUANT_METHOD!r}")
        if isinstance(version, bool) or version not in READS_VERSIONS:
            raise ValueError(f"tasa: quantization_config version {version!r}; this tasa reads "
                             f"versions {list(READS_VERSIONS)} (upgrade tasa, or re-quantize)")
        tasa_ext.check_format_version(format_version, "quantization_config",
                                      f"convert an older folder with `{CONVERT_HINT}` or "
                                      f"re-quantize")
        if kwargs:
            raise ValueError(f"tasa: quantization_config has unknown keys {sorted(kwargs)}")
        self.quant_method = QUANT_METHOD
        self.version = CONFIG_VERSION
        self.format_version = tasa_ext.FORMAT_VERSION
        if modules is not None and not isinstance(modules, Mapping):
            raise ValueError(f"tasa: quantization_config.modules must be an object {{module name: "
                             f"layer}}, got a {type(modules).__name__}")
        if meta is not None and not isinstance(meta, Mapping):
            raise ValueError(f"tasa: quantization_config.meta must be an object, got "
                             f"{type(meta).__name__}")
        specs = {name: d if isinstance(d, LayerSpec) else
                 LayerSpec.from_dict(d, name, "quantization_config")
                 for name, d in (modules or {}).items()}
        self.modules = {n: s.to_dict() for n, s in specs.items()}
        gs = {s.group_size for s in specs.values()}
        ms = {s.mode for s in specs.values()}
        self.group_size = group_size if group_size is not None else (gs.pop() if len(gs) == 1 else None)
        self.mode = mode if mode is not None else (ms.pop() if len(ms) == 1 else None)
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else ["lm_head"]
        self.meta = dict(meta or {})
        # sha256 of the tensor files, written by tasa.storage.save_quantized into config.json and
        # verified on load; not serialized again (a re-save writes other files)
        if checksums is not None and not (isinstance(checksums, dict) and all(
                isinstance(v, str) for v in checksums.values())):
            raise ValueError("tasa: quantization_config checksums must map file names to sha256")
        self.checksums = dict(checksums or {})
        self.embedding = None if embedding is None else _check_embedding_entry(embedding)
        if self.embedding and self.embedding["head"] in self.modules and self.embedding["tied"]:
            raise ValueError("tasa: quantization_config has the tied head both in modules and "
                             "in embedding")

    @classmethod
    def from_plan(cls, plan: Mapping[str, LayerSpec], meta: Optional[dict] = None,
                  embedding: Optional[dict] = None) -> "TasaConfig":
        return cls(modules=dict(plan), meta=meta, embedding=embedding)

    @classmethod
    def for_model(cls, model: nn.Module, plan: Mapping[str, LayerSpec],
                  meta: Optional[dict] = None) -> "TasaConfig":
        """The config of the modules ``model`` has: ``plan``, plus every other TasaLinear it
        holds (an untied packed head), plus the packed embedding's entry read from the module
        itself -- what every save path writes."""
        qm = quantized_modules(model)
        full = {**{n: m.spec for n, m in qm.items() if n not in plan}, **plan}
        # whether a matrix is stored rotated (format version 2) is read from the module itself
        # (a plain attribute: the lazy job's released modules are on meta): the config must say
        # what the file holds, whatever the plan asked
        for n, s in full.items():
            if n in qm:
                s = s if isinstance(s, LayerSpec) else LayerSpec.from_dict(s, n, "plan")
                full[n] = dataclasses.replace(s, hadamard=qm[n].hadamard)
        return cls.from_plan(full, meta=meta, embedding=embedding_entry(model))

    def layer_specs(self) -> Dict[str, LayerSpec]:
        return {n: LayerSpec(**d) for n, d in self.modules.items()}

    def embedding_spec(self) -> Optional[LayerSpec]:
        e = self.embedding
        return None if e is None else LayerSpec(e["bits"], e["group_size"], e["mode"])

    def to_dict(self) -> Dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "version": self.version,
                "format_version": self.format_version, "group_size": self.group_size,
                "mode": self.mode, "modules_to_not_convert": list(self.modules_to_not_convert),
                "meta": dict(self.meta),
                "modules": {n: dict(d) for n, d in self.modules.items()},
                **({"embedding": dict(self.embedding)} if self.embedding else {})}

    def to_diff_dict(self) -> Dict[str, Any]:
        return self.to_dict()


def _read_header(path) -> tuple:
    """``(header length, the JSON header with its __metadata__)`` of a safetensors file, read
    and checked once for every reader below (nothing past the header is read)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"tasa: {path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"tasa: {path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"tasa: {path} has a corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"tasa: {path} has a corrupt safetensors header (not an object)")
    return n, header


def read_safetensors_header(path) -> Dict[str, dict]:
    """``{name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file from its JSON header
    alone (no tensor is read), so a checkpoint can be checked before anything is built."""
    header = dict(_read_header(path)[1])
    header.pop("__metadata__", None)
    return header


def read_safetensors_metadata(path) -> dict:
    """The string metadata of a safetensors file's header ({} when it has none)."""
    meta = _read_header(path)[1].get("__metadata__")
    return meta if isinstance(meta, dict) else {}


_ST_DTYPES = {torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float32: "F32"}


TENSOR_HASH_KEY = "tasa_sha256"
SKIP_VERIFY_ENV = "TASA_SKIP_VERIFY"


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def tensor_hashes(state: Mapping[str, torch.Tensor]) -> dict:
    """The safetensors header metadata every tasa save writes: ``{TENSOR_HASH_KEY: JSON of
    {tensor name: sha256}}`` (save_pretrained included, through the quantizer's hook)."""
    return {TENSOR_HASH_KEY: json.dumps({k: tensor_digest(v) for k, v in state.items()},
                                        sort_keys=True)}


def _verify_tensor_hashes(f: Path) -> bool:
    """Checks every tensor of ``f`` against the per-tensor sha256 in its header; False when the
    file carries none."""
    n, header = _read_header(f)
    raw = (header.get("__metadata__") or {}).get(TENSOR_HASH_KEY)
    if raw is None:
        return False
    try:
        want = json.loads(raw)
    except ValueError:
        raise ValueError(f"tasa: {f} has corrupt tensor checksums in its header") from None
    with open(f, "rb") as fh:
        for name, e in header.items():
            if name == "__metadata__":
                continue
            if name not in want:
                raise ValueError(f"tasa: {f}: tensor {name} has no checksum (added after the "
                                 f"save?)")
            a, b = e["data_offsets"]
            fh.seek(8 + n + a)
            if hashlib.sha256(fh.read(b - a)).hexdigest() != want[name]:
                raise ValueError(f"tasa: {f}: tensor {name} does not match the sha256 written "
                                 f"with it: the file is damaged or was edited; re-save or "
                                 f"re-quantize")
    return True


def _verify_checksums(files, checksums: Mapping[str, str]) -> list:
    """Verifies every tensor file: its per-tensor sha256 (header metadata, written by every tasa
    save) and its whole-file sha256 (config.json, written by tasa's own save). A file with
    neither is refused unless ``TASA_SKIP_VERIFY=1``. Returns the checks that ran."""
    ran = []
    for f in files:
        if _verify_tensor_hashes(f):
            ran.append(f"{f.name}: every tensor's sha256")
        elif not (checksums and f.name in checksums):
            if os.environ.get(SKIP_VERIFY_ENV) == "1":
                ran.append(f"{f.name}: NOT verified ({SKIP_VERIFY_ENV}=1)")
                continue
            raise ValueError(f"tasa: {f} carries no checksums (written by an older tasa or "
                             f"another tool?): nothing proves it is the model its config "
                             f"describes. Re-save it with this tasa, or set "
                             f"{SKIP_VERIFY_ENV}=1 to load it unverified")
    if not checksums:
        return ran
    for f in files:
        want = checksums.get(f.name)
        if want is None:
            raise ValueError(f"tasa: {f} has no checksum in the quantization_config (a file "
                             f"that tasa did not write)")
        if sha256_file(f) != want:
            raise ValueError(f"tasa: {f} does not match the sha256 recorded in config.json: the "
                             f"file is damaged or belongs to another model (an interrupted "
                             f"write?); re-save or re-quantize")
        ran.append(f"{f.name}: file sha256 from config.json")
    return ran


def _check_checkpoint(model: nn.Module, specs: Mapping[str, LayerSpec], files,
                      checksums: Optional[Mapping[str, str]] = None,
                      embedding: Optional[Mapping] = None,
                      checks_out: Optional[list] = None) -> None:
    """Every planned module: exactly its TasaLinear buffers, with the expected shapes and integer
    / fp16 dtypes; no checkpoint that would need pickle."""
    files = [Path(f) for f in (files or [])]
    pickled = [f.name for f in files if f.suffix != ".safetensors"]
    if pickled:
        raise ValueError(f"tasa: refusing checkpoint files {pickled}: loading them would need "
                         f"pickle; tasa folders store model.safetensors only")
    if not files:
        return None
    checks = _verify_checksums(files, checksums or {})
    if checks_out is not None:
        checks_out.extend(checks)
    header: Dict[str, dict] = {}
    for f in files:
        header.update(read_safetensors_header(f))
    if embedding is not None:
        emb, _ = _embedding_modules(model, embedding)
        V, K = emb.weight.shape
        spec = LayerSpec(embedding["bits"], embedding["group_size"], embedding["mode"])
        spec.validate(V, K, embedding["module"])
        _check_buffers(embedding["module"], _module_keys(header, embedding["module"]),
                       expected_buffers(K, V, spec))
    for name, spec in specs.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"tasa: quantization_config names module {name!r}, which this "
                             f"{type(model).__name__} does not have") from None
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"tasa: quantization_config names {name!r}, a {type(lin).__name__}, "
                             f"not nn.Linear")
        spec.validate(lin.out_features, lin.in_features, name)
        have = _module_keys(header, name)
        _check_buffers(name, have, expected_buffers(lin.in_features, lin.out_features, spec,
                                                    bias="bias" in have))
    return header


def _check_buffers(name: str, have: Mapping[str, dict], want: Mapping[str, tuple]) -> None:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(f"tasa: checkpoint tensors of {name} do not match its plan: missing "
                         f"{missing}, unexpected {extra}")
    for b, (shape, dtype) in want.items():
        got = have[b]
        if list(got["shape"]) != list(shape):
            raise ValueError(f"tasa: {name}.{b} has shape {got['shape']} in the checkpoint, "
                             f"the plan needs {list(shape)}")
        if dtype is not None and got["dtype"] != _ST_DTYPES[dtype]:
            raise ValueError(f"tasa: {name}.{b} is {got['dtype']} in the checkpoint, the "
                             f"format needs {_ST_DTYPES[dtype]}")


def _module_keys(header: Mapping[str, dict], name: str) -> Dict[str, dict]:
    return {k[len(name) + 1:]: v for k, v in header.items()
            if k.startswith(name + ".") and "." not in k[len(name) + 1:]}


def _embedding_modules(model: nn.Module, e: Mapping) -> tuple:
    """(embedding, head) modules named by the config's embedding entry, checked."""
    try:
        emb = model.get_submodule(e["module"])
    except AttributeError:
        raise ValueError(f"tasa: quantization_config.embedding names {e['module']!r}, which this "
                         f"{type(model).__name__} does not have") from None
    if not isinstance(emb, nn.Embedding) or emb is not model.get_input_embeddings():
        raise ValueError(f"tasa: quantization_config.embedding names {e['module']!r}, which is "
                         f"not this model's input embedding")
    head = None
    if e["tied"]:
        head = model.get_output_embeddings()
        try:
            named = model.get_submodule(e["head"])
        except AttributeError:
            named = None
        if head is None or named is not head or not isinstance(head, nn.Linear):
            raise ValueError(f"tasa: quantization_config.embedding ties head {e['head']!r}, which "
                             f"is not this model's output projection")
        if tuple(head.weight.shape) != tuple(emb.weight.shape):
            raise ValueError(f"tasa: the tied head {e['head']} has shape "
                             f"{tuple(head.weight.shape)}, the embedding {tuple(emb.weight.shape)}")
    return emb, head


def _check_all_keys(model: nn.Module, header: Mapping[str, dict]) -> None:
    """The checkpoint holds exactly the swapped model's state (tied copies may be absent):
    transformers would only warn and initialize a missing tensor at random, or drop packed
    tensors of a module the plan does not name."""
    sd = model.state_dict()                 # meta tensors: shapes only, nothing allocated
    want = set(sd.keys())
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(k for k in want - set(header) if not (k in tied and tied[k] in header))
    extra = sorted(set(header) - want)
    if missing or extra:
        def few(ks):
            return f"{ks[:6]}{' ...' if len(ks) > 6 else ''}"
        raise ValueError(f"tasa: the checkpoint does not match the model and its "
                         f"quantization_config: missing tensors {few(missing)}, unexpected "
                         f"tensors {few(extra)}")
    for k in sorted(want & set(header)):
        if list(sd[k].shape) != list(header[k]["shape"]):
            raise ValueError(f"tasa: {k} has shape {header[k]['shape']} in the checkpoint but "
                             f"{list(sd[k].shape)} in config.json's model (a tampered or "
                             f"mismatched config?)")


class TasaHfQuantizer(HfQuantizer):
    """Loads pre-quantized tasa checkpoints (module docstring). Quantizing on the fly inside
    ``from_pretrained`` is not offered: TASA needs calibration data and a measurement."""

    requires_calibration = True

    def validate_environment(self, device_map=None, **kwargs):
        devices = set(device_map.values()) if isinstance(device_map, dict) else (
            {device_map} if device_map is not None else set())
        for d in devices:
            d = str(d)
            if d == "disk":
                raise ValueError("tasa: disk offload is not supported for tasa models")
            if (d.startswith("cuda") or d.isdigit()) and not tasa_ext.build_info().get("with_cuda"):
                raise ValueError("tasa: device_map asks for CUDA but this tasa_ext build has no "
                                 "CUDA kernels (reinstall on a machine whose torch has CUDA)")

    def update_attn_implementation(self, config):
        """Called with the model config before the model is built: a config asking for more
        decoder layers than the tasa plan covers is refused here (building 10^6 layers, even
        on the meta device, would exhaust memory before any tensor is compared)."""
        n = getattr(config.get_text_config(), "num_hidden_layers", None)
        idx = [int(m.group(1)) for m in (re.search(r"\.layers\.(\d+)\.", k + ".")
                                         for k in self.quantization_config.modules) if m]
        if isinstance(n, int) and idx and n > max(idx) + 1:
            raise ValueError(f"tasa: config.json asks for {n} decoder layers but the tasa "
                             f"quantization_config covers layers 0..{max(idx)} only (a tampered "
                             f"or mismatched config?)")
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        specs = self.quantization_config.layer_specs()
        e = getattr(self.quantization_config, "embedding", None)
        self._checks: list = []
        header = _check_checkpoint(model, specs, checkpoint_files,
                                   getattr(self.quantization_config, "checksums", None), e,
                                   checks_out=self._checks)
        if e is not None:
            # the packed table is built on meta: no fp32 [V, K] embedding is ever allocated
            emb, head = _embedding_modules(model, e)
            V, K = emb.weight.shape
            with torch.device("meta"):
                new = TasaEmbedding(V, K, self.quantization_config.embedding_spec(),
                                    embed_scale=e["embed_scale"], out_dtype=emb.weight.dtype)
            set_module(model, e["module"], new)
            if head is not None:
                set_module(model, e["head"], TasaTiedHead(new))
        for name, spec in specs.items():
            lin = model.get_submodule(name)
            with torch.device("meta"):
                new = TasaLinear(lin.in_features, lin.out_features, spec,
                                 bias=lin.bias is not None,
                                 bias_dtype=lin.bias.dtype if lin.bias is not None else torch.float32)
            set_module(model, name, new)
        if header is not None:
            _check_all_keys(model, header)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        specs = dict(self.quantization_config.layer_specs())
        e = getattr(self.quantization_config, "embedding", None)
        if e is not None:
            specs[e["module"]] = self.quantization_config.embedding_spec()
        for name, spec in specs.items():
            m = model.get_submodule(name)
            for b, t in m.named_buffers(recurse=False):
                if t is not None and t.is_meta:
                    raise ValueError(f"tasa: {name}.{b} was not loaded from the checkpoint")
            if not torch.equal(m.gtable.cpu(), make_gtable(spec.bits, spec.group_size)):
                raise ValueError(f"tasa: {name}.gtable does not match the plan's widths")
            validate_tables(m, name)
            for b in ("scales", "zeros"):      # a NaN scale loaded, then failed at the 1st token
                t = getattr(m, b, None)
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"tasa: {name}.{b} holds NaN or Inf values: the checkpoint "
                                     f"is damaged")
        model.tasa_load_checks = list(getattr(self, "_checks", [])) + [
            "tensor names, shapes and dtypes against the quantization_config",
            "every group table and permutation"]
        logger.info("tasa: loaded with checks: %s", "; ".join(model.tasa_load_checks))
        return model

    def get_state_dict_and_metadata(self, model):
        """``save_pretrained``'s hook: the state dict as is, and every tensor's sha256 in the
        safetensors header (verified when the folder loads)."""
        return None, tensor_hashes(model.state_dict())

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True      # the tasa ops have fake kernels


def attach(model: nn.Module) -> nn.Module:
    """Gives a model tasa quantized in memory the quantizer a loaded one has, so that
    ``model.save_pretrained`` writes the tensor checksums too (and transformers treats it as the
    quantized model it is). Needs ``model.config.quantization_config`` (a TasaConfig)."""
    qc = model.config.quantization_config
    if not isinstance(qc, TasaConfig):
        raise TypeError("tasa: attach needs model.config.quantization_config to be a TasaConfig")
    model.hf_quantizer = TasaHfQuantizer(qc)
    return model


def register() -> None:
    """Registers :class:`TasaConfig` and :class:`TasaHfQuantizer` under ``"tasa"`` (idempotent;
    refuses to replace another package's registration)."""
    for mapping, cls, fn in ((AUTO_QUANTIZATION_CONFIG_MAPPING, TasaConfig,
                              register_quantization_config),
                             (AUTO_QUANTIZER_MAPPING, TasaHfQuantizer, register_quantizer)):
        have = mapping.get(QUANT_METHOD)
        if have is None:
            fn(QUANT_METHOD)(cls)
        elif have.__qualname__ != cls.__qualname__ or have.__module__ != cls.__module__:
            raise RuntimeError(f"tasa: transformers already has a {QUANT_METHOD!r} quantization "
                               f"method from {have.__module__}")
        else:
            mapping[QUANT_METHOD] = cls          # a reloaded tasa.hf: the current classes
