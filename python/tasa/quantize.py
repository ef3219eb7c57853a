"""RTN and GPTQ weight quantization with any per-group bit pattern, and whole-model drivers.

A weight ``W [N out, K in]`` is split into groups of ``G`` input columns; logical group ``g``
uses ``bits[g]`` in {2, 3, 4, 8}. With act-order the columns are first permuted by decreasing
Hessian diagonal (``perm``, int32 [K]: logical column r is input channel perm[r]) and the groups
are formed over the *permuted* order, as in the packing format (csrc/include/tasa/format.h).

Codes ``q`` in [0, 2^b) dequantize as ``w = (q - z) * s`` with fp16 ``s`` (and fp16 ``z`` in
asymmetric mode; ``z = 2^(b-1)`` in symmetric mode). Scales are computed in fp32 and rounded to
fp16 *before* the codes are chosen, so the returned codes and fp16 parameters reproduce the
quantized weight exactly (``QuantizedWeight.dequantize``).

A *plan* maps module names to :class:`LayerSpec` (bits per group, group size, mode,
act-order); it is the JSON the allocator writes and the saved model carries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

import tasa_ext
from tasa_ext.format import QuantMode

__all__ = [
    "LayerSpec", "Plan", "plan_to_dict", "plan_from_dict", "uniform_plan", "resolve_group_size",
    "QuantizedWeight", "quantize_rtn", "quantize_gptq", "output_error", "quantize_model",
]

SUPPORTED_BITS = tuple(tasa_ext.SUPPORTED_BITS)


# ---- plans ----------------------------------------------------------------------------------

@dataclasses.dataclass
class LayerSpec:
    """How one linear is quantized: ``bits`` (one width per logical group, length K/G),
    ``group_size`` G, ``mode`` ("sym"/"asym") and ``act_order``."""

    bits: list
    group_size: int
    mode: str = "sym"
    act_order: bool = False

    def __post_init__(self):
        self.bits = [int(b) for b in self.bits]
        self.group_size = int(self.group_size)
        try:
            self.mode = QuantMode(self.mode).value
        except ValueError:
            raise ValueError(f"tasa: mode must be 'sym' or 'asym', got {self.mode!r}") from None
        self.act_order = bool(self.act_order)

    def validate(self, n_out: int, k_in: int, name: str = "layer") -> None:
        """Clear errors for a spec that does not fit a ``[n_out, k_in]`` weight."""
        G = self.group_size
        if G <= 0 or G % tasa_ext.TILE_K:
            raise ValueError(f"tasa: {name}: group_size={G} must be a positive multiple of "
                             f"{tasa_ext.TILE_K}")
        if k_in % G:
            raise ValueError(f"tasa: {name}: in_features K={k_in} is not divisible by "
                             f"group_size={G}")
        if len(self.bits) != k_in // G:
            raise ValueError(f"tasa: {name}: bit pattern has {len(self.bits)} entries but "
                             f"K/group_size = {k_in}/{G} = {k_in // G} groups")
        bad = sorted({b for b in self.bits if b not in SUPPORTED_BITS})
        if bad:
            raise ValueError(f"tasa: {name}: unsupported bit widths {bad}; "
                             f"supported: {list(SUPPORTED_BITS)}")

    def average_bits(self, n_out: int, k_in: int) -> float:
        return tasa_ext.average_bits(n_out, k_in, self.group_size, self.bits, self.mode,
                                     self.act_order)

    def cost_bits(self, n_out: int, k_in: int) -> int:
        return tasa_ext.cost_bits(n_out, k_in, self.group_size, self.bits, self.mode,
                                  self.act_order)


Plan = dict  # module name -> LayerSpec


def plan_to_dict(plan: Mapping[str, LayerSpec]) -> dict:
    """JSON-ready ``{"format_version": V, "layers": {name: {bits, group_size, mode, act_order}}}``."""
    return {"format_version": tasa_ext.FORMAT_VERSION,
            "layers": {k: dataclasses.asdict(v) for k, v in plan.items()}}


def plan_from_dict(d: Mapping) -> dict:
    """Inverse of :func:`plan_to_dict`; refuses another format version."""
    v = d.get("format_version")
    if v != tasa_ext.FORMAT_VERSION:
        raise ValueError(f"tasa: plan has format_version {v}, this build reads "
                         f"{tasa_ext.FORMAT_VERSION}")
    return {k: LayerSpec(**s) for k, s in d["layers"].items()}


def resolve_group_size(k_in: int, group_size: int) -> int:
    """The largest multiple of 32 that is <= ``group_size`` and divides ``k_in`` (e.g. 96 for
    K=576, G=128). Used by :func:`uniform_plan` with ``fit_group_size=True``."""
    for g in range(group_size - group_size % tasa_ext.TILE_K, 0, -tasa_ext.TILE_K):
        if k_in % g == 0:
            return g
    raise ValueError(f"tasa: no multiple of {tasa_ext.TILE_K} <= {group_size} divides K={k_in}")


def default_targets(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> dict:
    """The nn.Linear modules to quantize: all except names whose last component is in
    ``skip`` (lm_head stays full precision by default; embeddings are not nn.Linear)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[-1] not in skip and name not in skip:
            out[name] = m
    return out


def uniform_plan(model: nn.Module, bits: int, group_size: int = 128, mode="sym",
                 act_order: bool = False, skip: Sequence[str] = ("lm_head",),
                 fit_group_size: bool = False) -> dict:
    """Same width for every group of every target linear. ``fit_group_size``: where K is not
    divisible by ``group_size`` use :func:`resolve_group_size` instead of failing."""
    plan = {}
    for name, m in default_targets(model, skip).items():
        G = resolve_group_size(m.in_features, group_size) if fit_group_size else group_size
        spec = LayerSpec([bits] * max(1, m.in_features // G), G, mode, act_order)
        spec.validate(m.out_features, m.in_features, name)
        plan[name] = spec
    return plan


# ---- quantized weights ----------------------------------------------------------------------

@dataclasses.dataclass
class QuantizedWeight:
    """Integer codes and fp16 parameters of one matrix, all in *logical* order.

    codes  uint8 [N, K]            logical column order (permuted when ``perm`` is set)
    scales fp16  [K/G, N]          logical group order
    zeros  fp16  [K/G, N] or None  (None: symmetric, z = 2^(b-1))
    perm   int32 [K] or None       logical column r is input channel perm[r]
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    perm: Optional[torch.Tensor]
    bits: list
    group_size: int
    mode: str

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32 in input-channel order, (q - z) * s."""
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
        return W


def _check_weight(W: torch.Tensor, spec: LayerSpec, name: str) -> torch.Tensor:
    if W.dim() != 2:
        raise ValueError(f"tasa: {name}: weight must be 2-D, got shape {tuple(W.shape)}")
    spec.validate(W.shape[0], W.shape[1], name)
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(f"tasa: {name}: weight has {bad} NaN/Inf values")
    return W.detach().float()


def _group_params(Wg: torch.Tensor, bits: int, sym: bool):
    """Per-column fp16-exact scale (and zero) of one group ``Wg [N, G]`` -> fp32 tensors [N]."""
    maxq = 2 ** bits - 1
    if sym:
        amax = Wg.abs().amax(1)
        s = 2 * amax / maxq
        s = torch.where(s > 0, s, torch.ones_like(s))
        s = s.half().float()
        s = torch.where(s > 0, s, torch.full_like(s, 2.0 ** -24))  # fp16 underflow
        z = torch.full_like(s, 2.0 ** (bits - 1))
    else:
        lo = Wg.amin(1)
        hi = Wg.amax(1)
        same = hi == lo
        lo = torch.where(same, torch.minimum(lo, torch.zeros_like(lo)), lo)
        hi = torch.where(same, torch.maximum(hi, torch.zeros_like(hi)), hi)
        s = (hi - lo) / maxq
        s = torch.where(s > 0, s, torch.ones_like(s)).half().float()
        s = torch.where(s > 0, s, torch.full_like(s, 2.0 ** -24))
        z = torch.round(-lo / s).clamp(0, maxq)
    return s, z


def _quant(w: torch.Tensor, s, z, maxq):
    q = torch.clamp(torch.round(w / s) + z, 0, maxq)
    return q, (q - z) * s


def quantize_rtn(W: torch.Tensor, spec: LayerSpec, perm: Optional[torch.Tensor] = None,
                 name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest with per-(group, column) min/max parameters."""
    W = _check_weight(W, spec, name)
    if perm is not None:
        W = W[:, perm.long()]
    N, K = W.shape
    G = spec.group_size
    sym = spec.mode == "sym"
    codes = torch.empty(N, K, dtype=torch.uint8)
    scales = torch.empty(K // G, N)
    zeros = torch.empty(K // G, N)
    for g, b in enumerate(spec.bits):
        s, z = _group_params(W[:, g * G:(g + 1) * G], b, sym)
        q, _ = _quant(W[:, g * G:(g + 1) * G], s[:, None], z[:, None], 2 ** b - 1)
        codes[:, g * G:(g + 1) * G] = q.to(torch.uint8)
        scales[g], zeros[g] = s, z
    return QuantizedWeight(codes, scales.half(), None if sym else zeros.half(),
                           None if perm is None else perm.to(torch.int32), list(spec.bits), G,
                           spec.mode)


@contextlib.contextmanager
def flush_denormals():
    """Flushes fp32 denormals to zero inside the block (restored after). GPTQ's inverse-Hessian
    factors of real activations hold many denormals, which are ~10x slower on x86 CPUs."""
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def _inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag) I)^-1; raises damping on failure."""
    mean_diag = torch.mean(torch.diag(H)).item()
    if not math.isfinite(mean_diag):
        raise ValueError(f"tasa: {name}: Hessian has NaN/Inf values")
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    d = damp
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + d * max(mean_diag, 1e-12) * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info2 == 0:
                if d != damp:
                    warnings.warn(f"tasa: {name}: Hessian not positive definite at damp={damp}; "
                                  f"used damp={d}")
                return U
        d *= 10
    raise ValueError(f"tasa: {name}: Hessian is not positive definite even with damp={d / 10}")


def quantize_gptq(W: torch.Tensor, H: torch.Tensor, spec: LayerSpec, damp: float = 0.01,
                  block_size: int = 128, name: str = "weight") -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): column-by-column quantization with error feedback through the
    Cholesky factor of the damped inverse Hessian, lazy batched updates in blocks, optional
    act-order (``spec.act_order``: columns by decreasing diag(H), groups over the permuted order).

    ``H [K, K]`` is the (running-mean) Hessian ``2/n sum x x^T`` of the layer inputs. Group
    parameters are computed from the error-updated weights when the group starts; blocks are
    aligned to groups (block = a multiple of G) so those weights are up to date.
    """
    with flush_denormals():
        return _gptq(W, H, spec, damp, block_size, name)


def _gptq(W, H, spec, damp, block_size, name):
    W = _check_weight(W, spec, name).clone()
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
    U = _inverse_cholesky(H, damp, name)
    bs = G * max(1, round(block_size / G))
    codes = torch.empty(N, K, dtype=torch.uint8)
    scales = torch.empty(K // G, N)
    zeros = torch.empty(K // G, N)
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % G == 0:
                g = col // G
                b = spec.bits[g]
                s, z = _group_params(W1[:, i:i + G], b, sym)
                scales[g], zeros[g] = s, z
                maxq = 2 ** b - 1
            w = W1[:, i]
            d = U1[i, i]
            q, wq = _quant(w, s, z, maxq)
            codes[:, col] = q.to(torch.uint8)
            Q1[:, i] = wq
            err = (w - wq) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return QuantizedWeight(codes, scales.half(), None if sym else zeros.half(),
                           None if perm is None else perm.to(torch.int32), list(spec.bits), G,
                           spec.mode)


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Wq) H (W - Wq)^T)``: with H the running-mean ``2/n sum x x^T`` this is twice the
    mean squared output error summed over outputs."""
    D = W.detach().float() - Wq.detach().float()
    return float(((D @ H.float()) * D).sum())


# ---- whole model ----------------------------------------------------------------------------

def quantize_model(model: nn.Module, plan: Mapping[str, LayerSpec], method: str = "gptq",
                   calib_ids: Optional[torch.Tensor] = None, src: Optional[torch.Tensor] = None,
                   n_sources: int = 1,
                   combine: Optional[Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                   damp: float = 0.01, batch_size: int = 8, progress: bool = True) -> dict:
    """Quantizes the linears named in ``plan`` in place (swapped to :class:`tasa.nn.TasaLinear`).

    ``method="rtn"`` needs no data. ``method="gptq"`` runs GPTQ's sequential scheme through
    :func:`tasa.calib.run_blockwise`: one decoder block at a time, Hessians from the inputs the
    block receives from the *already quantized* previous blocks. ``src`` (int64 [n], one source
    id per calibration sequence, ``n_sources`` sources) accumulates one Hessian per source;
    ``combine(name, H [S,K,K], count [S]) -> H [K,K]`` merges them (default: the token-weighted
    mean, i.e. the pooled Hessian). Returns ``{"seconds", "layers", "errors"}`` where
    ``errors[name]`` is :func:`output_error` against the block's Hessian (GPTQ only).
    """
    from . import calib
    from .nn import TasaLinear, set_module

    t0 = time.perf_counter()
    errors = {}
    if method == "rtn":
        mods = dict(model.named_modules())
        missing = [k for k in plan if k not in mods]
        if missing:
            raise KeyError(f"tasa: plan names modules not in the model: {missing[:5]}")
        items = list(plan.items())
        it = items
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(items, desc="RTN", unit="layer")
        for name, spec in it:
            lin = mods[name]
            q = quantize_rtn(lin.weight, spec, name=name)
            set_module(model, name, TasaLinear.from_quantized(q, lin.bias))
    elif method == "gptq":
        if calib_ids is None:
            raise ValueError("tasa: GPTQ needs calibration token ids (calib_ids)")

        def default_combine(name, H, count):
            w = count.double() / count.sum().clamp(min=1)
            return (H.double() * w[:, None, None]).sum(0).float()

        comb = combine or default_combine

        def on_block(idx, block, prefix, hessians):
            for lname, (H, count) in hessians.items():
                full = f"{prefix}.{lname}"
                if full not in plan:
                    continue
                lin = block.get_submodule(lname)
                Hc = comb(full, H, count)
                q = quantize_gptq(lin.weight, Hc, plan[full], damp=damp, name=full)
                errors[full] = output_error(lin.weight, q.dequantize(), Hc)
                set_module(block, lname, TasaLinear.from_quantized(q, lin.bias))
            return True

        wanted = set(plan)
        calib.run_blockwise(model, calib_ids, on_block, src=src, n_sources=n_sources,
                            batch_size=batch_size, progress=progress,
                            linear_filter=lambda full: full in wanted)
        # linears outside the decoder blocks named in the plan (rare): RTN
        mods = dict(model.named_modules())
        for name, spec in plan.items():
            if isinstance(mods.get(name), nn.Linear) and name not in errors:
                raise ValueError(f"tasa: {name} is not inside a decoder block; GPTQ quantizes "
                                 f"decoder-block linears only (use method='rtn' for it)")
    else:
        raise ValueError(f"tasa: unknown method {method!r}; choose 'rtn' or 'gptq'")
    return {"seconds": time.perf_counter() - t0, "layers": len(plan), "errors": errors}
