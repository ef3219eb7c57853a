"""What the incoherence rotation (format version 2) costs at run time: a rotated TasaLinear
rotates x (``tasa_ext.hadamard``, K log2(b) adds per row) and then runs the same GEMV/GEMM as an
unrotated one. Timed side by side in one run on bench_gemm's real layer shapes, with weights
streamed from DRAM as there (copies rotated through), in interleaved rounds:

* ``gemm``: ``tasa_ext.gemm(x, W')`` alone (an unrotated layer);
* ``rotate + gemm``: ``tasa_ext.gemm(tasa_ext.hadamard(x), W')`` (a rotated layer);
* ``rotate``: the rotation alone.

    python benchmarks/bench_hadamard.py --batch 1 16 --out hadamard_cpu

Reported: medians over rounds, the ratio rotate+gemm / gemm, and the GEMV's weight bytes per
second as a fraction of the copy bandwidth measured in the same run (the rotation must leave the
GEMV at its memory bound). Results: benchmarks/results/<out>.{md,json}.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import tasa_ext
from bench_gemm import PATTERNS, SHAPES, copies, rotating, tasa_operands
from common import copy_bandwidth, machine, stream_bytes_default, timeit, write_results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--bits", nargs="+", default=["3", "4"], choices=list(PATTERNS))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.1)
    ap.add_argument("--act", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", default="hadamard_cpu")
    args = ap.parse_args()
    G = args.group_size
    act = getattr(torch, args.act)
    meta = machine("cpu")
    bw = copy_bandwidth("cpu")
    meta["copy_bandwidth_GBps"] = round(bw / 1e9, 2)
    meta["load_average"] = " ".join(open("/proc/loadavg").read().split()[:3])
    stream = stream_bytes_default()
    T = lambda f: timeit(f, min_time=args.min_time)  # noqa: E731
    rows = []
    for name in args.shapes:
        N, K = SHAPES[name]
        for p in args.bits:
            pargs, nbytes, avg = tasa_operands(N, K, G, PATTERNS[p], "cpu")
            sets = copies(pargs, nbytes, stream)
            for M in args.batch:
                x = torch.randn(M, K).to(act)
                calls = {"gemm": rotating(lambda o: tasa_ext.gemm(x, *o), sets),
                         "rotate + gemm": rotating(
                             lambda o: tasa_ext.gemm(tasa_ext.hadamard(x, G), *o), sets),
                         "rotate": lambda: tasa_ext.hadamard(x, G)}
                samples = {k: [] for k in calls}
                for _ in range(args.rounds):
                    for k, fn in calls.items():
                        samples[k].append(T(fn))
                med = {k: statistics.median(v) for k, v in samples.items()}
                row = dict(shape=name, N=N, K=K, M=M, bits=p, avg_bits=round(avg, 4),
                           act=args.act, gemm_us=round(med["gemm"] * 1e6, 1),
                           rotated_us=round(med["rotate + gemm"] * 1e6, 1),
                           rotate_us=round(med["rotate"] * 1e6, 2),
                           ratio=round(med["rotate + gemm"] / med["gemm"], 3),
                           gemm_frac_bw=round(nbytes / med["gemm"] / bw, 3),
                           rotated_frac_bw=round(nbytes / med["rotate + gemm"] / bw, 3),
                           commit=meta["commit"], date=meta["date"])
                rows.append(row)
                print(row, flush=True)
    L = [f"# Incoherence rotation at run time ({meta['device']})", "",
         f"- {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, tasa ISA "
         f"{tasa_ext.build_info().get('cpu_isa', '?')}; copy bandwidth {bw / 1e9:.1f} GB/s; "
         f"load average before {meta['load_average']}",
         f"- command: `python benchmarks/bench_hadamard.py --batch {' '.join(map(str, args.batch))} "
         f"--bits {' '.join(args.bits)} --rounds {args.rounds} --out {args.out}`",
         f"- weights streamed ({stream >> 20} MB of copies per operand), x {args.act}, groups of "
         f"{G} (rotation blocks of {tasa_ext.hadamard_block(G)}); medians of {args.rounds} "
         "interleaved rounds", "",
         "| shape | bits | M | gemm us | rotate + gemm us | rotate us | ratio | gemm % copy bw | "
         "rotated % copy bw |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['shape']} | {r['bits']} | {r['M']} | {r['gemm_us']} | {r['rotated_us']} | "
                 f"{r['rotate_us']} | {r['ratio']:.3f} | {100 * r['gemm_frac_bw']:.0f}% | "
                 f"{100 * r['rotated_frac_bw']:.0f}% |")
    md = "\n".join(L) + "\n"
    write_results(args.out, meta, rows, md)
    print(md)


if __name__ == "__main__":
    main()
