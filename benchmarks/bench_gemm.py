"""Fused dequant-GEMV/GEMM microbenchmark on real LLM layer shapes.

For each (N out, K in) shape, batch size and bit pattern: time of torch.ops.tasa.gemm, weight
bytes streamed per second, that as a fraction of the machine's copy bandwidth measured in the
same run, and speed ratios against torch dense matmul (fp32 and bf16 on the CPU, fp16 on CUDA)
and torch's own int4 kernel (CPU: _weight_int4pack_mm_for_cpu; CUDA: _weight_int4pack_mm), all
timed side by side in this run. Random weights: the kernels' speed does not depend on values.

Streaming (the default): batch-1 decode reads every weight once per token from DRAM, so each
timed call must too. Every timed operand -- tasa's packed matrices, torch's dense fp32/bf16
weights and its int4-packed ones alike -- is cloned until its copies total >= --stream-mb
(default 3x the last-level cache and >= 96 MB: common.stream_bytes_default), and consecutive
calls rotate through the copies: by the time a copy comes round again the others have pushed it out of the last-level cache. `--resident`
reuses one copy (the old mode: shapes smaller than the LLC then run from cache and can report
more than 100% of the copy bandwidth).

    python benchmarks/bench_gemm.py                      # CPU, all shapes, batch 1 and 16
    python benchmarks/bench_gemm.py --shapes "llama3-8b k/v 1024x4096" --update   # one shape,
                                                         # merged into the existing results file
    python benchmarks/bench_gemm.py --batch 1 --isa avx2 --out gemm_cpu_avx2   # an older path
    python benchmarks/bench_gemm.py --device cuda --batch 1 4 16 64
    python benchmarks/bench_gemm.py --batch 1 --act float32 --gemv-i8 both --out gemm_cpu_avx2_i8
                                    # AVX2: the int8-piece GEMV and the float one side by side
    python benchmarks/bench_gemm.py --batch 1 --act float32 --x-pieces both --out gemm_cpu_avx2_xp
                                    # fp32 x in 2 int8 pieces and in 3 side by side
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

import tasa_ext
from common import RESULTS, copy_bandwidth, machine, stream_bytes_default, timeit, write_results
from tasa_ext.testing import random_packed

SHAPES = {  # name: (N out, K in)
    "llama3-8b q/o 4096x4096": (4096, 4096),
    "llama3-8b k/v 1024x4096": (1024, 4096),
    "llama3-8b gate/up 14336x4096": (14336, 4096),
    "llama3-8b down 4096x14336": (4096, 14336),
    "qwen2.5-7b q/o 3584x3584": (3584, 3584),
    "qwen2.5-7b gate/up 18944x3584": (18944, 3584),
}
PATTERNS = {"2": [2], "3": [3], "3.5 (3/4 mix)": [3, 4], "4": [4], "8": [8]}


def tasa_operands(N, K, G, pattern, device):
    """(gemm operands after x, bytes of the tensors, exact average bits) of a random symmetric
    packed matrix."""
    p = random_packed(N, K, G, pattern, device=device, scale_range=(1e-3, 0.011))
    args = [p["qweight"], p["scales"], None, p["gtable"], None, G]
    nbytes = sum(t.numel() * t.element_size() for t in args if torch.is_tensor(t))
    return args, nbytes, tasa_ext.average_bits(N, K, G, p["bits"], "sym")


def torch_int4(N, K, G, device):
    """(call(x, operands), operands, bytes of the operands) for torch's int4 kernel."""
    w = torch.randint(0, 16, (N, K), dtype=torch.int32)
    sz = (torch.rand(K // G, N, 2) * 0.01).to(torch.bfloat16)
    if device == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1)
        call = lambda x, o: torch.ops.aten._weight_int4pack_mm_for_cpu(x, o[0], G, o[1])  # noqa: E731
    else:
        wu8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8).to(device)
        packed = torch.ops.aten._convert_weight_to_int4pack(wu8, 8)
        sz = sz.to(device)
        call = lambda x, o: torch.ops.aten._weight_int4pack_mm(x, o[0], G, o[1])  # noqa: E731
    ops = [packed, sz]
    return call, ops, sum(t.numel() * t.element_size() for t in ops)


def copies(operands, nbytes, stream_bytes):
    """The operand list followed by clones of its tensors, >= stream_bytes in all (1 if 0)."""
    n = max(1, -(-stream_bytes // nbytes)) if stream_bytes else 1
    return [operands] + [[t.clone() if torch.is_tensor(t) else t for t in operands] for _ in range(n - 1)]


def rotating(fn, sets):
    """A no-argument callable that calls fn on the next operand set each time."""
    it = itertools.cycle(sets)
    return lambda: fn(next(it))


def side_by_side(rows, field, a, b, a_name, b_name, intro) -> list:
    """Markdown lines comparing the rows timed with ``field`` = ``a`` against ``field`` = ``b``
    (same shape, M and width): a's speed-up, and 3-bit / 3.5-bit speed against 4-bit under each;
    none where the run did not time both."""
    by = {(r["shape"], r["M"], r["bits"], r.get(field)): r for r in rows}
    if not (any(k[3] == a for k in by) and any(k[3] == b for k in by)):
        return []
    md = ["", intro, "",
          f"| shape | M | bits | {a_name} µs | {b_name} µs | {a} vs {b} | 3 vs 4 ({a}) | "
          f"3 vs 4 ({b}) | 3.5 vs 4 ({a}) | 3.5 vs 4 ({b}) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (shape, M, bits, v), r in by.items():
        other = by.get((shape, M, bits, b))
        if v != a or other is None:
            continue
        rel = {}
        for mode in (a, b):
            four = by.get((shape, M, "4", mode))
            for w, key in (("3", "3"), ("3.5 (3/4 mix)", "3.5")):
                x = by.get((shape, M, w, mode))
                rel[(key, mode)] = f"{four['us'] / x['us']:.2f}x" if four and x else ""
        md.append(f"| {shape} | {M} | {bits} | {r['us']} | {other['us']} | {other['us'] / r['us']:.2f}x | "
                  f"{rel[('3', a)]} | {rel[('3', b)]} | {rel[('3.5', a)]} | {rel[('3.5', b)]} |")
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="subset of shape names")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds of timing per measurement")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds over all configurations of a shape (median reported)")
    ap.add_argument("--out", default=None, help="results file stem (default gemm_<device>)")
    ap.add_argument("--isa", default="auto", help="CPU path: auto (the best), avx512, avx2, scalar")
    ap.add_argument("--act", default=None, choices=["bfloat16", "float32", "float16"],
                    help="tasa activation dtype (default: bfloat16 on CPU, float16 on CUDA)")
    ap.add_argument("--stream-mb", type=int, default=stream_bytes_default() >> 20,
                    help="streaming mode: MB of weight copies each timed operand rotates through "
                         "(default here %(default)s: 3x the last-level cache, >= 96)")
    ap.add_argument("--resident", action="store_true",
                    help="reuse one weight copy (cache-resident for shapes smaller than the LLC)")
    ap.add_argument("--gemv-i8", default="default", choices=["default", "on", "off", "both"],
                    help="the AVX2 GEMV's int8-piece path (tasa_ext.ops.set_gemv_i8): both = "
                         "each width timed on it and on the float path, interleaved")
    ap.add_argument("--x-pieces", default="default", choices=["default", "2", "3", "both"],
                    help="int8 pieces of fp32 x in the int8 GEMVs (tasa_ext.ops.set_x_pieces): "
                         "both = each width timed with 2 and with 3, interleaved")
    ap.add_argument("--update", action="store_true",
                    help="merge into the existing results file: replace only the rows of the shapes "
                         "and batches measured now (each row keeps its run's load and bandwidth)")
    args = ap.parse_args()
    if args.gemv_i8 == "both" and args.x_pieces == "both":
        # the side-by-side tables pair rows on one switch only: with both swept, a row's partner
        # would be ambiguous (run the two comparisons separately)
        ap.error("--gemv-i8 both and --x-pieces both cannot be combined: run one comparison at a time")
    stream_bytes = 0 if args.resident else args.stream_mb << 20
    i8_modes = {"default": [None], "on": [True], "off": [False], "both": [True, False]}[args.gemv_i8]
    xp_modes = {"default": [None], "2": [2], "3": [3], "both": [2, 3]}[args.x_pieces]
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
    loadavg = lambda: " ".join(open("/proc/loadavg").read().split()[:3]) if dev == "cpu" else ""  # noqa: E731
    meta["load_average"] = loadavg()
    meta["mode"] = "resident" if args.resident else f"streaming ({args.stream_mb} MB of copies per operand)"
    print(f"# {meta['device']} | copy bandwidth {bw / 1e9:.1f} GB/s | commit {meta['commit']} | {meta['mode']}")
    rows = []
    for name in args.shapes:
        N, K = SHAPES[name]
        dense = {}
        for dt in dense_dtypes:
            w = torch.randn(N, K).to(dt).to(dev)
            dense[dt] = (copies([w], w.numel() * w.element_size(), stream_bytes), w.numel() * w.element_size())
        int4_call, int4_ops, int4_bytes = torch_int4(N, K, G, dev)
        int4_sets = copies(int4_ops, int4_bytes, stream_bytes)
        packed = {}
        for p, bits in PATTERNS.items():
            pargs, nbytes, avg = tasa_operands(N, K, G, bits, dev)
            packed[p] = (copies(pargs, nbytes, stream_bytes), nbytes, avg)
        load_before = loadavg()
        # This VM's memory bandwidth drifts (68 GB/s one morning, 39-44 GB/s later the same
        # day, and once mid-run: 4-bit rows at 180% of the run's opening copy figure). So the
        # copy bandwidth is measured again for each shape, and every configuration is timed in
        # --rounds interleaved rounds (dense, int4, each width, then again): a drift hits all
        # of them alike; the median over rounds is reported, with the min-max.
        bw_shape = copy_bandwidth(dev) if dev == "cpu" else bw
        for M in args.batch:
            x32 = torch.randn(M, K, device=dev)
            xa = x32.to(act_dtype)
            xb = x32.to(torch.bfloat16)           # torch's int4 kernels take bf16 activations
            xds = {dt: x32.to(dt) for dt in dense}
            calls = {("dense", dt): rotating(lambda o, xd=xds[dt]: torch.nn.functional.linear(xd, o[0]), sets)
                     for dt, (sets, _) in dense.items()}
            calls[("int4", None)] = rotating(lambda o: int4_call(xb, o), int4_sets)
            for p, (sets, _, _) in packed.items():
                for i8, xp in itertools.product(i8_modes, xp_modes):
                    calls[("tasa", p, i8, xp)] = rotating(
                        lambda o, i8=i8, xp=xp: (tasa_ext.ops.set_gemv_i8(i8),
                                                 tasa_ext.ops.set_x_pieces(xp),
                                                 tasa_ext.gemm(xa, *o))[2], sets)
            samples = {k: [] for k in calls}
            for _ in range(args.rounds):
                for k, fn in calls.items():
                    samples[k].append(T(fn))
            med = {k: statistics.median(v) for k, v in samples.items()}
            t_dense = {dt: med[("dense", dt)] for dt in dense}
            t_int4 = med[("int4", None)]
            for (p, (sets, nbytes, avg)), i8, xp in itertools.product(packed.items(), i8_modes,
                                                                       xp_modes):
                t = med[("tasa", p, i8, xp)]
                lo, hi = min(samples[("tasa", p, i8, xp)]), max(samples[("tasa", p, i8, xp)])
                row = dict(shape=name, N=N, K=K, M=M, bits=p, avg_bits=round(avg, 4), act=str(act_dtype)[6:],
                           gemv_i8={None: "default", True: "on", False: "off"}[i8],
                           x_pieces="default" if xp is None else str(xp),
                           us=round(t * 1e6, 1), us_min=round(lo * 1e6, 1), us_max=round(hi * 1e6, 1),
                           rounds=args.rounds, GBps=round(nbytes / t / 1e9, 2),
                           frac_copy_bw=round(nbytes / t / bw_shape, 3),
                           x_torch_int4=round(t_int4 / t, 2), torch_int4_us=round(t_int4 * 1e6, 1),
                           torch_int4_GBps=round(int4_bytes / t_int4 / 1e9, 2),
                           copies=len(sets), mode="resident" if args.resident else "streaming",
                           copy_bw_GBps=round(bw_shape / 1e9, 2), load_average=f"{load_before} -> {loadavg()}",
                           commit=meta["commit"], date=meta["date"])
                for dt, td in t_dense.items():
                    row[f"x_{str(dt)[6:]}"] = round(td / t, 2)
                    row[f"{str(dt)[6:]}_us"] = round(td * 1e6, 1)
                rows.append(row)
                print({k: v for k, v in row.items() if k not in ("N", "K", "commit", "date")}, flush=True)
        del dense, int4_sets, packed
    stem = args.out or f"gemm_{dev.split(':')[0]}"
    runs = [meta]
    if args.update and (RESULTS / f"{stem}.json").exists():
        old = json.loads((RESULTS / f"{stem}.json").read_text())
        new_keys = {(r["shape"], r["M"]) for r in rows}
        kept = [r for r in old["rows"] if (r["shape"], r["M"]) not in new_keys]
        runs = old["meta"].get("runs", [old["meta"]]) + [meta]
        order = {n: i for i, n in enumerate(SHAPES)}
        rows = sorted(kept + rows, key=lambda r: (r["M"], order.get(r["shape"], 99)))
    dn = [str(dt)[6:] for dt in dense_dtypes]
    md = [f"# tasa fused dequant-GEMM benchmark ({dev})", "",
          "Runs merged into this file (each row also records its own run's copy bandwidth and load):", ""]
    md += ["| " + " | ".join(f"{k}: {v}" for k, v in m.items()) + " |" for m in runs]
    md += ["", f"Group size {G}, symmetric, activations {str(act_dtype)[6:]}. Weight GB/s counts codes + "
           "scales + group table. Mode `streaming`: every timed operand (tasa and torch alike) rotates "
           "through copies totalling >= the stream size, so each call reads its weights from DRAM; "
           "`resident`: one copy, reused (cache-resident below the LLC size). Copy bandwidth (STREAM "
           "convention, read + write bytes of a 256 MB copy) measured in the same run; the weight "
           "stream is read-only, which DRAM serves somewhat faster than a copy, so a few % above 100% "
           "is possible; it is measured again before each shape (the VM's bandwidth drifts). Times: "
           "each configuration is timed in `rounds` interleaved rounds (median of 5 batches each); "
           "the median over rounds is shown, tasa's with its min-max. Ratios > 1: tasa faster.", "",
           "| shape | M | bits | AVX2 int8 GEMV | x pieces | avg bits | tasa µs | (min-max) | GB/s | of copy BW | "
           + " | ".join(f"{d} µs | ×{d}" for d in dn) + " | torch int4 µs | int4 GB/s | ×int4 | mode | load |",
           "|" + "---|" * (15 + 2 * len(dn))]
    for r in rows:
        md.append(f"| {r['shape']} | {r['M']} | {r['bits']} | {r.get('gemv_i8', 'default')} | "
                  f"{r.get('x_pieces', 'default')} | {r['avg_bits']} | {r['us']} | "
                  f"{r.get('us_min', '')}-{r.get('us_max', '')} | {r['GBps']} | "
                  f"{r['frac_copy_bw']:.0%} | " + " | ".join(f"{r[d + '_us']} | {r['x_' + d]}" for d in dn)
                  + f" | {r['torch_int4_us']} | {r.get('torch_int4_GBps', '')} | {r['x_torch_int4']} | "
                  f"{r.get('mode', 'resident')} | {r.get('load_average', '').replace(' -> ', ' → ')} |")
    md += side_by_side(rows, "gemv_i8", "on", "off", "on", "off",
                       "Same run, AVX2 int8-piece GEMV (`on`) against the float one (`off`): speed-up "
                       "of `on` (off µs / on µs), and each path's 3-bit and 3.5-bit speed relative to "
                       "its own 4-bit (target >= 1.25x for 3 vs 4).")
    md += side_by_side(rows, "x_pieces", "2", "3", "2 pieces", "3 pieces",
                       "Same run, fp32 x in 2 int8 pieces against 3 (the int8 GEMVs): speed-up of 2 "
                       "(3 µs / 2 µs), and each count's 3-bit and 3.5-bit speed relative to its own "
                       "4-bit (target >= 1.25x for 3 vs 4).")
    tasa_ext.ops.set_x_pieces(None)
    tasa_ext.ops.set_gemv_i8(None)
    path = write_results(stem, {"runs": runs}, rows, "\n".join(md) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
