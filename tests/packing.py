"""Random packed matrices shared by the CPU and CUDA op tests."""
import torch

import tasa_ext

BIT_PATTERNS = {
    "u2": [2], "u3": [3], "u4": [4], "u8": [8],
    "mix": [3, 8, 2, 4, 4, 3],           # unsorted: exercises the stored-order table
    "mix35": [3, 4],                      # the 3.5-bit pattern
}


def make_packed(N, K, G, pattern, asym, act_order, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = K // G
    bits = [pattern[i % len(pattern)] for i in range(n_groups)]
    gb = torch.tensor(bits, dtype=torch.int32)
    codes = torch.cat([torch.randint(0, 2 ** b, (N, G), generator=g) for b in bits], 1).to(torch.uint8)
    qweight, gtable = tasa_ext.pack(codes, gb, G)
    scales_l = (torch.rand(n_groups, N, generator=g) * 0.05 + 0.002).half()
    zeros_l = (torch.rand(n_groups, N, generator=g) * torch.tensor([2.0 ** b for b in bits])[:, None]).half()
    order = gtable[:, 2].long()
    scales = scales_l[order].contiguous()
    zeros = zeros_l[order].contiguous() if asym else None
    perm = torch.randperm(K, generator=g).to(torch.int32) if act_order else None
    return dict(codes=codes, gb=gb, qweight=qweight, gtable=gtable, scales=scales, zeros=zeros, perm=perm)
