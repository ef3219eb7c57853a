"""Fused dequant-GEMV/GEMM microbenchmark on real LLM layer shapes.

For each (N out, K in) shape, batch size and bit pattern: time of torch.ops.tasa.gemm, weight
bytes streamed per second, that as a fraction of the machine's copy bandwidth measured in the
same run, and speed ratios against torch dense matmul (fp32 and bf16 on the CPU, fp16 on CUDA)
and torch's own int4 kernel (CPU: _weight_int4pack_mm_for_cpu; CUDA: _weight_int4pack_mm), all
timed side by side in this run. Random weights: the kernels' speed does not depend on values.

    python benchmarks/bench_gemm.py                      # CPU, all shapes, batch 1 and 16
    python benchmarks/bench_gemm.py --batch 1 --isa avx2 --out gemm_cpu_avx2   # an older path
    python benchmarks/bench_gemm.py --device cuda --batch 1 4 16 64
"""
from __future__ import annotations

import argparse

import torch

import tasa_ext
from common import copy_bandwidth, machine, timeit, write_results

SHAPES = {  # name: (N out, K in)
    "llama3-8b q/o 4096x4096": (4096, 4096),
    "llama3-8b k/v 1024x4096": (1024, 4096),
    "llama3-8b gate/up 14336x4096": (14336, 4096),
    "llama3-8b down 4096x14336": (4096, 14336),
    "qwen2.5-7b q/o 3584x3584": (3584, 3584),
    "qwen2.5-7b gate/up 18944x3584": (18944, 3584),
}
PATTERNS = {"3": [3], "3.5 (3/4 mix)": [3, 4], "4": [4], "8": [8]}


def make_packed(N, K, G, pattern, device):
    n_groups = K // G
    bits = [pattern[g % len(pattern)] for g in range(n_groups)]
    codes = torch.cat([torch.randint(0, 2 ** b, (N, G), dtype=torch.uint8) for b in bits], 1)
    qweight, gtable = tasa_ext.pack(codes, torch.tensor(bits, dtype=torch.int32), G)
    scales = (torch.rand(n_groups, N) * 0.01 + 1e-3).half()
    args = [qweight, scales, None, gtable, None, G]
    nbytes = qweight.numel() * 4 + scales.numel() * 2 + gtable.numel() * 4
    avg = tasa_ext.average_bits(N, K, G, bits, "sym")
    return [a.to(device) if torch.is_tensor(a) else a for a in args], nbytes, avg


def torch_int4(N, K, G, device):
    w = torch.randint(0, 16, (N, K), dtype=torch.int32)
    sz = (torch.rand(K // G, N, 2) * 0.01).to(torch.bfloat16)
    if device == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, sz)
    wu8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8).to(device)
    packed = torch.ops.aten._convert_weight_to_int4pack(wu8, 8)
    sz = sz.to(device)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, G, sz)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="subset of shape names")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--min-time", type=float, default=0.25, help="seconds of timing per measurement")
    ap.add_argument("--out", default=None, help="results file stem (default gemm_<device>)")
    ap.add_argument("--isa", default="auto", help="CPU path: auto (the best), avx512, avx2, scalar")
    ap.add_argument("--act", default=None, choices=["bfloat16", "float32", "float16"],
                    help="tasa activation dtype (default: bfloat16 on CPU, float16 on CUDA)")
    args = ap.parse_args()
    dev, G = args.device, args.group_size
    if dev == "cpu":
        tasa_ext.set_cpu_isa(args.isa)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else None
    dense_dtypes = [torch.float32, torch.bfloat16] if dev == "cpu" else [torch.float16]
    act_dtype = torch.bfloat16 if dev == "cpu" else torch.float16
    if args.act:
        act_dtype = getattr(torch, args.act)
    T = lambda f: timeit(f, min_time=args.min_time, sync=sync)  # noqa: E731

    meta = machine(dev)
    bw = copy_bandwidth(dev)
    meta["copy_bandwidth_GBps"] = round(bw / 1e9, 2)
    meta["load_average"] = " ".join(open("/proc/loadavg").read().split()[:3]) if dev == "cpu" else ""
    print(f"# {meta['device']} | copy bandwidth {bw / 1e9:.1f} GB/s | commit {meta['commit']}")
    rows = []
    for name in args.shapes:
        N, K = SHAPES[name]
        dense = {dt: torch.randn(N, K).to(dt).to(dev) for dt in dense_dtypes}
        int4 = torch_int4(N, K, G, dev)
        packed = {p: make_packed(N, K, G, bits, dev) for p, bits in PATTERNS.items()}
        for M in args.batch:
            x32 = torch.randn(M, K, device=dev)
            t_dense = {dt: T(lambda: torch.nn.functional.linear(x32.to(dt), w)) for dt, w in dense.items()}
            xa = x32.to(act_dtype)
            xb = x32.to(torch.bfloat16)           # torch's int4 kernels take bf16 activations
            t_int4 = T(lambda: int4(xb))
            for p, (pargs, nbytes, avg) in packed.items():
                t = T(lambda: tasa_ext.gemm(xa, *pargs))
                row = dict(shape=name, N=N, K=K, M=M, bits=p, avg_bits=round(avg, 4), act=str(act_dtype)[6:],
                           us=round(t * 1e6, 1), GBps=round(nbytes / t / 1e9, 2),
                           frac_copy_bw=round(nbytes / t / bw, 3),
                           x_torch_int4=round(t_int4 / t, 2), torch_int4_us=round(t_int4 * 1e6, 1))
                for dt, td in t_dense.items():
                    row[f"x_{str(dt)[6:]}"] = round(td / t, 2)
                    row[f"{str(dt)[6:]}_us"] = round(td * 1e6, 1)
                rows.append(row)
                print({k: v for k, v in row.items() if k not in ("N", "K")}, flush=True)
    dn = [str(dt)[6:] for dt in dense_dtypes]
    md = [f"# tasa fused dequant-GEMM benchmark ({dev})", "",
          "| " + " | ".join(f"{k}: {v}" for k, v in meta.items()) + " |", "",
          f"Group size {G}, symmetric, activations {str(act_dtype)[6:]}. Weight GB/s counts codes + "
          "scales + group table. Copy bandwidth (STREAM convention, read + write bytes) measured in "
          "this run. Ratios > 1: tasa faster.", "",
          "| shape | M | bits | avg bits | tasa µs | GB/s | of copy BW | "
          + " | ".join(f"{d} µs | ×{d}" for d in dn) + " | torch int4 µs | ×int4 |",
          "|" + "---|" * (9 + 2 * len(dn))]
    for r in rows:
        md.append(f"| {r['shape']} | {r['M']} | {r['bits']} | {r['avg_bits']} | {r['us']} | {r['GBps']} | "
                  f"{r['frac_copy_bw']:.0%} | " + " | ".join(f"{r[d + '_us']} | {r['x_' + d]}" for d in dn)
                  + f" | {r['torch_int4_us']} | {r['x_torch_int4']} |")
    path = write_results(args.out or f"gemm_{dev.split(':')[0]}", meta, rows, "\n".join(md) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
