"""The ``tasa`` command line.

    tasa info                      build and machine information
    tasa demo [--n N --k K ...]    pack a random mixed-bit matrix, check the fused kernel against
                                   the pure-torch reference, and time it against dense torch
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _timeit(fn, reps: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def cmd_info(args) -> int:
    import tasa_ext

    print(json.dumps(tasa_ext.build_info(), indent=1))
    return 0


def cmd_demo(args) -> int:
    import torch

    import tasa_ext
    from tasa_ext import reference

    pattern = {"3": [3], "3.5": [3, 4], "4": [4], "8": [8]}[args.bits]
    N, K, G = args.n, args.k, args.group_size
    if K % G:
        print(f"error: --k {K} is not divisible by --group-size {G}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bits = [pattern[g % len(pattern)] for g in range(K // G)]
    codes = torch.cat([torch.randint(0, 2 ** b, (N, G), dtype=torch.uint8) for b in bits], 1)
    qweight, gtable = tasa_ext.pack(codes, torch.tensor(bits, dtype=torch.int32), G)
    scales = (torch.rand(K // G, N) * 0.02 + 1e-3).half()
    args_ = (qweight, scales, None, gtable, None, G)
    x = torch.randn(args.batch, K)
    y = tasa_ext.gemm(x, *args_)
    W = reference.dequant(*args_)
    y_ref = x @ W.T
    rel = float((y - y_ref).norm() / y_ref.norm())
    t_q = _timeit(lambda: tasa_ext.gemm(x, *args_))
    t_d = _timeit(lambda: torch.nn.functional.linear(x, W))
    avg = tasa_ext.average_bits(N, K, G, bits, "sym")
    print(f"tasa demo: W [{N} x {K}], group {G}, bits {args.bits} -> {avg:.3f} average bits "
          f"(exact storage cost), batch {args.batch}")
    print(f"  fused kernel vs dequantized fp32 matmul: relative error {rel:.2e}")
    print(f"  tasa {t_q * 1e6:8.1f} us   torch fp32 dense {t_d * 1e6:8.1f} us   "
          f"speedup {t_d / t_q:.2f}x   ({tasa_ext.build_info()['cpu_isa']} path)")
    return 0 if rel < 1e-4 else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tasa", description="Task-aware mixed-precision quantization of LLMs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="build and machine information")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("demo", help="kernel demo on a random mixed-bit matrix")
    p.add_argument("--n", type=int, default=4096, help="output features")
    p.add_argument("--k", type=int, default=4096, help="input features")
    p.add_argument("--bits", choices=["3", "3.5", "4", "8"], default="3.5")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
