"""The tasa torch ops: schemas (defined here, once), fake kernels, and the Python API.

Ops (namespace ``tasa``):
  pack(codes u8 [N,K], group_bits i32 [K/G], G) -> (qweight i32 [ceil(N/16), R, 16], gtable i32 [K/G, 3])
  unpack(qweight, gtable, N, G) -> codes u8 [N, K]                       (logical row order)
  dequant(qweight, scales f16 [K/G, N], zeros f16? , gtable, perm i32? [K], G) -> W f32 [N, K]
  embed(ids i64 [...], qweight, scales, zeros?, gtable, perm?, G) -> f32 [..., K]   (rows of W: a lookup)
  gemm(x [..., K] f32|bf16|f16, qweight, scales, zeros?, gtable, perm?, G, hadamard=False)
        -> y [..., N] (x's dtype; hadamard: x rotated first, as by the hadamard op)
        (CPU, from dense_rows() rows of x on: dequantize once + torch matmul, see set_dense_rows)
  hessian_accumulate_(H f32 [S,K,K]!, X [T,K], src i64? [T], count i64 [S]!) -> ()
  gptq_cols_(W f32 [N,B]!, U f32 [B,B], scale f32 [N], zero f32 [N], maxq, c0, c1, codes u8 [N,B]!,
             err f32 [N,B]!) -> ()   (GPTQ's column loop over one group's columns; CPU only)
  mse_params(W f32 [...,G], bits, sym, weight f32? [G] or [...,G], shrink f32 [C]) -> (scale, zero) f32 [...]
             (the clipping search of group parameters, tasa.quant.mse; CPU only)
  hadamard(x [..., K] f32|bf16|f16, G, inverse) -> [..., K] (x's dtype)
             (format version 2's incoherence rotation: x R, or x R^T with inverse)
  decode_attention_(qkv f32 [(H+2KV)*hd]!, cos f32 [hd], sin f32 [hd], k_cache f32 [KV,L,hd]!,
                    v_cache f32 [KV,L,hd]!, H, pos, scale) -> out f32 [H*hd]
             (one decode step's rotary embedding, cache writes and grouped-query attention;
             CPU only)
  rms_norm(x f32 [..., D], w f32 [D], eps) -> y f32 [..., D]      (LlamaRMSNorm in fp32; CPU only)
  decode_layers_(h f32 [B,D]!, tensors, ints, k_caches!, v_caches!, cos f32 [L,hd], sin, H, pos [B],
                 eps, scale, x_pieces=3) -> ()   (one token of each of B streams through a stack of
             llama-family decoder layers: the ops above composed, the residual streams h updated
             in place; CPU only; see decode_layers_ below for the argument lists)
See csrc/include/tasa/format.h for the layout and tasa_ext/reference.py for the semantics.
"""
from __future__ import annotations

from typing import Optional

import torch

_lib = torch.library.Library("tasa", "DEF")  # noqa: TOR901 - the library must live as long as the module
SCHEMAS = {
    "pack": "pack(Tensor codes, Tensor group_bits, int group_size) -> (Tensor, Tensor)",
    "unpack": "unpack(Tensor qweight, Tensor gtable, int N, int group_size) -> Tensor",
    "dequant": "dequant(Tensor qweight, Tensor scales, Tensor? zeros, Tensor gtable, Tensor? perm, "
               "int group_size) -> Tensor",
    "embed": "embed(Tensor ids, Tensor qweight, Tensor scales, Tensor? zeros, Tensor gtable, "
             "Tensor? perm, int group_size) -> Tensor",
    "gemm": "gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor gtable, Tensor? perm, "
            "int group_size, bool hadamard=False) -> Tensor",
    "hessian_accumulate_": "hessian_accumulate_(Tensor(a!) H, Tensor X, Tensor? src, Tensor(b!) count) -> ()",
    "gptq_cols_": "gptq_cols_(Tensor(a!) W, Tensor U, Tensor scale, Tensor zero, int maxq, int c0, int c1, "
                  "Tensor(b!) codes, Tensor(c!) err) -> ()",
    "mse_params": "mse_params(Tensor W, int bits, bool sym, Tensor? weight, Tensor shrink) -> (Tensor, Tensor)",
    "hadamard": "hadamard(Tensor x, int group_size, bool inverse) -> Tensor",
    "decode_attention_": "decode_attention_(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) k_cache, "
                         "Tensor(c!) v_cache, int H, int pos, float scale) -> Tensor",
    "rms_norm": "rms_norm(Tensor x, Tensor w, float eps) -> Tensor",
    "decode_layers_": "decode_layers_(Tensor(a!) h, Tensor?[] tensors, int[] ints, Tensor(b!)[] k_caches, "
                      "Tensor(c!)[] v_caches, Tensor cos, Tensor sin, int H, int[] pos, float eps, "
                      "float scale, int x_pieces=3) -> ()",
}
for _schema in SCHEMAS.values():
    _lib.define(_schema)

# The implementations register themselves (TORCH_LIBRARY_IMPL) when the extension loads; the
# schemas above must exist first, hence the import here.
from . import reference  # noqa: E402
from ._build import load_extension  # noqa: E402

_C = load_extension()


MAX_K = 1 << 40       # tasa_ext/csrc/check.h kMaxK


def _k_of(gtable, group_size, qweight=None) -> int:
    """K = n_groups * group_size, refused as the C++ shims refuse it (a group size near 2^62
    made it overflow int64 in C++ and a SymInt in the fake kernels)."""
    if group_size <= 0 or group_size % 32:
        raise RuntimeError(f"tasa: group_size must be a positive multiple of 32, got {group_size}")
    K = gtable.shape[0] * group_size
    if K > MAX_K:
        raise RuntimeError(f"tasa: gtable has {gtable.shape[0]} groups of group_size="
                           f"{group_size}: K would exceed {MAX_K} input features")
    if qweight is not None:         # as check.h: the packed rows bound the widths (2..8 bits)
        lo = gtable.shape[0] * 2 * (group_size // 32)
        if not lo <= qweight.shape[1] <= 4 * lo:
            raise RuntimeError(f"tasa: qweight has {qweight.shape[1]} packed rows, which "
                               f"{gtable.shape[0]} groups of group_size={group_size} cannot have")
    return K


def _same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    """Fake kernels run for meta / fake tensors, where the C++ shims never see a mix of devices:
    check here too, so a wrong device is an error naming the argument on every path."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"tasa: {name} is on {t.device} but {ref_name} is on {ref.device}")


@torch.library.register_fake("tasa::pack")
def _pack_fake(codes, group_bits, group_size):
    _same_device("codes", codes, group_bits=group_bits)
    n, k = codes.shape
    rows = torch.library.get_ctx().new_dynamic_size()
    nb = (n + 15) // 16
    return (codes.new_empty((nb, rows, 16), dtype=torch.int32),
            group_bits.new_empty((k // group_size, 3), dtype=torch.int32))


@torch.library.register_fake("tasa::unpack")
def _unpack_fake(qweight, gtable, N, group_size):
    _same_device("qweight", qweight, gtable=gtable)
    return qweight.new_empty((N, _k_of(gtable, group_size, qweight)), dtype=torch.uint8)


@torch.library.register_fake("tasa::dequant")
def _dequant_fake(qweight, scales, zeros, gtable, perm, group_size):
    _same_device("qweight", qweight, scales=scales, zeros=zeros, gtable=gtable, perm=perm)
    return qweight.new_empty((scales.shape[1], _k_of(gtable, group_size, qweight)),
                             dtype=torch.float32)


@torch.library.register_fake("tasa::embed")
def _embed_fake(ids, qweight, scales, zeros, gtable, perm, group_size):
    _same_device("qweight", qweight, ids=ids, scales=scales, zeros=zeros, gtable=gtable, perm=perm)
    if ids.dtype != torch.int64:
        raise RuntimeError(f"tasa: ids must be int64, got {ids.dtype}")
    return qweight.new_empty((*ids.shape, _k_of(gtable, group_size, qweight)), dtype=torch.float32)


@torch.library.register_fake("tasa::gemm")
def _gemm_fake(x, qweight, scales, zeros, gtable, perm, group_size, hadamard=False):
    _same_device("qweight", qweight, x=x, scales=scales, zeros=zeros, gtable=gtable, perm=perm)
    if x.shape[-1] != _k_of(gtable, group_size, qweight):
        raise RuntimeError(f"tasa: x must have last dimension K={gtable.shape[0] * group_size}, "
                           f"got shape {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


@torch.library.register_fake("tasa::hessian_accumulate_")
def _hessian_fake(H, X, src, count):
    _same_device("H", H, X=X, src=src, count=count)
    return None


@torch.library.register_fake("tasa::gptq_cols_")
def _gptq_cols_fake(W, U, scale, zero, maxq, c0, c1, codes, err):
    _same_device("W", W, U=U, scale=scale, zero=zero, codes=codes, err=err)
    return None


@torch.library.register_fake("tasa::mse_params")
def _mse_params_fake(W, bits, sym, weight, shrink):
    _same_device("W", W, weight=weight, shrink=shrink)
    return W.new_empty(W.shape[:-1]), W.new_empty(W.shape[:-1])


@torch.library.register_fake("tasa::decode_attention_")
def _decode_attention_fake(qkv, cos, sin, k_cache, v_cache, H, pos, scale):
    return qkv.new_empty(H * k_cache.shape[-1])


@torch.library.register_fake("tasa::rms_norm")
def _rms_norm_fake(x, w, eps):
    return torch.empty_like(x)


@torch.library.register_fake("tasa::decode_layers_")
def _decode_layers_fake(h, tensors, ints, k_caches, v_caches, cos, sin, H, pos, eps, scale,
                        x_pieces=3):
    return None


@torch.library.register_fake("tasa::hadamard")
def _hadamard_fake(x, group_size, inverse):
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"tasa: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or group_size <= 0 or x.shape[-1] % group_size:
        raise RuntimeError(f"tasa: x's last dimension K={x.shape[-1] if x.dim() else None} is "
                           f"not a multiple of group_size={group_size}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- Python API -----------------------------------------------------------------------------

def pack(codes: torch.Tensor, group_bits: torch.Tensor, group_size: int):
    """Packs integer codes ``[N, K]`` (uint8, logical row order) whose group ``g`` (rows
    ``g*G .. (g+1)*G``) has width ``group_bits[g]``. Returns ``(qweight, gtable)``; the scales
    and zeros of stored group ``j`` are those of logical group ``gtable[j, 2]``."""
    return torch.ops.tasa.pack(codes, group_bits, group_size)


def unpack(qweight, gtable, n_out: int, group_size: int) -> torch.Tensor:
    return torch.ops.tasa.unpack(qweight, gtable, n_out, group_size)


def dequant(qweight, scales, zeros, gtable, perm, group_size: int) -> torch.Tensor:
    return torch.ops.tasa.dequant(qweight, scales, zeros, gtable, perm, group_size)


def embed(ids, qweight, scales, zeros: Optional[torch.Tensor], gtable, perm: Optional[torch.Tensor],
          group_size: int) -> torch.Tensor:
    """Rows ``ids`` (int64, any shape) of the dequantized packed matrix W [N, K], fp32
    ``[*ids.shape, K]``: the lookup of an embedding stored packed (for a tied embedding the same
    buffers serve ``gemm`` as the output projection). An id outside [0, N) is an error."""
    return torch.ops.tasa.embed(ids, qweight, scales, zeros, gtable, perm, group_size)


def gemm(x, qweight, scales, zeros: Optional[torch.Tensor], gtable, perm: Optional[torch.Tensor],
         group_size: int, hadamard: bool = False) -> torch.Tensor:
    """``y = x @ W.T`` with W the dequantized packed matrix; fp32 accumulation. ``hadamard``: W
    is stored rotated (format version 2), ``y = hadamard(x) @ W.T`` with :func:`hadamard`'s
    rotation, rounding and dtype, in one op."""
    return torch.ops.tasa.gemm(x, qweight, scales, zeros, gtable, perm, group_size, hadamard)


def hessian_accumulate_(H, X, src: Optional[torch.Tensor], count) -> None:
    torch.ops.tasa.hessian_accumulate_(H, X, src, count)


def gptq_cols_(W, U, scale, zero, maxq: int, c0: int, c1: int, codes, err) -> None:
    """GPTQ's column loop over columns ``[c0, c1)`` of one block (one group's columns): see
    :func:`tasa_ext.reference.gptq_cols_` (the semantics, bit for bit). The op on CPU tensors;
    elsewhere (no CUDA kernel) the reference itself."""
    if W.device.type != "cpu":
        return reference.gptq_cols_(W, U, scale, zero, maxq, c0, c1, codes, err)
    torch.ops.tasa.gptq_cols_(W, U, scale, zero, maxq, c0, c1, codes, err)


def mse_params(W, bits: int, sym: bool, weight: Optional[torch.Tensor], shrink: torch.Tensor):
    """The clipping search of group parameters over the last axis of ``W`` (fp32): see
    :func:`tasa_ext.reference.mse_params`. Returns ``(scale, zero)`` of shape ``W.shape[:-1]``.
    The op on CPU tensors; elsewhere (no CUDA kernel) the reference itself."""
    if W.device.type != "cpu":
        return reference.mse_params(W, bits, sym, weight, shrink)
    return torch.ops.tasa.mse_params(W, bits, sym, weight, shrink)


def hadamard(x, group_size: int, inverse: bool = False) -> torch.Tensor:
    """The incoherence rotation of format version 2 (csrc/include/tasa/format.h) over the last
    axis of ``x``: ``x R`` (what a rotated matrix's GEMM multiplies) or, with ``inverse``,
    ``x R^T`` (a rotated weight row back to input channels). Rotated in fp32, returned in x's
    dtype; :func:`tasa_ext.reference.hadamard` is the semantics."""
    return torch.ops.tasa.hadamard(x, group_size, inverse)


def decode_attention_(qkv, cos, sin, k_cache, v_cache, H: int, pos: int, scale: float) -> torch.Tensor:
    """One decode step's attention for a single token at position ``pos`` (CPU, fp32): q and k
    of ``qkv`` ([(H + 2 KV) * hd]: q, k, v) rotated in place with ``cos``/``sin`` of that
    position (transformers' rotate_half convention, the same roundings), k and v written to the
    caches ([KV, max_len, hd]) at ``pos``, and softmax(scale q K^T) V over positions 0..pos per
    head (grouped: head h reads KV head h // (H / KV)) returned as [H * hd].
    :func:`tasa_ext.reference.decode_attention_` is the semantics."""
    return torch.ops.tasa.decode_attention_(qkv, cos, sin, k_cache, v_cache, int(H), int(pos),
                                            float(scale))


def rms_norm(x, w, eps: float) -> torch.Tensor:
    """RMSNorm of x's rows (CPU, fp32): ``w * (x * rsqrt(mean(x^2) + eps))`` rounded as
    transformers' LlamaRMSNorm rounds it in fp32 (the mean of squares summed in double).
    :func:`tasa_ext.reference.rms_norm` is the semantics."""
    return torch.ops.tasa.rms_norm(x, w, float(eps))


# decode_layers_'s lists: per layer these tensors (None where absent) and ints, in this order.
# The slots: q (or q/k/v fused: then k and v are all None), k, v, o, gate (or gate/up fused:
# then up is all None), up, down.
DECODE_LAYER_SLOTS = ("q", "k", "v", "o", "gate", "up", "down")
DECODE_LAYER_TENSORS = ("norm1", "norm2") + tuple(
    f"{p}.{t}" for p in DECODE_LAYER_SLOTS
    for t in ("qweight", "scales", "zeros", "gtable", "perm", "bias"))
DECODE_LAYER_INTS = tuple(f"{p}.{t}" for p in DECODE_LAYER_SLOTS
                          for t in ("group_size", "hadamard"))


def decode_layers_(h, tensors, ints, k_caches, v_caches, cos, sin, H: int, pos, eps: float,
                   scale: float, x_pieces: int = 3) -> None:
    """One token through a stack of llama-family pre-norm decoder layers (CPU, fp32), ``h``
    ([D], the residual stream after the embedding) updated in place: per layer RMSNorm, the
    q/k/v projection (+ bias), :func:`decode_attention_` at ``pos`` (``cos``/``sin``:
    [max_len, hd] tables), the o projection, the residual add, RMSNorm, the gate/up
    projection, ``silu(gate) * up``, the down projection and the residual add (q/k/v and
    gate/up each one fused matrix or apart: :data:`DECODE_LAYER_SLOTS`). ``tensors``: per
    layer :data:`DECODE_LAYER_TENSORS` (the packed matrices as :func:`gemm` takes them, bias fp32,
    None where absent); ``ints``: per layer :data:`DECODE_LAYER_INTS`; one k and v cache
    [KV, max_len, hd] per layer; ``x_pieces``: the int8 pieces of x in its GEMVs (3: as
    :func:`gemm` by default; 2: error <= 254^-2 of each group's largest |x|, see
    :func:`set_x_pieces`). :func:`tasa_ext.reference.decode_layers_` is the semantics (in
    float64: x exact).

    Several streams at once (batched decode): ``pos`` a list of B positions, ``h`` [B, D] and
    each layer's caches [B, KV, max_len, hd], stream b at ``pos[b]``; every projection is then
    one gemm over the B rows (the weights read once per step), whose fp32 rows differ from
    B separate steps' by rounding, except on AVX2 with ``x_pieces=2``, where the 2- to 4-bit
    groups take the int8 GEMV by pairs of rows (bit-equal to each row's own step)."""
    pos = [int(pos)] if isinstance(pos, int) or getattr(pos, "ndim", 1) == 0 else [int(p) for p in pos]
    torch.ops.tasa.decode_layers_(h, tensors, [int(i) for i in ints], k_caches, v_caches, cos, sin,
                                  int(H), pos, float(eps), float(scale), int(x_pieces))


def hadamard_block(group_size: int) -> int:
    """Rotation block of a group size (the largest power of two dividing it, at most
    ``HAD_MAX_BLOCK``)."""
    return int(_C.hadamard_block(int(group_size)))


# csrc/include/tasa/kernels.h enum tasa_isa. avx512vnni differs from avx512 in the GEMV (M = 1)
# only: int8 pieces of x against the codes (see csrc/cpu/gemm_avx512.cpp); amx from avx512vnni
# in the GEMMs with 1 < M only (the tile unit, same file).
_ISA_NAMES = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512vnni": 3, "amx": 4}


def set_cpu_isa(name: str) -> None:
    """Caps the CPU kernels' instruction set ("scalar", "avx2", "avx512", "avx512vnni", "amx") or lifts the cap
    ("auto"). For tests and benchmarks; the default is the best the CPU has."""
    if name == "auto":
        _C.set_cpu_isa(-1)
    elif name in _ISA_NAMES:
        _C.set_cpu_isa(_ISA_NAMES[name])
    else:
        raise ValueError(f"tasa: unknown ISA {name!r}; choose from 'auto', {sorted(_ISA_NAMES)}")


def set_dense_rows(rows: Optional[int]) -> None:
    """From how many rows of x (tokens: a prefill) the CPU ``gemm`` dequantizes the matrix once,
    in cache-sized column chunks, and runs torch's matmul on it (bf16 x: a bf16 matmul, AMX on
    CPUs that have it; fp32 / fp16 x: fp32) instead of the fused kernel. 0: never; None: the
    measured default (:data:`DENSE_ROWS_DEFAULT`). For tests and benchmarks."""
    if rows is None:
        rows = DENSE_ROWS_DEFAULT
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"tasa: dense rows must be an int >= 0 (0: never) or None, got {rows!r}")
    _C.set_dense_rows(rows)


def dense_rows() -> int:
    return int(_C.dense_rows())


def set_gemv_rows(rows: Optional[int]) -> None:
    """Up to how many rows of x (2 <= M <= rows: a batched decode step, a speculative draft)
    the CPU ``gemm``'s AVX2 kernel decodes each weight once for all rows, as the GEMV does,
    instead of dequantizing every group into a cache buffer first. 1: never; None: the measured
    default. At most ``GEMV_ROWS_MAX``. For tests and benchmarks."""
    if rows is None:
        rows = -1
    elif isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= GEMV_ROWS_MAX:
        raise ValueError(f"tasa: gemv rows must be an int in 1..{GEMV_ROWS_MAX} (1: off) or "
                         f"None, got {rows!r}")
    _C.set_gemv_rows(rows)


def gemv_rows() -> int:
    return int(_C.gemv_rows())


def set_gemv_i8(on: Optional[bool]) -> None:
    """Whether the CPU ``gemm``'s AVX2 GEMV (M = 1) multiplies its 2-, 3- and 4-bit groups as int8
    pieces of x times the codes as bytes (vpmaddubsw; the AVX-512 VNNI path's pieces, error
    <= 254^-3 of each group's largest |x| for fp32 x) instead of converting every code to fp32.
    None: the default (on). For tests and benchmarks."""
    if on is not None and not isinstance(on, bool):
        raise ValueError(f"tasa: gemv_i8 must be True, False or None, got {on!r}")
    _C.set_gemv_i8(-1 if on is None else int(on))


def gemv_i8() -> bool:
    return bool(_C.gemv_i8())


def set_x_pieces(n: Optional[int]) -> None:
    """How many int8 pieces fp32 x is split into by the CPU int8 GEMVs (M = 1: the AVX2
    vpmaddubsw one, the AVX-512 VNNI one): 3 (error <= 254^-3 of each group's largest |x|) or 2
    (254^-2: bf16 x's precision; one vpmaddubsw less per code vector). None: the default
    (:func:`x_pieces` tells it). bf16 x always uses 2 pieces, fp16 x 3."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n not in (2, 3)):
        raise ValueError(f"tasa: x_pieces must be 2, 3 or None, got {n!r}")
    _C.set_x_pieces(-1 if n is None else int(n))


def x_pieces() -> int:
    return int(_C.x_pieces())


DENSE_ROWS_DEFAULT = int(_C.DENSE_ROWS_DEFAULT)
GEMV_ROWS_MAX = int(_C.GEMV_ROWS_MAX)


def cpu_isas_available() -> list:
    """Every CPU instruction-set path this machine can run, lowest first."""
    detected = int(_C.cpu_isa_detected())
    return [k for k, v in sorted(_ISA_NAMES.items(), key=lambda kv: kv[1]) if v <= detected]


def cpu_isa() -> str:
    return {v: k for k, v in _ISA_NAMES.items()}[int(_C.cpu_isa())]


def build_info() -> dict:
    return {
        "format_version": int(_C.FORMAT_VERSION),
        "with_cuda": bool(_C.WITH_CUDA),
        "cpu_isa": cpu_isa(),
        "cpu_isa_detected": {v: k for k, v in _ISA_NAMES.items()}[int(_C.cpu_isa_detected())],
        "dense_rows": dense_rows(),
        "gemv_rows": gemv_rows(),
        "gemv_i8": gemv_i8(),
        "x_pieces": x_pieces(),
        "torch": torch.__version__,
    }
