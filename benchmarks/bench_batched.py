"""Batched decode on the CPU (issue 30 item 2): one step of M = 2..16 rows (several requests, or
a speculative draft) against one row, per fused-GEMM path, on the 8B-class shapes.

    python benchmarks/bench_batched.py [--shapes ...] [--rounds 3]

For each shape (bench_gemm.SHAPES), width pattern and activation dtype: the time of
``tasa_ext.gemm`` at every M of ``--batch`` on the AMX path (``amx``: the tile unit for 1 < M)
and on the path before it (``avx512vnni``: vdpbf16ps GEMM for bf16 x, the AVX2 kernel for
fp32 x), and torch's bf16 matmul on dense weights at the largest M for scale. Weights stream
from DRAM (every operand rotates through copies of 3x the last-level cache, as bench_gemm).
The target: t(16) <= 3 t(1). Configurations are timed in interleaved rounds; medians over rounds.
``--gemv-rows 1 16`` runs every path at each setting of ``tasa_ext.ops.set_gemv_rows`` (up to
how many rows the AVX2 kernel shares the GEMV's decode across rows; 1 = the dequantize-into-L1
GEMM), side by side: how its default was chosen (``--paths avx2`` on an AVX2-only CPU).
Results: benchmarks/results/batched_cpu.{md,json} with machine, date, commit, command.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import tasa_ext
from bench_gemm import SHAPES, copies, rotating, tasa_operands
from common import copy_bandwidth, machine, stream_bytes_default, timeit, write_results

PATTERNS = {"3": [3], "3.5 (3/4 mix)": [3, 4], "4": [4]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--acts", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--paths", nargs="+", default=["avx512vnni", "amx"])
    ap.add_argument("--gemv-rows", type=int, nargs="+", default=[None],
                    help="settings of tasa_ext.ops.set_gemv_rows to compare (default: its own)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.1)
    ap.add_argument("--stream-mb", type=int, default=stream_bytes_default() >> 20,
                    help="MB of weight copies per operand (default here %(default)s: 3x the "
                         "last-level cache, >= 96)")
    ap.add_argument("--out", default="batched_cpu")
    args = ap.parse_args(argv)
    have = tasa_ext.ops.cpu_isas_available()
    paths = [p for p in args.paths if p in have]
    if not paths:
        raise SystemExit(f"none of {args.paths} runs on this CPU ({have})")
    meta = machine("cpu")
    meta["copy_bandwidth_GBps"] = round(copy_bandwidth("cpu") / 1e9, 2)
    meta["command"] = "python benchmarks/bench_batched.py " + " ".join(sys.argv[1:] if argv is None else argv)
    T = lambda f: timeit(f, min_time=args.min_time)  # noqa: E731
    rows = []
    tasa_ext.ops.set_dense_rows(0)           # the fused kernels only (M < 64 anyway)
    for name in args.shapes:
        N, K = SHAPES[name]
        w = torch.randn(N, K).bfloat16()
        dense = copies([w], w.numel() * 2, args.stream_mb << 20)
        for pat, bits in PATTERNS.items():
            pargs, nbytes, avg = tasa_operands(N, K, 128, bits, "cpu")
            sets = copies(pargs, nbytes, args.stream_mb << 20)
            for act in args.acts:
                xs = {M: torch.randn(M, K).to(getattr(torch, act)) for M in args.batch}
                samples = {}
                for _ in range(args.rounds):
                    for path in paths:
                        tasa_ext.set_cpu_isa(path)
                        for gr in args.gemv_rows:
                            tasa_ext.ops.set_gemv_rows(gr)
                            label = path if len(args.gemv_rows) == 1 else f"{path} gemv_rows={gr}"
                            for M in args.batch:
                                fn = rotating(lambda o, x=xs[M]: tasa_ext.gemm(x, *o), sets)
                                samples.setdefault((label, M), []).append(T(fn))
                    tasa_ext.set_cpu_isa("auto")
                    tasa_ext.ops.set_gemv_rows(None)
                    xb = torch.randn(max(args.batch), K).bfloat16()
                    samples.setdefault(("torch-bf16", max(args.batch)), []).append(
                        T(rotating(lambda o: torch.nn.functional.linear(xb, o[0]), dense)))
                med = {k: statistics.median(v) for k, v in samples.items()}
                for (path, M), t in med.items():
                    base = med.get((path, 1))
                    row = dict(shape=name, bits=pat, avg_bits=round(avg, 4), act=act, path=path, M=M,
                               us=round(t * 1e6, 1), per_row_us=round(t * 1e6 / M, 1),
                               x_of_1row=None if base is None else round(t / base, 2),
                               GBps=round(nbytes / t / 1e9, 2))
                    rows.append(row)
                    print(row, flush=True)
        del sets, dense
    tasa_ext.ops.set_dense_rows(None)
    Mx = max(args.batch)
    md = [f"# Batched decode steps on the CPU (fused GEMM, M = {args.batch})", "",
          f"- {meta['date']}, commit {meta['commit']}, {meta['device']}, torch {meta['torch']}, "
          f"copy bandwidth {meta['copy_bandwidth_GBps']} GB/s, default gemv_rows "
          f"{tasa_ext.ops.gemv_rows()}",
          f"- command: `{meta['command']}`",
          f"- group 128 symmetric; weights streamed from DRAM (>= {args.stream_mb} MB of copies per "
          f"operand); median of {args.rounds} interleaved rounds; `x of 1 row` = t(M) / t(1) on "
          f"the same path (target: t(16) <= 3 t(1)); torch-bf16 = dense bf16 weights at M = {Mx}", "",
          f"| shape | bits | act | path | " + " | ".join(f"M={M} us (x 1 row)" for M in args.batch) + " |",
          "|---|---|---|---|" + "---|" * len(args.batch)]
    keys = dict.fromkeys((r["shape"], r["bits"], r["act"], r["path"]) for r in rows)
    for k in keys:
        cells = []
        for M in args.batch:
            r = next((r for r in rows if (r["shape"], r["bits"], r["act"], r["path"], r["M"]) == (*k, M)), None)
            cells.append("" if r is None else f"{r['us']:.0f}" + ("" if r["x_of_1row"] is None else f" ({r['x_of_1row']:.2f}x)"))
        md.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | " + " | ".join(cells) + " |")
    write_results(args.out, meta, rows, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
