"""Group parameters by a clipping search (issue 27 item 3): the scale / zero point of each
(group, output row) chosen among shrunken ranges to minimise the (Hessian-diagonal weighted)
squared rounding error, instead of the min/max range of :func:`~tasa.quant.rtn.rtn_params`.

Min/max spends the code range on the group's largest weight; a slightly clipped range rounds
the many small weights more finely. llama.cpp's k-quants (``make_qx_quants`` with the
importance matrix as weights) and GPTQ's reference ``find_params(mse=True)`` (as GPTQModel's
``mse`` option) search the same way. The candidates are ``p * range`` for ``p`` in
:data:`SHRINK` (1.0 included, so the result is never worse than min/max on the weighted error
it minimises); scales stay exactly representable in fp16 and zero points integer, so the
packed format and every kernel are unchanged.

Two registered methods:

* ``rtn-mse``: round-to-nearest with the searched parameters, no data (each weight's error
  weighted by its square, as llama.cpp without an importance matrix);
* ``gptq-mse``: GPTQ whose group parameters, computed when each group starts from the
  error-updated weights, are searched with ``diag(H)`` of the group's columns as weights.
"""
from __future__ import annotations

from typing import Optional

import torch

import tasa_ext

from .gptq import GPTQ
from .methods import register_method
from .rtn import RTN, QuantizedWeight, quantize_rtn

__all__ = ["SHRINK", "mse_params", "w2_params", "quantize_rtn_mse", "RTNMSE", "GPTQMSE"]

# range factors tried: 1.0 (min/max) down to 0.5 in steps of 0.025 (21 candidates)
SHRINK = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))


def mse_params(W: torch.Tensor, bits: int, sym: bool, weight: Optional[torch.Tensor] = None,
               shrink=SHRINK):
    """Scale and zero point ``[...]`` of each row of ``W [..., G]`` minimising
    ``sum_k weight_k (w_k - q(w_k))^2`` over the ranges ``p * range``, ``p`` in ``shrink``
    (``weight`` non-negative, ``[G]`` shared by the rows or one per weight, ``W``'s shape;
    None: all ones). Same conventions as :func:`rtn_params`."""
    if weight is not None:
        if weight.shape != W.shape[-1:] and weight.shape != W.shape:
            raise ValueError(f"tasa: mse_params weight has shape {tuple(weight.shape)}, the "
                             f"groups are {W.shape[-1]} wide")
        if not torch.isfinite(weight).all() or (weight < 0).any():
            raise ValueError("tasa: mse_params weights must be finite and >= 0")
    if 1.0 not in shrink:
        raise ValueError("tasa: the shrink factors must include 1.0 (min/max)")
    shrink_t = torch.tensor([float(p) for p in shrink], dtype=torch.float32)
    Wf = W.float()
    wf = None if weight is None else weight.float().contiguous()
    # the tasa::mse_params kernel: the same candidates per row, 3-8x faster than the torch
    # loop it replaced on SmolLM2's shapes (tasa_ext.reference.mse_params, the tests' oracle;
    # benchmarks/results/bench_quantizers_smollm2-135m.md, AMD EPYC)
    s, z = tasa_ext.mse_params(Wf.contiguous(), bits, sym, wf, shrink_t.to(W.device))
    return s.to(W.dtype), z.to(W.dtype)


def w2_params(W: torch.Tensor, bits: int, sym: bool):
    """:func:`mse_params` with each weight's error weighted by its own square (llama.cpp's rule
    for its k-quants without an importance matrix): an unweighted search clipped the large
    weights that carry the output and measured WORSE than min/max on SmolLM2 (W3 KL 3.56 vs
    2.48, benchmarks/results/mse_methods_smollm2-135m.md)."""
    return mse_params(W, bits, sym, W.float() ** 2)


def quantize_rtn_mse(W: torch.Tensor, spec, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest with :func:`w2_params` per (group, row)."""
    return quantize_rtn(W, spec, name=name, params=w2_params)


@register_method
class RTNMSE(RTN):
    """Round-to-nearest with a clipping search per group (:func:`w2_params`)."""
    name = "rtn-mse"
    description = "round-to-nearest, per-group clipping search on the w^2-weighted error (no data)"
    params = staticmethod(w2_params)


@register_method
class GPTQMSE(GPTQ):
    """GPTQ whose group parameters come from :func:`mse_params` weighted by the group's
    ``diag(H)`` (:func:`~tasa.quant.gptq.quantize_gptq` with ``params=``)."""
    name = "gptq-mse"
    description = "GPTQ with a diag(H)-weighted clipping search per group (calibration data)"
    params = staticmethod(mse_params)
