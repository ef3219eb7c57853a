"""GPTQ (Frantar et al. 2022) on one matrix, fed a Hessian by the caller (the model driver,
:mod:`tasa.modelquant`, or anyone with ``H``). Group parameters come from :func:`rtn_params`.
"""
from __future__ import annotations

import math
import warnings

import torch

import tasa_ext

from ..util import flush_denormals
from .methods import Method, register_method
from .rtn import QuantizedWeight, check_weight, rtn_params
from .spec import LayerSpec

__all__ = ["quantize_gptq", "output_error"]


def _inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag) I)^-1; raises damping on failure."""
    mean_diag = torch.mean(torch.diag(H)).item()
    if not math.isfinite(mean_diag):
        raise ValueError(f"tasa: {name}: Hessian has NaN/Inf values")
    d = damp
    for _ in range(6):
        Hd = H.clone()          # damped in place: no K x K identity (K^2 floats less at peak)
        Hd.diagonal().add_(d * max(mean_diag, 1e-12))
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info2 == 0:
                if d != damp:
                    warnings.warn(f"tasa: {name}: Hessian not positive definite at damp={damp}; "
                                  f"used damp={d}")
                return U
        d *= 10
    raise ValueError(f"tasa: {name}: Hessian is not positive definite even with damp={d / 10}")


def quantize_gptq(W: torch.Tensor, H: torch.Tensor, spec: LayerSpec, damp: float = 0.01,
                  block_size: int = 128, name: str = "weight", params=None) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): column-by-column quantization with error feedback through the
    Cholesky factor of the damped inverse Hessian, lazy batched updates in blocks, optional
    act-order (``spec.act_order``: columns by decreasing diag(H), groups over the permuted order).

    ``H [K, K]`` is the (running-mean) Hessian ``2/n sum x x^T`` of the layer inputs. Group
    parameters are computed from the error-updated weights when the group starts; blocks are
    aligned to groups (block = a multiple of G) so those weights are up to date.

    ``params``: the group-parameter routine, ``params(W_group [N, G], bits, sym, weight [G])``
    with ``weight`` the group's ``diag(H)`` (default: :func:`rtn_params`, min/max, unweighted;
    :func:`tasa.quant.mse.mse_params` searches clipped ranges).
    """
    with flush_denormals():
        return _gptq(W, H, spec, damp, block_size, name, params)


def _gptq(W, H, spec, damp, block_size, name, params=None):
    W = check_weight(W, spec, name).clone()
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"tasa: {name}: Hessian shape {tuple(H.shape)} != ({K}, {K})")
    H = H.detach().float().clone()
    G = spec.group_size
    sym = spec.mode == "sym"
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if spec.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    hdiag = torch.diag(H).clone()
    U = _inverse_cholesky(H, damp, name)
    bs = G * max(1, round(block_size / G))
    codes = torch.empty(N, K, dtype=torch.uint8)
    scales = torch.empty(K // G, N)
    zeros = torch.empty(K // G, N)
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2].contiguous()
        Err1 = torch.zeros_like(W1)
        C1 = torch.empty(W1.shape, dtype=torch.uint8, device=W1.device)
        U1 = U[i1:i2, i1:i2].contiguous()
        for i in range(0, i2 - i1, G):          # blocks are whole groups
            col = i1 + i
            g = col // G
            b = spec.bits[g]
            if params is None:
                s, z = rtn_params(W1[:, i:i + G], b, sym)
            else:
                s, z = params(W1[:, i:i + G], b, sym, hdiag[col:col + G])
            scales[g], zeros[g] = s, z
            # the column loop: the tasa::gptq_cols_ kernel (bit for bit the torch loop,
            # tests/test_ops.py and tests/test_quantize.py)
            tasa_ext.gptq_cols_(W1, U1, s.float().contiguous(), z.float().contiguous(),
                                2 ** b - 1, i, i + G, C1, Err1)
        codes[:, i1:i2] = C1.cpu()
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return QuantizedWeight(codes, scales.half(), None if sym else zeros.half(),
                           None if perm is None else perm.to(torch.int32), list(spec.bits), G,
                           spec.mode)


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Wq) H (W - Wq)^T)``: with H the running-mean ``2/n sum x x^T`` this is twice the
    mean squared output error summed over outputs."""
    D = W.detach().float() - Wq.detach().float()
    return float(((D @ H.float()) * D).sum())




@register_method
class GPTQ(Method):
    """GPTQ (:func:`quantize_gptq`) on the Hessian of the layer's calibration inputs."""
    name = "gptq"
    needs_hessian = True
    description = "GPTQ with error feedback (calibration data)"

    #: the group-parameter routine (None: min/max); see :func:`quantize_gptq`'s ``params``
    params = None

    def quantize(self, W, spec, H=None, *, damp=0.01, name="weight"):
        if H is None:
            raise ValueError(f"tasa: GPTQ of {name} needs its Hessian")
        return quantize_gptq(W, H, spec, damp=damp, name=name, params=self.params)
