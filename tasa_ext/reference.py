"""Pure-torch twins of the tasa ops: the semantics in plain tensor code, written independently
of the C++/CUDA kernels (same spec, csrc/include/tasa/format.h), used as the test oracle and
usable on any device torch supports."""
from __future__ import annotations

from typing import Optional

import torch

TILE_K = 32
COL_BLOCK = 16
_BITS = (2, 3, 4, 8)


def make_gtable(group_bits: torch.Tensor, group_size: int):
    """Stored-order group table (bits, packed-row offset, logical group) and packed rows R."""
    gb = group_bits.to(torch.int64).cpu()
    if not all(int(b) in _BITS for b in gb):
        raise ValueError(f"group_bits: unsupported width in {sorted(set(gb.tolist()))}")
    order = torch.sort(gb, stable=True).indices
    bits = gb[order]
    rows = bits * (group_size // TILE_K)
    offsets = torch.cumsum(rows, 0) - rows
    gtable = torch.stack([bits, offsets, order], 1).to(torch.int32)
    return gtable, int(rows.sum())


def _tile_words(codes: torch.Tensor, b: int) -> torch.Tensor:
    """codes [..., 32] (int64) -> words [..., b] (int64 holding uint32): code i at bits b*i."""
    words = torch.zeros(*codes.shape[:-1], b, dtype=torch.int64, device=codes.device)
    for i in range(TILE_K):
        bit = b * i
        w, sh = divmod(bit, 32)
        words[..., w] |= (codes[..., i] << sh) & 0xFFFFFFFF
        if sh + b > 32:
            words[..., w + 1] |= codes[..., i] >> (32 - sh)
    return words


def _tile_codes(words: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of _tile_words: words [..., b] (int64 holding uint32) -> codes [..., 32]."""
    out = []
    mask = (1 << b) - 1
    for i in range(TILE_K):
        bit = b * i
        w, sh = divmod(bit, 32)
        v = words[..., w] >> sh
        if sh + b > 32:
            v = v | (words[..., w + 1] << (32 - sh))
        out.append(v & mask)
    return torch.stack(out, -1)


def _to_i32(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


def pack(codes: torch.Tensor, group_bits: torch.Tensor, group_size: int):
    N, K = codes.shape
    if K % group_size or group_size % TILE_K:
        raise ValueError(f"group_size={group_size} must be a multiple of 32 dividing K={K}")
    gtable, R = make_gtable(group_bits, group_size)
    NB = (N + COL_BLOCK - 1) // COL_BLOCK
    c = torch.zeros(NB * COL_BLOCK, K, dtype=torch.int64, device=codes.device)
    c[:N] = codes.to(torch.int64)
    q = torch.zeros(NB, R, COL_BLOCK, dtype=torch.int64, device=codes.device)
    tiles = group_size // TILE_K
    for b, off, lg in gtable.tolist():
        if int(c[:, lg * group_size:(lg + 1) * group_size].max()) >= (1 << b):
            raise ValueError(f"codes: group {lg} has a code >= 2^{b}")
        g = c[:, lg * group_size:(lg + 1) * group_size].reshape(NB, COL_BLOCK, tiles, TILE_K)
        words = _tile_words(g, b)                       # [NB, 16, tiles, b]
        q[:, off:off + tiles * b, :] = words.permute(0, 2, 3, 1).reshape(NB, tiles * b, COL_BLOCK)
    return _to_i32(q), gtable.to(codes.device)


def unpack(qweight: torch.Tensor, gtable: torch.Tensor, N: int, group_size: int) -> torch.Tensor:
    NB, R, _ = qweight.shape
    n_groups = gtable.shape[0]
    K = n_groups * group_size
    tiles = group_size // TILE_K
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(NB * COL_BLOCK, K, dtype=torch.int64, device=qweight.device)
    for b, off, lg in gtable.tolist():
        words = q[:, off:off + tiles * b, :].reshape(NB, tiles, b, COL_BLOCK).permute(0, 3, 1, 2)
        out[:, lg * group_size:(lg + 1) * group_size] = _tile_codes(words, b).reshape(NB * COL_BLOCK, group_size)
    return out[:N].to(torch.uint8)


def dequant(qweight, scales, zeros, gtable, perm, group_size, dtype=torch.float32) -> torch.Tensor:
    """W [N, K] in input-channel order, computed in float64 and rounded once to ``dtype``."""
    N = scales.shape[1]
    codes = unpack(qweight, gtable, N, group_size).to(torch.float64)       # logical order
    n_groups = gtable.shape[0]
    lg = gtable[:, 2].long().cpu()
    bits = gtable[:, 0].long().cpu()
    s = torch.empty(n_groups, N, dtype=torch.float64, device=scales.device)
    z = torch.empty_like(s)
    s[lg] = scales.to(torch.float64)
    if zeros is not None:
        z[lg] = zeros.to(torch.float64)
    else:
        z[lg] = (2.0 ** (bits - 1)).to(torch.float64).to(s.device)[:, None].expand(-1, N)
    W = (codes - z.T.repeat_interleave(group_size, 1)) * s.T.repeat_interleave(group_size, 1)
    if perm is not None:
        out = torch.empty_like(W)
        out[:, perm.long()] = W
        W = out
    return W.to(dtype)


def embed(ids, qweight, scales, zeros, gtable, perm, group_size) -> torch.Tensor:
    """Rows ``ids`` of the dequantized W [N, K]: ``out[..., :] = W[ids[...], :]`` (fp32)."""
    N = scales.shape[1]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= N):
        raise IndexError(f"tasa: ids outside [0, {N})")
    W = dequant(qweight, scales, zeros, gtable, perm, group_size)
    return W[ids.long()]


def gemm(x, qweight, scales, zeros, gtable, perm, group_size, hadamard=False) -> torch.Tensor:
    if hadamard:
        x = globals()["hadamard"](x, group_size)       # (the function, not the flag)
    W = dequant(qweight, scales, zeros, gtable, perm, group_size, torch.float64)
    return (x.to(torch.float64) @ W.T).to(x.dtype)


def hessian_accumulate_(H: torch.Tensor, X: torch.Tensor, src: Optional[torch.Tensor],
                        count: torch.Tensor) -> None:
    """GPTQ: H *= n/(n+m); x *= sqrt(2/(n+m)); H += x^T x (per source), in float64."""
    for s in range(H.shape[0]):
        xs = X if src is None else X[src == s]
        m = xs.shape[0]
        if m == 0:
            continue
        n = int(count[s])
        h = H[s].double() * (n / (n + m))
        xs = xs.double() * (2.0 / (n + m)) ** 0.5
        H[s] = (h + xs.T @ xs).to(H.dtype)
        count[s] = n + m


def gptq_cols_(W: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               maxq: int, c0: int, c1: int, codes: torch.Tensor, err: torch.Tensor) -> None:
    """GPTQ's column loop over columns ``[c0, c1)`` of one block ``W [N, B]`` (fp32, in place):
    column ``i`` is quantized with ``scale``/``zero`` (``[N]``, one group), its scaled error
    ``(w - q(w)) / U[i, i]`` is written to ``err[:, i]`` and fed to columns ``i ..`` of the
    block through row ``i`` of ``U``. The torch loop tasa's GPTQ ran before the kernel (fp32,
    the same operations in the same order)."""
    s, z = scale[:, None], zero[:, None]
    for i in range(c0, c1):
        w = W[:, i:i + 1]
        q = torch.clamp(torch.round(w / s) + z, 0, maxq)
        wq = (q - z) * s
        e = (w - wq) / U[i, i]
        codes[:, i] = q[:, 0].to(torch.uint8)
        err[:, i] = e[:, 0]
        W[:, i:] -= e * U[i, i:][None, :]


def rtn_params(W: torch.Tensor, bits: int, sym: bool):
    """Min/max (scale, zero) over the last axis (fp16-exact scale; the asym range always
    contains 0): tasa.quant.rtn.rtn_params, documented there, and the candidates of
    :func:`mse_params`."""
    maxq = 2 ** bits - 1
    if sym:
        s = 2 * W.abs().amax(-1) / maxq
    else:
        # the range always includes 0 (reference GPTQ's rule): a group of one sign would
        # otherwise need a zero point outside the code range, and clamping it left such groups
        # up to 13 steps off (tests/test_quantize.py::test_every_weight_within_one_step...)
        lo = W.amin(-1).clamp(max=0)
        s = (W.amax(-1).clamp(min=0) - lo) / maxq
    s = torch.where(s > 0, s, torch.ones_like(s)).half().to(W.dtype)
    s = torch.where(s > 0, s, torch.full_like(s, 2.0 ** -24))
    z = (torch.full_like(s, 2.0 ** (bits - 1)) if sym
         else torch.round(-lo / s).clamp(0, maxq))
    return s, z


def mse_params(W: torch.Tensor, bits: int, sym: bool, weight: Optional[torch.Tensor],
               shrink: torch.Tensor):
    """Scale and zero ``[...]`` of each row of ``W [..., G]`` minimising
    ``sum_k weight_k (w_k - q(w_k))^2`` over the ranges ``p * [lo, hi]``, ``p`` in ``shrink``
    (``weight``: None = ones, ``[G]`` shared or W's shape); the first candidate wins ties. The
    torch loop tasa.quant.mse ran before the kernel."""
    maxq = 2 ** bits - 1
    if sym:
        hi = W.abs().amax(-1, keepdim=True)
        lo = -hi
    else:
        lo = W.amin(-1, keepdim=True).clamp(max=0)
        hi = W.amax(-1, keepdim=True).clamp(min=0)
    best_s = best_z = best_e = None
    for p in shrink.tolist():
        p = float(torch.tensor(p, dtype=torch.float32))
        Wc = W if p == 1.0 else torch.maximum(torch.minimum(W, p * hi), p * lo)
        s, z = rtn_params(Wc, bits, sym)
        q = torch.clamp(torch.round(W / s[..., None]) + z[..., None], 0, maxq)
        d2 = (W - (q - z[..., None]) * s[..., None]) ** 2
        e = ((d2 * weight) if weight is not None else d2).double().sum(-1)
        if best_e is None:
            best_s, best_z, best_e = s, z, e
        else:
            better = e < best_e
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
            best_e = torch.where(better, e, best_e)
    return best_s, best_z


_M64 = (1 << 64) - 1
_SIGNS: dict = {}


def hadamard_signs(K: int) -> torch.Tensor:
    """``s_k`` (+1/-1, fp32 ``[K]``) of format.h's ``tasa_hadamard_sign``: the top bit of
    output ``k`` of splitmix64 seeded 0, written out with Python integers."""
    if K not in _SIGNS:
        out = []
        for k in range(K):
            z = ((k + 1) * 0x9E3779B97F4A7C15) & _M64
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
            z ^= z >> 31
            out.append(-1.0 if z >> 63 else 1.0)
        _SIGNS[K] = torch.tensor(out, dtype=torch.float32)
    return _SIGNS[K]


def hadamard_block(group_size: int) -> int:
    """format.h's ``tasa_hadamard_block``: the largest power of two dividing ``group_size``,
    at most 128."""
    return min(group_size & -group_size, 128)


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix ``H_n`` (entries +-1, ``n`` a power of two)."""
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def hadamard(x: torch.Tensor, group_size: int, inverse: bool = False) -> torch.Tensor:
    """The incoherence rotation of format version 2 over the last axis of ``x``: ``x R``
    (forward) or ``x R^T`` (inverse), ``R`` block-diagonal with blocks
    ``diag(s) H_b / sqrt(b)``, as a matrix product per block (the kernels use the fast
    transform). Computed in fp32 (float64 for float64 input), returned in x's dtype."""
    K = x.shape[-1]
    if group_size <= 0 or K % group_size:
        raise RuntimeError(f"tasa: x's last dimension K={K} is not a multiple of "
                           f"group_size={group_size}")
    b = hadamard_block(group_size)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    Hb = sylvester(b).to(device=x.device, dtype=ct) / b ** 0.5
    s = hadamard_signs(K).to(device=x.device, dtype=ct)
    v = x.to(ct)
    if not inverse:
        v = v * s
    v = (v.reshape(*x.shape[:-1], K // b, b) @ Hb).reshape(x.shape)   # H_b is symmetric
    if inverse:
        v = v * s
    return v.to(x.dtype)


def decode_attention_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, H: int, pos: int,
                      scale: float) -> torch.Tensor:
    """torch semantics of tasa_ext.ops.decode_attention_ (the rotation as transformers'
    apply_rotary_pos_emb, the attention as a plain softmax over positions 0..pos)."""
    KV, _, hd = k_cache.shape
    h2 = hd // 2
    q = qkv[:H * hd].view(H, hd)
    k = qkv[H * hd:(H + KV) * hd].view(KV, hd)
    v = qkv[(H + KV) * hd:].view(KV, hd)

    def rot(x):
        return torch.cat((-x[..., h2:], x[..., :h2]), dim=-1)

    q.copy_((q * cos) + (rot(q) * sin))
    k.copy_((k * cos) + (rot(k) * sin))
    k_cache[:, pos] = k
    v_cache[:, pos] = v
    Kc = k_cache[:, :pos + 1].repeat_interleave(H // KV, 0).double()
    Vc = v_cache[:, :pos + 1].repeat_interleave(H // KV, 0).double()
    p = torch.softmax((Kc @ q.double()[:, :, None])[..., 0] * scale, dim=-1)     # [H, T]
    return (p[:, None, :] @ Vc)[:, 0].reshape(-1).float()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """torch semantics of tasa_ext.ops.rms_norm: the mean of squares in float64, then
    transformers' fp32 roundings (x * r, then w * that)."""
    var = x.double().pow(2).mean(-1, keepdim=True).float()
    r = 1.0 / torch.sqrt(var + eps)
    return w * (x * r)


def decode_layers_(h: torch.Tensor, tensors, ints, k_caches, v_caches, cos: torch.Tensor,
                   sin: torch.Tensor, H: int, pos: int, eps: float, scale: float,
                   x_pieces: int = 3, ops=None) -> None:
    """torch semantics of tasa_ext.ops.decode_layers_: per layer the reference ops composed
    (rms_norm, gemm + bias, decode_attention_, the residual adds, SiLU-gated MLP), h updated in
    place. The arguments as the op's (44 tensors and 14 ints per layer); ``ops``: the namespace
    whose rms_norm / gemm / decode_attention_ are composed (this module's by default; the
    tests pass tasa_ext.ops: the op-by-op path the fused op replaces). ``x_pieces``: ignored
    here (x exact in float64), given to the ops' gemm through its setting by the tests. ``pos``
    a list of B positions: ``h`` [B, D] and caches [B, KV, max_len, hd], each stream its own
    single-stream step (streams never interact)."""
    import sys
    if not isinstance(pos, int):          # B streams (a list of positions): each on its own
        pos = [int(p) for p in pos]
        if k_caches[0].dim() == 4:         # [B, KV, max_len, hd]: stream b's own slices
            for b, p in enumerate(pos):
                hb = h[b]
                decode_layers_(hb, tensors, ints, [c[b] for c in k_caches],
                               [c[b] for c in v_caches], cos, sin, H, p, eps, scale, x_pieces, ops)
            return None
        pos = pos[0]
    ops = ops or sys.modules[__name__]
    rms_norm, gemm, decode_attention_ = ops.rms_norm, ops.gemm, ops.decode_attention_
    hv = h.view(-1)
    for li in range(len(k_caches)):
        t = tensors[44 * li: 44 * li + 44]
        gs = ints[14 * li: 14 * li + 14]

        def proj(slots, x):          # the slots' outputs side by side (absent slots skipped)
            ys = []
            for j in slots:
                qw, sc, zr, gt, pm, bs = t[2 + 6 * j: 8 + 6 * j]
                if qw is None:
                    continue
                y = gemm(x[None], qw, sc, zr, gt, pm, gs[2 * j], bool(gs[2 * j + 1]))[0]
                ys.append(y if bs is None else y + bs)
            return torch.cat(ys)

        x = rms_norm(hv, t[0], eps)
        qkv = proj((0, 1, 2), x)
        a = decode_attention_(qkv, cos[pos], sin[pos], k_caches[li], v_caches[li], H, pos, scale)
        hv.copy_(hv + proj((3,), a))
        x = rms_norm(hv, t[1], eps)
        g, u = proj((4, 5), x).chunk(2)
        hv.copy_(hv + proj((6,), torch.nn.functional.silu(g) * u))
