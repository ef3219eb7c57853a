"""Quantized weights and round-to-nearest: the one RTN parameter routine of tasa.

Codes ``q`` in [0, 2^b) dequantize as ``w = (q - z) * s`` with fp16 ``s`` (and fp16 ``z`` in
asymmetric mode; ``z = 2^(b-1)`` in symmetric mode). Scales are computed in fp32 and rounded to
fp16 *before* the codes are chosen, so the returned codes and fp16 parameters reproduce the
quantized weight exactly (:meth:`QuantizedWeight.dequantize`).

:func:`rtn_params` is used by every quantizer in tasa: :func:`quantize_rtn`, GPTQ
(:mod:`tasa.quant.gptq`, per group when the group starts), and the allocator's per-group error
table (:func:`tasa.alloc.group_rtn_errors` through :func:`rtn_fake_quant`), so the errors the
allocator trades are those of the quantizer that is applied.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import tasa_ext
from tasa_ext import reference

from .methods import Method, register_method
from .spec import LayerSpec

__all__ = ["QuantizedWeight", "check_weight", "rtn_params", "quantize_codes", "rtn_fake_quant",
           "quantize_rtn"]


@dataclasses.dataclass
class QuantizedWeight:
    """Integer codes and fp16 parameters of one matrix, all in *logical* order.

    codes  uint8 [N, K]            logical column order (permuted when ``perm`` is set)
    scales fp16  [K/G, N]          logical group order
    zeros  fp16  [K/G, N] or None  (None: symmetric, z = 2^(b-1))
    perm   int32 [K] or None       logical column r is input channel perm[r]
    hadamard                       the codes hold W R (format version 2's rotation, over
                                   input channels before perm); dequantize() returns W
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    perm: Optional[torch.Tensor]
    bits: list
    group_size: int
    mode: str
    hadamard: bool = False

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32 in input-channel order, (q - z) * s (rotated back for a rotated
        matrix)."""
        G = self.group_size
        s = self.scales.float().T.repeat_interleave(G, 1)
        if self.zeros is None:
            z = torch.tensor([2.0 ** (b - 1) for b in self.bits]).repeat_interleave(G)[None, :]
        else:
            z = self.zeros.float().T.repeat_interleave(G, 1)
        W = (self.codes.float() - z) * s
        if self.perm is not None:
            out = torch.empty_like(W)
            out[:, self.perm.long()] = W
            W = out
        if self.hadamard:
            W = tasa_ext.hadamard(W.contiguous(), self.group_size, True)
        return W


def check_weight(W: torch.Tensor, spec: LayerSpec, name: str) -> torch.Tensor:
    """``W`` as fp32 after clear errors for a non-2-D, mis-shaped or non-finite weight."""
    if W.dim() != 2:
        raise ValueError(f"tasa: {name}: weight must be 2-D, got shape {tuple(W.shape)}")
    spec.validate(W.shape[0], W.shape[1], name)
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(f"tasa: {name}: weight has {bad} NaN/Inf values")
    return W.detach().float()


def rtn_params(W: torch.Tensor, bits: int, sym: bool):
    """Min/max scale and zero point over the last axis of ``W [..., G]`` -> two tensors
    ``[...]`` in W's dtype, the scale exactly representable in fp16.

    sym: ``s = 2 max|w| / (2^b - 1)``, ``z = 2^(b-1)``. asym: the range ``[min(w, 0), max(w,
    0)]`` (always containing 0, as in reference GPTQ), ``s = range / (2^b - 1)``,
    ``z = round(-min / s)``. A zero scale (all-zero group) becomes 1 and
    an fp16 underflow the smallest fp16 subnormal, so ``w / s`` is always finite.
    """
    # one copy of the arithmetic: the reference the kernels' tests also use (tasa_ext's
    # mse_params kernel computes its candidates the same way, tests/test_ops.py)
    return reference.rtn_params(W, bits, sym)


def quantize_codes(w: torch.Tensor, s, z, maxq: int):
    """Codes ``clamp(round(w / s) + z, 0, maxq)`` and their dequantized values ``(q - z) s``."""
    q = torch.clamp(torch.round(w / s) + z, 0, maxq)
    return q, (q - z) * s


def rtn_fake_quant(W: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """``W [..., G]`` round-to-nearest quantized and dequantized along the last axis, with the
    parameters of :func:`rtn_params` (one scale/zero per row of the last axis)."""
    s, z = rtn_params(W, bits, sym)
    return quantize_codes(W, s[..., None], z[..., None], 2 ** bits - 1)[1]


def quantize_rtn(W: torch.Tensor, spec: LayerSpec, perm: Optional[torch.Tensor] = None,
                 name: str = "weight", params=None) -> QuantizedWeight:
    """Round-to-nearest with per-(group, column) parameters: min/max (:func:`rtn_params`), or
    ``params(W_group [N, G], bits, sym) -> (s, z)`` (e.g. :mod:`tasa.quant.mse`'s search)."""
    W = check_weight(W, spec, name)
    if perm is not None:
        W = W[:, perm.long()]
    N, K = W.shape
    G = spec.group_size
    sym = spec.mode == "sym"
    codes = torch.empty(N, K, dtype=torch.uint8)
    scales = torch.empty(K // G, N)
    zeros = torch.empty(K // G, N)
    for g, b in enumerate(spec.bits):
        Wg = W[:, g * G:(g + 1) * G]
        s, z = (params or rtn_params)(Wg, b, sym)
        q, _ = quantize_codes(Wg, s[:, None], z[:, None], 2 ** b - 1)
        codes[:, g * G:(g + 1) * G] = q.to(torch.uint8)
        scales[g], zeros[g] = s, z
    return QuantizedWeight(codes, scales.half(), None if sym else zeros.half(),
                           None if perm is None else perm.to(torch.int32), list(spec.bits), G,
                           spec.mode)


@register_method
class RTN(Method):
    """Round-to-nearest per group (:func:`quantize_rtn`): no data, no Hessian."""
    name = "rtn"
    needs_hessian = False
    description = "round-to-nearest, per-group min/max (no data)"

    #: the group-parameter routine (None: min/max, :func:`rtn_params`); a subclass that only
    #: changes it is a new method (:mod:`tasa.quant.mse`)
    params = None

    def quantize(self, W, spec, H=None, *, damp=0.01, name="weight"):
        if spec.act_order:
            raise ValueError(f"tasa: {name}: act_order orders columns by the Hessian; {self.name} "
                             f"has none (use a method that needs one, e.g. 'gptq')")
        return quantize_rtn(W, spec, name=name, params=self.params)
