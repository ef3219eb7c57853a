"""The ``tasa`` command line.

    tasa quantize --model M --bits B --out DIR   the TASA pipeline: mixture search, multi-objective
                                   sensitivity, knapsack + group allocation, GPTQ, save, report
    tasa allocate --measurement F --bits B --out plan.json   re-allocate from a measurement
                                   (seconds, no model or data needed)
    tasa eval ...                  lm-eval evaluation of a model or a saved quantized model
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


def _widths(s: str) -> tuple:
    try:
        return tuple(sorted({int(x) for x in s.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, got {s!r}")


def _pipeline_config(args):
    from .pipeline import PipelineConfig

    cfg = PipelineConfig()
    for f in ("model", "bits", "data", "seed", "group_size", "mode", "widths", "alpha", "beta",
              "sens_bits", "granularity", "method", "n_calib", "seqlen", "n_gen", "n_task",
              "n_test", "mix_seqlen", "eval_windows", "act_order"):
        v = getattr(args, f, None)
        if v is not None:
            setattr(cfg, f, v)
    if args.no_intra:
        cfg.intra = False
    return cfg


def cmd_quantize(args) -> int:
    import torch

    from .pipeline import run

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _pipeline_config(args)
    try:
        summary = run(cfg, args.out, fresh=args.fresh, measurement_from=args.measurement,
                      progress=not args.no_progress, quiet=args.quiet)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("avg_bits", "alpha_star", "ppl_reference",
                                              "ppl_quantized", "peak_rss_mib")}
                     | {"seconds": round(summary["timings_s"]["total"], 1), "out": args.out}))
    return 0


def cmd_allocate(args) -> int:
    from pathlib import Path

    from .pipeline import PLAN_NAME, _atomic_json, allocate, load_measurement, plan_document

    try:
        m = load_measurement(args.measurement)
        A = allocate(m, args.bits, args.beta, args.widths, not args.no_intra)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.is_dir():
        out = out / PLAN_NAME
    _atomic_json(out, plan_document(m, A))
    s = A["summary"]
    print(f"{out}: {s['avg_bits']:.4f} average bits (budget {args.bits}); "
          + ", ".join(f"{b}-bit {100 * f:.1f}%" for b, f in s["width_fraction"].items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tasa", description="Task-aware mixed-precision quantization of LLMs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("quantize", help="run the TASA pipeline and save the quantized model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="registry name (smollm2-135m, qwen2.5-coder-0.5b, gemma3-270m), .gguf "
                        "file, local checkpoint folder or Hugging Face id")
    p.add_argument("--bits", type=float, default=3.5,
                   help="target average bits per weight of the quantized linears, exact storage "
                        "cost (codes + fp16 scales/zeros + tables)")
    p.add_argument("--out", required=True, help="output folder (resumes a run found there)")
    p.add_argument("--data", default=None,
                   help="data folder laid out like shared/data (default: the slices shipped with tasa)")
    p.add_argument("--beta", type=float, default=None,
                   help="weight of the perplexity objective in the aggregate (default 0.5)")
    p.add_argument("--alpha", type=float, default=None,
                   help="fix the share of general text in the calibration mix (default: search)")
    p.add_argument("--widths", type=_widths, default=None, help="allowed widths, e.g. 3,4,8")
    p.add_argument("--group-size", type=int, default=None, help="default 128")
    p.add_argument("--mode", choices=["sym", "asym"], default=None, help="default asym")
    p.add_argument("--method", choices=["gptq", "rtn"], default=None, help="default gptq")
    p.add_argument("--act-order", action="store_true", default=None)
    p.add_argument("--granularity", choices=["block", "linear"], default=None,
                   help="sensitivity/allocation unit (default block)")
    p.add_argument("--sens-bits", type=int, default=None, help="probe width (default 3)")
    p.add_argument("--n-calib", type=int, default=None, help="GPTQ sequences (default 32)")
    p.add_argument("--seqlen", type=int, default=None, help="GPTQ sequence length (default 512)")
    p.add_argument("--n-gen", type=int, default=None)
    p.add_argument("--n-task", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--mix-seqlen", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=None,
                   help="WikiText-2 windows for the report's perplexity check (0: skip)")
    p.add_argument("--no-intra", action="store_true", help="skip the intra-layer group step")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--measurement", default=None,
                   help="re-use this measurement.json (same settings) instead of measuring")
    p.add_argument("--fresh", action="store_true",
                   help="discard a measurement.json of other settings found in --out")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_quantize)
    p = sub.add_parser("allocate", help="re-allocate bits from a measurement.json (seconds)")
    p.add_argument("--measurement", required=True, help="measurement.json or its folder")
    p.add_argument("--bits", type=float, required=True)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--widths", type=_widths, default=(3, 4, 8))
    p.add_argument("--no-intra", action="store_true")
    p.add_argument("--out", required=True, help="plan.json path (or a folder)")
    p.set_defaults(fn=cmd_allocate)
    from .eval import add_eval_parser   # lm-eval itself is imported only when `eval` runs

    add_eval_parser(sub)
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
