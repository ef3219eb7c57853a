"""Random packed matrices: the one helper behind the op tests, the benchmarks and ``tasa demo``.

The kernels' speed does not depend on the values, and the tests build their oracle from the
same integer codes that get packed, so uniform random codes and scales serve both.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .ops import pack

BIT_PATTERNS = {
    "u2": [2], "u3": [3], "u4": [4], "u8": [8],
    "mix": [3, 8, 2, 4, 4, 3],           # unsorted: exercises the stored-order table
    "mix35": [3, 4],                      # the 3.5-bit pattern
}


def random_packed(N: int, K: int, G: int, pattern: Sequence[int], asym: bool = False,
                  act_order: bool = False, seed: int = 0, device="cpu",
                  scale_range: tuple = (0.002, 0.052)) -> dict:
    """A random ``[N, K]`` matrix with group size ``G``, group g at ``pattern[g % len(pattern)]``
    bits, packed with :func:`tasa_ext.pack`.

    Returns a dict of
      codes     uint8 [N, K]        logical column order
      bits      list[int]           bits per logical group
      gb        int32 [K/G]         the same as a tensor
      qweight, gtable               :func:`tasa_ext.pack`'s output
      scales    fp16 [K/G, N]       stored group order (as the ops take them)
      zeros     fp16 [K/G, N]       stored group order; None unless ``asym``
      perm      int32 [K]           None unless ``act_order``
      scales_logical, zeros_logical the same in logical group order (``zeros_logical`` None
                                    unless ``asym``), e.g. for ``tasa.quant.QuantizedWeight``
      mode      "asym" or "sym"
    Scales are uniform in ``scale_range``; asymmetric zeros uniform in ``[0, 2^b)``. Everything is
    drawn from one generator seeded with ``seed`` on ``device`` (on the CPU the draws do not
    depend on ``asym`` / ``act_order`` except for the permutation, drawn last).
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    n_groups = K // G
    bits = [int(pattern[i % len(pattern)]) for i in range(n_groups)]
    gb = torch.tensor(bits, dtype=torch.int32, device=device)
    codes = torch.cat([torch.randint(0, 2 ** b, (N, G), generator=g, device=device).to(torch.uint8)
                       for b in bits], 1)
    qweight, gtable = pack(codes, gb, G)
    lo, hi = scale_range
    scales_l = (torch.rand(n_groups, N, generator=g, device=device) * (hi - lo) + lo).half()
    levels = torch.tensor([2.0 ** b for b in bits], device=device)
    zeros_l = (torch.rand(n_groups, N, generator=g, device=device) * levels[:, None]).half()
    order = gtable[:, 2].long()
    perm = torch.randperm(K, generator=g, device=device).to(torch.int32) if act_order else None
    return dict(codes=codes, bits=bits, gb=gb, qweight=qweight, gtable=gtable,
                scales=scales_l[order].contiguous(),
                zeros=zeros_l[order].contiguous() if asym else None, perm=perm,
                scales_logical=scales_l.contiguous(), zeros_logical=zeros_l.contiguous() if asym else None,
                mode="asym" if asym else "sym")
