"""TasaLinear: a packed mixed-precision linear layer, and swapping it into a model.

Buffers of a ``TasaLinear`` with ``in_features = K``, ``out_features = N``, group size ``G``
(``n_groups = K / G``), ``R = sum_g bits_g * G / 32`` packed rows:

=========  ======  ==========================  ==============================================
qweight    int32   [ceil(N/16), R, 16]          packed codes (csrc/include/tasa/format.h)
scales     fp16    [n_groups, N]                *stored* group order (row j = gtable[j, 2])
zeros      fp16    [n_groups, N] or absent      asymmetric mode only, stored group order
gtable     int32   [n_groups, 3]                (bits, packed-row offset, logical group)
perm       int32   [K] or absent                act-order: logical row r is channel perm[r]
bias       (dtype) [N] or absent
=========  ======  ==========================  ==============================================

A *rotated* matrix (``spec.hadamard``, format version 2: the codes hold ``W R``) has no
extra buffer: ``forward`` rotates x first (``tasa_ext.hadamard``) and :meth:`dequantize`
rotates the rows back.

``forward(x [..., K]) -> [..., N]`` calls ``tasa_ext.gemm`` (C++ on CPU, CUDA on GPU: the same
op), fp32 accumulation, output in x's dtype (fp32, bf16 or fp16).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

import tasa_ext
from tasa_ext.format import QuantMode

from .quant import LayerSpec, QuantizedWeight, get_method

__all__ = ["TasaLinear", "TasaEmbedding", "TasaTiedHead", "make_gtable", "expected_buffers", "validate_tables", "set_module",
           "swap_linears", "quantized_modules"]


def make_gtable(bits: Sequence[int], group_size: int) -> torch.Tensor:
    """Stored-order group table for logical ``bits`` (what ``tasa_ext.pack`` returns)."""
    b = torch.tensor([int(x) for x in bits], dtype=torch.int64)
    order = torch.sort(b, stable=True).indices
    sb = b[order]
    rows = sb * (group_size // tasa_ext.TILE_K)
    return torch.stack([sb, torch.cumsum(rows, 0) - rows, order], 1).to(torch.int32)


def expected_buffers(in_features: int, out_features: int, spec: LayerSpec,
                     bias: bool = False) -> dict:
    """``{buffer name: (shape, dtype)}`` of a TasaLinear for ``spec`` (the module docstring's
    table; ``bias``'s dtype is the model's, given as None): what a checkpoint must hold."""
    n_groups = in_features // spec.group_size
    R = int(sum(spec.bits)) * spec.group_size // tasa_ext.TILE_K
    nb = (out_features + tasa_ext.COL_BLOCK - 1) // tasa_ext.COL_BLOCK
    out = {"qweight": ((nb, R, tasa_ext.COL_BLOCK), torch.int32),
           "scales": ((n_groups, out_features), torch.float16)}
    if spec.mode == QuantMode.ASYM.value:
        out["zeros"] = ((n_groups, out_features), torch.float16)
    out["gtable"] = ((n_groups, 3), torch.int32)
    if spec.act_order:
        out["perm"] = ((in_features,), torch.int32)
    if bias:
        out["bias"] = ((out_features,), None)
    return out


def validate_tables(m: "TasaLinear", name: str = "TasaLinear") -> None:
    """Raises ``ValueError`` unless ``m``'s group table is a valid stored-order table for its K
    (supported widths sorted ascending, contiguous packed-row offsets, logical groups a
    permutation) and its ``perm`` (if any) a permutation of range(K): loaded values, checked
    once before any kernel trusts them as offsets."""
    gt = m.gtable.detach().cpu().long()
    G, K = m.group_size, m.in_features
    ng = K // G
    if gt.shape != (ng, 3):
        raise ValueError(f"tasa: {name}.gtable has shape {tuple(gt.shape)}, expected ({ng}, 3)")
    bits, off, logical = gt[:, 0], gt[:, 1], gt[:, 2]
    ok_bits = all(int(b) in tasa_ext.SUPPORTED_BITS for b in bits)
    rows = bits * (G // tasa_ext.TILE_K)
    ok_off = ng == 0 or (int(off[0]) == 0 and torch.equal(off[1:], torch.cumsum(rows, 0)[:-1]))
    ok_sorted = bool((bits[1:] >= bits[:-1]).all()) if ng > 1 else True
    ok_logical = torch.equal(torch.sort(logical).values, torch.arange(ng))
    R = m.qweight.shape[1]
    if not (ok_bits and ok_off and ok_sorted and ok_logical) or int(rows.sum()) != R:
        raise ValueError(f"tasa: {name}.gtable is not a valid group table for K={K}, "
                         f"group_size={G} and {R} packed rows")
    if m.perm is not None:
        p = m.perm.detach().cpu().long()
        if p.shape != (K,) or not torch.equal(torch.sort(p).values, torch.arange(K)):
            raise ValueError(f"tasa: {name}.perm is not a permutation of range({K})")


class _Packed(nn.Module):
    """The packed buffers of one quantized matrix W [N, K] (the module docstring's table) and
    what does not depend on how W is used: dtype-safe moves, widths, cost, dequantization.
    :class:`TasaLinear` multiplies with it; :class:`TasaEmbedding` looks rows of it up."""

    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        spec.validate(out_features, in_features, type(self).__name__)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.group_size = spec.group_size
        self.mode = spec.mode
        self.act_order = spec.act_order
        self.hadamard = spec.hadamard
        n_groups = in_features // spec.group_size
        gtable = make_gtable(spec.bits, spec.group_size)
        R = int(sum(spec.bits)) * spec.group_size // tasa_ext.TILE_K
        nb = (out_features + tasa_ext.COL_BLOCK - 1) // tasa_ext.COL_BLOCK
        self.register_buffer("qweight", torch.zeros(nb, R, tasa_ext.COL_BLOCK, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=torch.float16,
                                                  device=device))
        if spec.mode == QuantMode.ASYM.value:
            self.register_buffer("zeros", torch.zeros(n_groups, out_features, dtype=torch.float16,
                                                      device=device))
        else:
            self.register_buffer("zeros", None)
        self.register_buffer("gtable", gtable.to(device))
        if spec.act_order:
            self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device))
        else:
            self.register_buffer("perm", None)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_buffer("bias", None)

    def _load_packed(self, q: QuantizedWeight) -> None:
        """Packs a :class:`tasa.quant.QuantizedWeight` (logical-order codes/scales/zeros) into
        this module's buffers."""
        dev = q.codes.device
        qweight, gtable = tasa_ext.pack(q.codes.contiguous(),
                                        torch.tensor(q.bits, dtype=torch.int32, device=dev),
                                        q.group_size)
        order = gtable[:, 2].long()
        self.qweight = qweight
        self.gtable = gtable
        self.scales = q.scales.to(torch.float16)[order].contiguous()
        if q.zeros is not None:
            self.zeros = q.zeros.to(torch.float16)[order].contiguous()
        if q.perm is not None:
            self.perm = q.perm.to(torch.int32).contiguous()

    # -- dtype / device moves -----------------------------------------------------------------
    _PACKED = ("qweight", "scales", "zeros", "gtable", "perm")

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)`` / ``.half()`` / ``.bfloat16()`` must not cast the packed format:
        the fp16 scales and zeros are part of it (a bf16 copy loses 3 mantissa bits and the
        kernels refuse it) and the codes are int32 words. Those buffers follow device moves
        only; the bias follows ``fn`` entirely (it is added in the activations' dtype)."""
        for name in self._PACKED:
            t = self._buffers.get(name)
            if t is not None:
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        if self._buffers.get("bias") is not None:
            self._buffers["bias"] = fn(self._buffers["bias"])
        return self

    # -- views ----------------------------------------------------------------------------
    @property
    def group_bits(self) -> list:
        """Bits per *logical* group."""
        bits = [0] * self.gtable.shape[0]
        for b, _, lg in self.gtable.tolist():
            bits[lg] = b
        return bits

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec(self.group_bits, self.group_size, self.mode, self.perm is not None,
                         hadamard=self.hadamard)

    def average_bits(self) -> float:
        return tasa_ext.average_bits(self.out_features, self.in_features, self.group_size,
                                     self.group_bits, self.mode, self.perm is not None)

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32 in input-channel order (``tasa_ext.dequant``; a rotated matrix rotated
        back)."""
        W = tasa_ext.dequant(self.qweight, self.scales, self.zeros, self.gtable, self.perm,
                             self.group_size)
        return tasa_ext.hadamard(W, self.group_size, True) if self.hadamard else W


class TasaLinear(_Packed):
    """A linear layer with packed 2/3/4/8-bit weights (mixed per group). See module docstring
    for the buffers. Build with :meth:`from_linear` / :meth:`from_quantized`, or as an empty
    skeleton ``TasaLinear(K, N, spec)`` to load a state dict into."""

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "TasaLinear":
        """Packs a :class:`tasa.quant.QuantizedWeight` (logical-order codes/scales/zeros)."""
        N, K = q.codes.shape
        spec = LayerSpec(q.bits, q.group_size, q.mode, q.perm is not None, hadamard=q.hadamard)
        m = cls(K, N, spec, bias=bias is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float32, device=q.codes.device)
        m._load_packed(q)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    @classmethod
    def skeleton_of(cls, linear: nn.Linear, spec: LayerSpec) -> "TasaLinear":
        """An empty TasaLinear with ``linear``'s shapes, bias and device for ``spec``: the
        buffers a saved or broadcast state is loaded into."""
        return cls(linear.in_features, linear.out_features, spec, bias=linear.bias is not None,
                   bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32,
                   device=linear.weight.device)

    @classmethod
    def concat(cls, mods: Sequence["TasaLinear"]) -> Optional["TasaLinear"]:
        """One TasaLinear computing ``mods`` (same input) side by side -- concatenated along
        the output features -- or None where their formats differ (group widths, mode,
        permutation, bias, a column count that is not whole 16-column blocks). Each output
        column is still its own dot product over K in the same order, so the results are the
        same bits (tasa's decode loop fuses q/k/v and gate/up this way)."""
        m0 = mods[0]
        if not all(isinstance(m, TasaLinear) for m in mods):
            return None
        same = all(m.in_features == m0.in_features and m.group_size == m0.group_size and
                   m.mode == m0.mode and torch.equal(m.gtable, m0.gtable) and
                   m.hadamard == m0.hadamard and
                   (m.perm is None) == (m0.perm is None) and
                   (m.perm is None or torch.equal(m.perm, m0.perm)) and
                   (m.bias is None) == (m0.bias is None) and m.out_features % 16 == 0
                   for m in mods)
        if not same:
            return None
        f = cls(m0.in_features, sum(m.out_features for m in mods), m0.spec,
                bias=m0.bias is not None,
                bias_dtype=m0.bias.dtype if m0.bias is not None else torch.float32)
        f.qweight = torch.cat([m.qweight for m in mods], 0)     # 16-column blocks stack
        f.scales = torch.cat([m.scales for m in mods], 1)
        if m0.zeros is not None:
            f.zeros = torch.cat([m.zeros for m in mods], 1)
        f.gtable, f.perm = m0.gtable, m0.perm
        if m0.bias is not None:
            f.bias = torch.cat([m.bias for m in mods], 0)
        return f

    def packed_state(self) -> dict:
        """``{buffer name: tensor}`` of every tensor that defines this layer (the packed format
        and the bias), in a fixed order: what is broadcast or copied to rebuild it."""
        return {k: v for k, v in sorted(self._buffers.items()) if v is not None}

    def set_packed(self, name: str, t: torch.Tensor) -> None:
        """Replaces one tensor of :meth:`packed_state` (same name, dtype and shape)."""
        have = self._buffers.get(name)
        if have is None or have.dtype != t.dtype or have.shape != t.shape:
            raise ValueError(f"tasa: {name} of a TasaLinear must be {None if have is None else (have.dtype, tuple(have.shape))}, "
                             f"got {(t.dtype, tuple(t.shape))}")
        self._buffers[name] = t

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LayerSpec, method: str = "rtn",
                    H: Optional[torch.Tensor] = None, damp: float = 0.01,
                    name: str = "linear") -> "TasaLinear":
        """Quantizes ``linear.weight`` with a registered method (:data:`tasa.quant.METHODS`:
        ``"rtn"``, or ``"gptq"`` with the Hessian ``H [K, K]``) according to ``spec`` and
        packs it."""
        meth = get_method(method)
        if meth.needs_hessian and H is None:
            raise ValueError(f"tasa: method={meth.name!r} needs the Hessian H")
        q = meth.quantize(linear.weight, spec, H, damp=damp, name=name)
        return cls.from_quantized(q, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tasa_ext.gemm(x, self.qweight, self.scales, self.zeros, self.gtable, self.perm,
                          self.group_size, bool(self.hadamard))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def bound(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`forward` as a closure over the buffers as they are now (the same op, the
        same bits). Why: a module call reads six buffers through ``nn.Module.__getattr__``
        (~1.2 us each) and runs ``_call_impl``: on a 16 x 128 rotated matrix 22.9 us per call
        against 10.0 us for the closure (AVX2 EPYC, 2026-12-07), and tasa's decode loop makes
        ~125 such calls per SmolLM2 step. The closure keeps the tensors it was made with, so
        it is made again after the buffers change (a device move, ``load_state_dict``): the
        decode loop makes its closures per generation."""
        gemm = torch.ops.tasa.gemm
        args = (self.qweight, self.scales, self.zeros, self.gtable, self.perm,
                int(self.group_size), bool(self.hadamard))
        bias = self.bias
        if bias is None:
            return lambda x: gemm(x, *args)

        def call(x):
            y = gemm(x, *args)
            return y + bias.to(y.dtype)
        return call

    def extra_repr(self) -> str:
        hist = dict(sorted(Counter(self.group_bits).items()))
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, mode={self.mode}, act_order={self.perm is not None}, "
                + ("hadamard=True, " if self.hadamard else "") +
                f"bits={hist}, avg_bits={self.average_bits():.4f}, bias={self.bias is not None}")


class TasaEmbedding(_Packed):
    """A token embedding stored packed: the table E [num_embeddings, embedding_dim] is the packed
    matrix W [N = vocabulary, K = hidden] (the buffers of :class:`TasaLinear`, groups along the
    hidden dimension), and a lookup dequantizes the rows it names (``tasa_ext.embed``), as
    llama.cpp's Q8_0/Q6_K ``token_embd`` is read. Why packed: SmolLM2-135M's fp32 embedding was
    113 of the 160 MB of its "3.5-bit" file; at 8 bits it is 29 MB.

    ``embed_scale`` multiplies every looked-up row (Gemma's ``sqrt(hidden)``, applied in fp32
    as its module does for fp32 weights); lookups come out in ``out_dtype`` (the model's dtype:
    it follows ``model.to(dtype)``, the packed buffers do not). A tied output projection reads
    the same buffers through :class:`TasaTiedHead`: one tensor in the file, none duplicated."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: LayerSpec,
                 embed_scale: Optional[float] = None, out_dtype: torch.dtype = torch.float32,
                 device=None):
        if spec.hadamard:
            raise ValueError("tasa: an embedding is looked up by row, it cannot be stored "
                             "rotated (hadamard)")
        super().__init__(embedding_dim, num_embeddings, spec, device=device)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.embed_scale = None if embed_scale is None else float(embed_scale)
        self.out_dtype = out_dtype

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, embed_scale: Optional[float] = None,
                       out_dtype: torch.dtype = torch.float32) -> "TasaEmbedding":
        N, K = q.codes.shape
        if q.perm is not None:
            raise ValueError("tasa: an embedding has no input order to permute (act_order)")
        m = cls(N, K, LayerSpec(q.bits, q.group_size, q.mode, hadamard=q.hadamard), embed_scale,
                out_dtype, device=q.codes.device)
        m._load_packed(q)
        return m

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.out_dtype))
        if probe.is_floating_point():
            self.out_dtype = probe.dtype
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = tasa_ext.embed(ids.long().contiguous(), self.qweight, self.scales, self.zeros,
                             self.gtable, self.perm, self.group_size)
        if self.embed_scale is not None:
            out = out * self.embed_scale
        return out.to(self.out_dtype)

    def extra_repr(self) -> str:
        hist = dict(sorted(Counter(self.group_bits).items()))
        return (f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}, "
                f"mode={self.mode}, bits={hist}, avg_bits={self.average_bits():.4f}"
                + (f", embed_scale={self.embed_scale:g}" if self.embed_scale is not None else ""))


class TasaTiedHead(nn.Module):
    """The output projection of a model whose head is tied to its input embedding: logits =
    h @ E^T computed by ``tasa_ext.gemm`` on the :class:`TasaEmbedding`'s own packed buffers.
    It owns no tensor (the embedding is not registered as its submodule, so the state dict and
    the file hold the table once) and follows the embedding through device moves."""

    def __init__(self, embedding: TasaEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)     # a reference, not a submodule
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings

    def average_bits(self) -> float:
        return self.embedding.average_bits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        return tasa_ext.gemm(x.contiguous(), e.qweight, e.scales, e.zeros, e.gtable, e.perm,
                             e.group_size)

    def bound(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`forward` as a closure over the embedding's buffers as they are now (see
        :meth:`TasaLinear.bound`)."""
        e, gemm = self.embedding, torch.ops.tasa.gemm
        args = (e.qweight, e.scales, e.zeros, e.gtable, e.perm, int(e.group_size), False)
        return lambda x: gemm(x.contiguous(), *args)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tied to the "
                f"packed input embedding ({self.embedding.average_bits():.4f} bits)")


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces submodule ``name`` (dotted path) of ``root``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def swap_linears(model: nn.Module, plan: Mapping[str, Union[LayerSpec, dict]],
                 quantized: Optional[Mapping[str, QuantizedWeight]] = None,
                 method: str = "rtn") -> nn.Module:
    """Replaces the nn.Linear modules named in ``plan`` by :class:`TasaLinear`.

    With ``quantized[name]`` given, that result is packed; otherwise, with a data-free method
    (``"rtn"``) the weight is quantized by it, and with ``method="skeleton"`` an empty TasaLinear of the right
    shapes is created (to load a saved state dict into). Modules not in the plan (lm_head and
    embeddings by default) stay full precision. Returns ``model``.
    """
    mods = dict(model.named_modules())
    for name, spec in plan.items():
        if not isinstance(spec, LayerSpec):
            spec = LayerSpec(**spec)
        lin = mods.get(name)
        if lin is None:
            raise KeyError(f"tasa: plan names {name!r}, which is not a module of the model")
        if isinstance(lin, TasaLinear):
            raise ValueError(f"tasa: {name} is already a TasaLinear")
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"tasa: {name} is a {type(lin).__name__}, not nn.Linear")
        spec.validate(lin.out_features, lin.in_features, name)
        if quantized is not None and name in quantized:
            new = TasaLinear.from_quantized(quantized[name], lin.bias)
        elif method == "skeleton":
            new = TasaLinear.skeleton_of(lin, spec)
        else:
            if get_method(method).needs_hessian:
                raise ValueError(f"tasa: swap_linears takes 'skeleton' or a data-free method, "
                                 f"got {method!r} (it needs a Hessian: tasa.modelquant)")
            new = TasaLinear.from_linear(lin, spec, method, name=name)
        set_module(model, name, new)
    return model


def quantized_modules(model: nn.Module) -> dict:
    """``{name: TasaLinear}`` of a model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TasaLinear)}
