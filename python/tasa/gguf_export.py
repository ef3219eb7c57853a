"""A tasa plan as a GGUF that llama.cpp runs (``tasa export --gguf``), and llama.cpp's own
quantizations of the same reference weights (the rows tasa is compared with).

The steps, all on the reference weights tasa itself quantizes (the dequantized source GGUF):

1. :func:`reference_gguf`: the source GGUF rewritten as F32 with the gguf package -- every
   metadata key and the tokenizer copied, every tensor dequantized in llama.cpp's own layout
   (no q/k permutation to undo: nothing leaves the GGUF layout).
2. :func:`importance`: tasa's Hessian diagonals, ``diag(X^T X) / tokens`` for every quantized
   linear, on the plan's calibration mix alpha* (the task-aware part: the same sequences GPTQ
   used). This is llama.cpp's importance matrix (``llama-imatrix`` stores the mean of x^2 per
   input channel), keyed by llama.cpp's tensor names.
3. :func:`llama_quantize`: llama.cpp's quantizer (llama-cpp-python's ``llama_model_quantize``)
   with one type override per tensor from the plan's width (:data:`WIDTH_TYPES`) and the
   importance matrix.
4. :func:`gguf_tensors`: the written file read back: each tensor's type and real byte size, so a
   fallback is counted, never assumed.

llama.cpp's k-quants work on super-blocks of 256 along a row; a row whose length is no multiple
of 256 cannot hold them and llama.cpp substitutes a legacy type (:data:`FALLBACK`, the table of
llama.cpp's ``llama_tensor_get_type``). All three registry models have such rows (hidden sizes
576, 640, 896): there the export asks for the fallback itself and reports it -- a 3-bit width
becomes IQ4_NL (4.5 bits per weight), a 4-bit one Q5_0 (5.5). A tensor whose plan mixes widths
across groups (the intra-layer step) gets one type from its average width (GGUF types are per
tensor), rounded to the nearest width that has a type; the report lists every such tensor.

llama-cpp-python is optional: every function that needs it raises ImportError with the build
recipe for this CPU (:data:`INSTALL`), and refuses a build that uses instructions this CPU lacks
(:func:`llama_cpp_problem` also runs it in a child process, so a crash is a reason, not a kill).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .quant.spec import LayerSpec

__all__ = ["INSTALL", "install_command", "cpu_flags", "build_mismatch", "llama_cpp_problem",
           "child_problem", "WIDTH_TYPES", "FALLBACK", "FTYPES", "require_llama_cpp",
           "gguf_name_map",
           "reference_gguf", "importance", "tensor_types", "llama_quantize", "gguf_tensors",
           "export_plan", "LlamaCppLogits", "gguf_architecture"]

# llama-cpp-python built with explicit ISA flags: the default (GGML_NATIVE) build segfaults in
# decode on the AMX Xeon of these benchmarks (benchmarks/results/generate_cpu.md); ~5-6 min.
# The AVX-512 flags only where the CPU has them: a build with them dies with SIGILL on an
# AVX2-only EPYC (2026-12-06), taking the calling process (a whole pytest run) with it.
_ISA_FLAGS = (("avx512f", "GGML_AVX512"), ("avx512_vnni", "GGML_AVX512_VNNI"),
              ("avx512vbmi", "GGML_AVX512_VBMI"), ("avx512_bf16", "GGML_AVX512_BF16"))
# llama.cpp's system-info feature name -> the /proc/cpuinfo flag the build then needs
_SYSINFO_FLAGS = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c",
                  "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
                  "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
                  "AMX_INT8": "amx_int8"}


def cpu_flags() -> Optional[frozenset]:
    """The CPU's feature flags from /proc/cpuinfo (None where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def install_command(flags: Optional[frozenset] = None) -> str:
    """The pip command that builds llama-cpp-python 0.3.36 for this CPU (``flags``: its
    /proc/cpuinfo flags; default: this machine's): AVX2 always, the AVX-512 parts it has."""
    flags = cpu_flags() if flags is None else flags
    opts = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
            "-DGGML_F16C=ON"] + [f"-D{o}=ON" for f, o in _ISA_FLAGS if f in (flags or ())]
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so a wheel built for another CPU
    # (kept from an earlier install) would come back (it did, 2026-12-06: SIGILL)
    return (f'CMAKE_ARGS="{" ".join(opts)}" pip install --no-cache-dir --no-binary '
            'llama-cpp-python llama-cpp-python==0.3.36')


INSTALL = install_command()


def build_mismatch(system_info: str, flags: Optional[frozenset] = None) -> list:
    """The instruction-set features a llama.cpp build uses (its ``llama_print_system_info``:
    ``AVX512 = 1 | ...``) that this CPU lacks; [] when it fits or the CPU's flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return []
    used = re.findall(r"\b([A-Z0-9_]+) = 1\b", system_info)
    return [u for u in used if u in _SYSINFO_FLAGS and _SYSINFO_FLAGS[u] not in flags]


# Run in a child: import, backend, the CPU check; with a GGUF (argv[1]), quantize it to the mix
# argv[2] (an llama_ftype: Q4_K_M) and evaluate a few tokens of that (the code paths the export
# and the benchmarks use).
_SMOKE = r"""
import os, sys, tempfile, llama_cpp
llama_cpp.llama_backend_init()
print("SYSTEM_INFO", llama_cpp.llama_print_system_info().decode(errors="replace"), flush=True)
if len(sys.argv) > 1:
    fd, q = tempfile.mkstemp(suffix=".gguf"); os.close(fd)
    try:
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = int(sys.argv[2])
        if llama_cpp.llama_model_quantize(sys.argv[1].encode(), q.encode(), p) != 0:
            sys.exit("llama_model_quantize failed")
        llm = llama_cpp.Llama(model_path=q, n_ctx=64, n_batch=64, verbose=False)
        llm.eval(llm.tokenize(b"The capital of France is")[:6])
        llm.close()
    finally:
        os.unlink(q)
print("SMOKE_OK", flush=True)
"""


@functools.lru_cache(maxsize=None)
def llama_cpp_problem(gguf_path: Optional[str] = None, timeout: float = 600.0) -> Optional[str]:
    """Why llama-cpp-python cannot be used here, or None: it is missing, it was built for
    instructions this CPU lacks, or a child process that imports it (and, given a GGUF,
    quantizes it and evaluates a few tokens) fails or is killed by a signal. Run before any
    in-process use where a crash would take more than one command down (a test session)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python missing; install it with: {INSTALL}"
    args = [str(gguf_path), str(FTYPES["Q4_K_M"])] if gguf_path else []
    return child_problem([sys.executable, "-c", _SMOKE] + args, timeout)


def child_problem(argv: Sequence[str], timeout: float = 600.0,
                  flags: Optional[frozenset] = None) -> Optional[str]:
    """Runs the llama.cpp smoke command ``argv`` and says what went wrong, or None: the build's
    features (its ``SYSTEM_INFO`` line) against the CPU's ``flags``, a kill by a signal (named),
    an exit status, or no ``SMOKE_OK`` line."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"llama-cpp-python's smoke test ran past {timeout:.0f} s"
    info = next((ln[len("SYSTEM_INFO "):] for ln in r.stdout.splitlines()
                 if ln.startswith("SYSTEM_INFO ")), "")
    bad = build_mismatch(info, flags)
    if bad:
        return (f"llama-cpp-python was built for {', '.join(bad)}, which this CPU lacks "
                f"(it dies with SIGILL); rebuild it with: {INSTALL}")
    if r.returncode < 0:
        try:
            name = signal.Signals(-r.returncode).name
        except ValueError:
            name = f"signal {-r.returncode}"
        why = " (illegal instruction: built for a CPU this is not)" if name == "SIGILL" else ""
        return f"llama-cpp-python was killed by {name}{why}; rebuild it with: {INSTALL}"
    if r.returncode or "SMOKE_OK" not in r.stdout:
        tail = (r.stderr.strip().splitlines() or ["no message"])[-1]
        return f"llama-cpp-python failed its smoke test (exit {r.returncode}): {tail}"
    return None


QK_K = 256          # a k-quant super-block: rows must be a multiple of it
# a plan width -> llama.cpp type (by name, resolved in gguf.GGMLQuantizationType)
WIDTH_TYPES = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}
# llama.cpp's substitutes for k-quant types on rows that are no multiple of 256
# (llama_tensor_get_type, "convert_incompatible_tensor")
FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0",
            "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# llama.cpp's own mixes (llama_ftype values) the benchmark compares with
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q2_K": 10,
          "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
          "Q5_K_M": 17, "Q6_K": 18, "IQ3_XS": 22, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
          "IQ4_XS": 30}


def require_llama_cpp():
    """The ``llama_cpp`` module, or ImportError with the build recipe: also when a child process
    finds the build unusable here (:func:`llama_cpp_problem`: built for instructions this CPU
    lacks, it imports but dies with SIGILL at its first call -- asking it in-process would
    kill this one and lose the work)."""
    why = llama_cpp_problem()
    if why:
        raise ImportError(f"tasa: {why}")
    import llama_cpp
    return llama_cpp


def _gguf():
    import gguf
    return gguf


# ---- names ---------------------------------------------------------------------------------------

def gguf_name_map(architecture: str, n_layers: int, names: Sequence[str]) -> Dict[str, str]:
    """``{transformers module name: llama.cpp tensor name}`` (``model.layers.3.self_attn.q_proj``
    -> ``blk.3.attn_q.weight``) by the gguf package's own table; an unmapped name is an error."""
    gguf = _gguf()
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == architecture), None)
    if arch is None:
        raise ValueError(f"tasa: the gguf package knows no architecture {architecture!r}")
    table = gguf.get_tensor_name_map(arch, n_layers)
    out, missing = {}, []
    for n in names:
        g = table.get_name(n)
        if g is None and n.startswith("model.language_model."):       # multimodal wrappers
            g = table.get_name("model." + n[len("model.language_model."):])
        if g is None:
            missing.append(n)
        else:
            out[n] = g + ".weight"
    if missing:
        raise ValueError(f"tasa: no llama.cpp tensor name for {missing[:4]}"
                         + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    return out


def gguf_architecture(path) -> str:
    """``general.architecture`` of a GGUF file (``llama``, ``qwen2``, ``gemma3`` ...)."""
    return _gguf().GGUFReader(str(path)).fields["general.architecture"].contents()


# ---- 1. the reference GGUF -----------------------------------------------------------------------

def reference_gguf(source, out, dtype: str = "F32", progress: bool = True) -> Path:
    """``source`` (any GGUF) rewritten as ``out`` with every tensor dequantized to ``dtype``
    (F32, or F16 for the 2-D weights with 1-D tensors kept F32), the metadata and tokenizer
    copied; ``general.file_type`` says the new type. Written to a temporary name, then moved."""
    gguf = _gguf()
    if dtype not in ("F32", "F16"):
        raise ValueError(f"tasa: reference dtype must be F32 or F16, got {dtype!r}")
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(0 if dtype == "F32" else 1)
    for t in tqdm(reader.tensors, desc="reference GGUF", disable=not progress):
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)])
        if dtype == "F16" and w.ndim > 1:
            w = w.astype(np.float16)
        writer.add_tensor(t.name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    os.replace(tmp, out)
    return out


# ---- 2. tasa's importance matrix -----------------------------------------------------------------

@torch.no_grad()
def importance(model: nn.Module, ids: torch.Tensor, names: Sequence[str], batch_size: int = 4,
               progress: bool = True) -> Dict[str, torch.Tensor]:
    """``{name: mean over tokens of x^2 per input channel}`` of each linear ``names`` of
    ``model`` over the token ids ``ids [n, seqlen]``: the diagonal of tasa's Hessian
    ``X^T X`` divided by the token count (llama.cpp's imatrix quantity)."""
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    hooks = []

    def hook(name):
        def f(mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return f

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    try:
        for i in tqdm(range(0, len(ids), batch_size), desc="importance", disable=not progress):
            model(ids[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"tasa: the calibration pass never reached {missing[:3]}")
    return {n: (sums[n] / counts[n]).float() for n in names}


# ---- 3. types and llama.cpp's quantizer ----------------------------------------------------------

def _type_of(width: int):
    gguf = _gguf()
    return gguf.GGMLQuantizationType[WIDTH_TYPES[width]]


def tensor_types(specs: Mapping[str, LayerSpec], shapes: Mapping[str, tuple]) -> Dict[str, dict]:
    """For each module of ``specs`` with its ``shapes[name] = (n_out, k_in)``: ``{"width"`` (the
    plan's, or its average rounded to the nearest width of :data:`WIDTH_TYPES`), ``"asked"``
    (that width's type), ``"type"`` (what the file gets: the asked type, or llama.cpp's
    fallback when ``k_in`` is no multiple of 256), ``"mixed"`` (the plan mixed widths)}``."""
    out = {}
    for name, spec in specs.items():
        widths = sorted(set(spec.bits))
        if not widths:
            raise ValueError(f"tasa: {name}: the plan has no widths for it")
        G = spec.group_size
        k_in = shapes[name][1]
        if len(widths) == 1:
            width = widths[0]
        else:
            avg = sum(spec.bits) * G / k_in
            width = min(WIDTH_TYPES, key=lambda w: (abs(w - avg), -w))
        if width not in WIDTH_TYPES:
            raise ValueError(f"tasa: {name}: width {width} has no llama.cpp type here (widths "
                             f"{sorted(WIDTH_TYPES)})")
        asked = WIDTH_TYPES[width]
        got = FALLBACK.get(asked, asked) if k_in % QK_K else asked
        out[name] = {"width": width, "asked": asked, "type": got, "mixed": len(widths) > 1,
                     "avg_width": sum(spec.bits) * G / k_in}
    return out


def llama_quantize(src, out, ftype: str = "Q4_K_M",
                   overrides: Optional[Mapping[str, str]] = None,
                   imatrix: Optional[Mapping[str, torch.Tensor]] = None,
                   token_embedding_type: Optional[str] = None,
                   output_tensor_type: Optional[str] = None, nthread: int = 0) -> Path:
    """llama.cpp's quantizer on the GGUF ``src``: the mix ``ftype`` (a key of :data:`FTYPES`),
    ``overrides {llama.cpp tensor name: type name}`` (exact names), an importance matrix
    ``{llama.cpp tensor name: [k_in] floats}``. Written to a temporary name, then moved."""
    llama_cpp = require_llama_cpp()
    gguf = _gguf()
    if ftype not in FTYPES:
        raise ValueError(f"tasa: unknown llama.cpp mix {ftype!r}; choose from {sorted(FTYPES)}")
    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = nthread or (os.cpu_count() or 1)
    p.ftype = FTYPES[ftype]
    if token_embedding_type is not None:
        p.token_embedding_type = int(gguf.GGMLQuantizationType[token_embedding_type])
    if output_tensor_type is not None:
        p.output_tensor_type = int(gguf.GGMLQuantizationType[output_tensor_type])
    keep = []                     # the ctypes buffers must outlive the call
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (name, tname) in enumerate(overrides.items()):
            pat = ("^" + re.escape(name) + "$").encode()
            keep.append(pat)
            arr[i].pattern = pat
            arr[i].type = int(gguf.GGMLQuantizationType[tname])
        arr[len(overrides)].pattern = None                      # the list ends at a NULL pattern
        keep.append(arr)
        p.tt_overrides = arr
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32)
            if not np.isfinite(buf).all():
                raise ValueError(f"tasa: the importance of {name} is not finite")
            keep += [buf, name.encode()]
            arr[i].name = keep[-1]
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        p.imatrix = arr
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"tasa: llama_model_quantize({src} -> {ftype}) failed with status {rc}")
    os.replace(tmp, out)
    return out


# ---- 4. the file read back -----------------------------------------------------------------------

def gguf_tensors(path) -> Dict[str, dict]:
    """``{tensor name: {"type", "bytes", "params", "shape"}}`` of a GGUF file, as written."""
    gguf = _gguf()
    r = gguf.GGUFReader(str(path))
    return {t.name: {"type": t.tensor_type.name, "bytes": int(t.n_bytes),
                     "params": int(t.n_elements), "shape": [int(x) for x in t.shape]}
            for t in r.tensors}


def file_summary(path) -> dict:
    """Whole-file size in bytes and bits per parameter (every byte over every parameter, as
    llama.cpp reports), and the count of tensors per type."""
    tens = gguf_tensors(path)
    nbytes = Path(path).stat().st_size
    params = sum(t["params"] for t in tens.values())
    types: Dict[str, int] = {}
    for t in tens.values():
        types[t["type"]] = types.get(t["type"], 0) + 1
    return {"bytes": nbytes, "params": params, "bits_per_param": 8 * nbytes / params,
            "types": types}


# ---- the export ----------------------------------------------------------------------------------

def export_plan(reference_file, out, specs: Mapping[str, LayerSpec], shapes: Mapping[str, tuple],
                architecture: str, n_layers: int,
                imatrix: Optional[Mapping[str, torch.Tensor]] = None,
                embedding_width: Optional[int] = None, head_width: Optional[int] = None,
                embed_k_in: Optional[int] = None) -> dict:
    """Writes ``out``: the reference GGUF ``reference_file`` quantized by llama.cpp with the
    plan's type per tensor (:func:`tensor_types`), ``imatrix`` keyed by transformers names
    (:func:`importance`), the token embedding (and an untied head) at their widths. Returns the
    report: per tensor the width, the asked and the written type and its bytes; the file's size
    and bits per parameter. A written type that differs from the expected one is an error."""
    names = gguf_name_map(architecture, n_layers, list(specs))
    plan_types = tensor_types(specs, shapes)
    im = None
    if imatrix is not None:
        im = {names[n]: v for n, v in imatrix.items() if n in names}
    k_e = QK_K if embed_k_in is None else embed_k_in
    asked = {names[n]: t["type"] for n, t in plan_types.items()}
    report = export_types(reference_file, out, asked, names, imatrix=im,
                          token_embedding_type=_embed_type(embedding_width, k_e),
                          output_tensor_type=_embed_type(head_width, k_e))
    for r in report["tensors"]:        # the plan's width, the type it asked before any fallback
        t = plan_types[r["module"]]
        r.update(t, fallback=t["type"] != t["asked"])
    report["fallbacks"] = sum(r["fallback"] for r in report["tensors"])
    report["mixed"] = sum(r["mixed"] for r in report["tensors"])
    return report


def _embed_type(width: Optional[int], k_in: int) -> Optional[str]:
    """llama.cpp's type for an embedding / head stored at ``width`` bits (None: llama.cpp's
    default for the mix)."""
    if width is None:
        return None
    if width not in WIDTH_TYPES:
        raise ValueError(f"tasa: embedding width {width} has no llama.cpp type")
    t = WIDTH_TYPES[width]
    return FALLBACK.get(t, t) if k_in % QK_K else t


def export_types(reference_file, out, asked: Mapping[str, str], names: Mapping[str, str],
                 imatrix=None, token_embedding_type: Optional[str] = None,
                 output_tensor_type: Optional[str] = None) -> dict:
    """Writes ``out``: the reference quantized by llama.cpp with ``asked {llama.cpp tensor name:
    type}`` (types the tensors can hold: no fallback expected) and ``imatrix`` keyed by
    llama.cpp names. The report has :func:`export_plan`'s keys (``width`` None: no plan width);
    a written type other than the asked one is an error."""
    llama_quantize(reference_file, out, "Q8_0", overrides=dict(asked), imatrix=imatrix,
                   token_embedding_type=token_embedding_type,
                   output_tensor_type=output_tensor_type)
    written = gguf_tensors(out)
    by_g = {g: n for n, g in names.items()}
    rows, wrong = [], []
    for g, t in asked.items():
        got = written[g]["type"]
        if got != t:
            wrong.append(f"{g}: expected {t}, written {got}")
        rows.append({"module": by_g.get(g, g), "tensor": g, "width": None, "asked": t,
                     "type": t, "written": got, "fallback": False, "mixed": False,
                     "bytes": written[g]["bytes"]})
    if wrong:
        raise RuntimeError("tasa: llama.cpp wrote other types than asked: " + "; ".join(wrong[:4]))
    summary = file_summary(out)
    lin_bytes = sum(r["bytes"] for r in rows)
    lin_params = sum(written[r["tensor"]]["params"] for r in rows)
    return {"file": str(out), **summary, "tensors": rows,
            "linear_bits_per_weight": 8 * lin_bytes / lin_params, "fallbacks": 0, "mixed": 0,
            "embedding_type": written.get("token_embd.weight", {}).get("type"),
            "head_type": written.get("output.weight", {}).get("type")}


class LlamaCppLogits:
    """A llama.cpp model with the call shape of a transformers causal LM for
    :func:`tasa.divergence.compare`: ``model(ids[None]).logits`` gives the logits of every
    position, from the same token ids (no BOS added)."""

    def __init__(self, path, n_ctx: int = 512, n_threads: Optional[int] = None):
        llama_cpp = require_llama_cpp()
        n = n_threads or (os.cpu_count() or 1)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx,
                                   n_ubatch=n_ctx, logits_all=True, n_threads=n,
                                   n_threads_batch=n, verbose=False)
        self.n_ctx = n_ctx

    def __call__(self, input_ids):
        ids = [int(x) for x in input_ids[0]]
        if len(ids) > self.n_ctx:
            raise ValueError(f"tasa: {len(ids)} tokens exceed the llama.cpp context {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        logits = torch.from_numpy(np.array(self.llm.scores[:len(ids)], dtype=np.float32))
        return type("Out", (), {"logits": logits[None]})()

    def close(self):
        self.llm.close()


def temporary_path(suffix: str = ".gguf") -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    return Path(name)


def source_gguf(model: str) -> Path:
    """The GGUF a model's reference weights come from: a registry model's file, or a .gguf
    path. Other sources (a transformers folder) would need llama.cpp's converter: refused."""
    from . import models
    if str(model).lower() in models.REGISTRY:
        return models.resolve_gguf(str(model))
    p = Path(str(model)).expanduser()
    if p.suffix.lower() == ".gguf" and p.is_file():
        return p
    raise ValueError(f"tasa: GGUF export starts from the model's own GGUF file (a registry name "
                     f"or a .gguf path); {model!r} is neither. Convert a transformers folder "
                     f"with llama.cpp's convert_hf_to_gguf.py first and pass that file as --model")


def cached_reference(model: str, dtype: str = "F32", progress: bool = True, log=print) -> Path:
    """The reference GGUF of ``model`` (:func:`reference_gguf`), written once under tasa's cache
    (``$TASA_CACHE/gguf``), named by the source file's checksum."""
    from .models import cache_dir
    from .util import sha256_file
    src = source_gguf(model)
    digest = sha256_file(src)[:12]
    out = cache_dir() / "gguf" / f"{src.stem}-{digest}-{dtype}.gguf"
    if not out.is_file():
        log(f"writing the {dtype} reference GGUF of {src.name} -> {out}")
        reference_gguf(src, out, dtype, progress=progress)
    return out


def _folder_plan(folder) -> tuple:
    """``(specs, embedding entry or None, meta)`` of a saved tasa folder."""
    from .hf import TasaConfig
    from .util import read_json
    cfg = read_json(Path(folder) / "config.json", "a saved tasa model folder's config.json")
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "tasa":
        raise ValueError(f"tasa: {folder} is not a tasa model folder (no tasa "
                         f"quantization_config in config.json)")
    tc = TasaConfig(**{k: v for k, v in qc.items()})
    return tc.layer_specs(), tc.embedding, dict(tc.meta)


def setup(model: Optional[str] = None, plan=None, quantized=None, alpha: Optional[float] = None,
          data=None, progress: bool = True, log=print) -> dict:
    """What every export starts from: the plan's specs (of ``plan``, a plan.json, or of the tasa
    folder ``quantized``), the reference (``model``; default: the folder's base model, else
    tasa's default) as a transformers model and as the cached F32 GGUF, the calibration mix
    ``alpha`` (default: the plan's / folder's alpha*), its token ids, tasa's importance matrix
    keyed by tasa's names (``names`` maps them to llama.cpp's), the llama.cpp types of the
    embedding and an untied head."""
    from . import defaults
    from .models import load_model
    from .modelquant import embedding_widths
    from .pipeline import PipelineConfig, stages
    from .quant.spec import read_plan
    if (plan is None) == (quantized is None):
        raise ValueError("tasa: give a plan file or a quantized folder (one of the two)")
    emb = None
    if quantized is not None:
        specs, emb, meta = _folder_plan(quantized)
        model = model or meta.get("base_model") or defaults.MODEL
        doc_alpha = meta.get("alpha")
        beta = (meta.get("tasa_pipeline") or {}).get("beta")
    else:
        specs, doc = read_plan(plan)
        doc_alpha = doc.get("alpha")
        beta = doc.get("beta")
        model = model or defaults.MODEL
    a = float(alpha if alpha is not None else (doc_alpha if doc_alpha is not None else 1.0))
    ref_file = cached_reference(model, progress=progress, log=log)
    ref, tok, _info = load_model(model)
    shapes = {}
    for n in specs:
        try:
            w = ref.get_submodule(n).weight
        except AttributeError:
            raise ValueError(f"tasa: the plan names {n}, which {model} does not have") from None
        shapes[n] = tuple(w.shape)
    tied, e_w, h_w = embedding_widths(ref)
    if emb is not None:                   # what the folder holds
        e_w = int(emb["bits"][0]) if len(set(emb["bits"])) == 1 else round(
            sum(emb["bits"]) / len(emb["bits"]))
        if emb.get("tied"):
            h_w = e_w
    head_name = next((n for n, m in ref.named_modules() if m is ref.get_output_embeddings()), None)
    if head_name in specs:                # an untied packed head is one of the plan's linears
        h_w = None
    cfg = PipelineConfig(model=model, data=data)
    ids, info = stages.gptq_calibration(tok, cfg, a, log=log)
    im = importance(ref, ids, list(specs), progress=progress)
    text_cfg = ref.config.get_text_config()
    arch, n_layers = gguf_architecture(ref_file), int(text_cfg.num_hidden_layers)
    e_k = int(ref.get_input_embeddings().weight.shape[1])
    names = gguf_name_map(arch, n_layers, list(specs))
    return {"specs": specs, "shapes": shapes, "model": model, "alpha": a, "beta": beta,
            "ref_file": ref_file, "ref": ref, "tok": tok, "cfg": cfg, "ids": ids, "info": info,
            "arch": arch, "n_layers": n_layers, "names": names, "imatrix": im,
            "embedding_width": e_w or None, "head_width": None if tied else (h_w or None),
            "embed_k_in": e_k, "embedding_type": _embed_type(e_w or None, e_k),
            "head_type": None if tied else _embed_type(h_w or None, e_k)}


def finish_report(report: dict, s: Mapping) -> dict:
    """The keys every export report shares, from :func:`setup`'s ``s``."""
    report.update({"model": s["model"], "alpha": s["alpha"], "calibration": s["info"],
                   "reference_gguf": str(s["ref_file"]),
                   # llama.cpp has no counterpart of format version 2's rotation: its quantizer
                   # quantizes the reference's own (unrotated) weights at the plan's widths
                   "rotated_in_tasa": sum(1 for sp in s["specs"].values() if sp.hadamard)})
    return report


def export(out, model: Optional[str] = None, plan=None, quantized=None,
           alpha: Optional[float] = None, data=None, progress: bool = True, log=print) -> dict:
    """``tasa export --gguf``: the plan of ``plan`` (a plan.json) or of the tasa folder
    ``quantized`` written as the GGUF ``out`` (module docstring), each tensor at its plan width's
    type. ``model``: the reference (default: the folder's base model, else tasa's default);
    ``alpha``: the calibration mix of the importance matrix (default: the plan's / folder's
    alpha*). (``tasa export --size-mb``, types fitted to a size: :func:`tasa.gguf_fit.export`.)"""
    s = setup(model, plan, quantized, alpha, data, progress, log)
    report = export_plan(s["ref_file"], out, s["specs"], s["shapes"], s["arch"], s["n_layers"],
                         imatrix=s["imatrix"], embedding_width=s["embedding_width"],
                         head_width=s["head_width"], embed_k_in=s["embed_k_in"])
    return finish_report(report, s)


def format_report(r: Mapping) -> str:
    """The lines ``tasa export --gguf`` prints."""
    if r.get("fit"):
        return _format_fit(r)
    by: Dict[tuple, int] = {}
    for t in r["tensors"]:
        k = (t["width"], t["asked"], t["type"])
        by[k] = by.get(k, 0) + 1
    lines = [f"{r['file']}: {r['bytes'] / 1e6:.1f} MB, {r['bits_per_param']:.3f} bits per "
             f"parameter (whole file); decoder linears {r['linear_bits_per_weight']:.3f} bits "
             f"per weight; token embedding {r['embedding_type']}"
             + (f", output {r['head_type']}" if r.get("head_type") else " (tied output)")]
    for (w, asked, got), n in sorted(by.items()):
        lines.append(f"  width {w}: {n} tensors -> {got}" + (
            f" (llama.cpp's fallback for {asked}: rows not a multiple of {QK_K})"
            if got != asked else ""))
    if r["mixed"]:
        lines.append(f"  {r['mixed']} tensors mix widths across groups in the plan: one type "
                     f"each from the average width (GGUF types are per tensor)")
    if r.get("rotated_in_tasa"):
        lines.append(f"  {r['rotated_in_tasa']} matrices are stored rotated in tasa (--hadamard); "
                     f"llama.cpp has no such rotation: the GGUF holds its own quantization of "
                     f"the unrotated weights at the plan's widths")
    lines.append(f"importance matrix: tasa's Hessian diagonals on the calibration mix alpha = "
                 f"{r['alpha']:.3f} ({r['calibration']['n_general']} general + "
                 f"{r['calibration']['n_task']} task sequences x {r['calibration']['seqlen']})")
    return "\n".join(lines)


def _format_fit(r: Mapping) -> str:
    f = r["fit"]
    by: Dict[str, list] = {}
    for t in r["tensors"]:
        by.setdefault(t["type"], []).append(t["bytes"])
    lines = [f"{r['file']}: {r['bytes'] / 1e6:.2f} MB (asked at most {f['size_bytes'] / 1e6:.2f}), "
             f"{r['bits_per_param']:.3f} bits per parameter (whole file); decoder linears "
             f"{r['linear_bits_per_weight']:.3f} bits per weight; token embedding "
             f"{r['embedding_type']}" + (f", output {r['head_type']}" if r.get("head_type")
                                         else " (tied output)"),
             f"types fitted to the size from llama.cpp's menu ({f['scoring']} scoring: "
             + ("the probes' per-unit gains x the Hessian-weighted error of each type"
                if f["scoring"] == "tasa" else "the task-aware Hessian-weighted error alone")
             + ")" + (f"; left out: {', '.join(f['excluded'])}" if f.get("excluded") else "")]
    for typ, b in sorted(by.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {typ}: {len(b)} tensors, {sum(b) / 1e6:.2f} MB")
    lines.append(f"importance matrix: tasa's Hessian diagonals on the calibration mix alpha = "
                 f"{r['alpha']:.3f} ({r['calibration']['n_general']} general + "
                 f"{r['calibration']['n_task']} task sequences x {r['calibration']['seqlen']})")
    return "\n".join(lines)
