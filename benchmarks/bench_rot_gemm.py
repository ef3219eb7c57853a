"""The rotation of a rotated matrix (format version 2) inside the gemm op (``tasa_ext.gemm(...,
hadamard=True)``, one op) against the hadamard op followed by gemm (two ops, what TasaLinear ran
before 2026-12-07), side by side.

    python benchmarks/bench_rot_gemm.py [--folder tasa-out]

* Per call (M = 1, x fp32): rotated 4-bit matrices of SmolLM2-135M's and Qwen2.5-Coder-0.5B's
  shapes (the lean decoder's fused q/k/v and gate/up included), small enough to stay in L2/L3,
  so the difference is the op's fixed cost and not the host's memory bandwidth, which drifts on
  these VMs; interleaved, the best of --rounds rounds of --calls calls each. The outputs of the
  two are checked equal, bit for bit.
* Per decode step (``--folder``, a rotated tasa folder such as the README job's ``tasa-out``):
  tasa's lean decoder with its projections (TasaLinear.bound) as now and as before,
  interleaved rounds of --steps steps; the greedy tokens of the two compared; paired ratios per round (the decode
  step reads the whole model, so it moves with the host's bandwidth: read the paired median).

Results: benchmarks/results/rot_gemm_<isa>.{md,json}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import interleaved_decode, machine, write_results  # noqa: E402

SHAPES = [  # (name, N, K, group size as tasa fits it to K)
    ("smollm2 qkv", 960, 576, 64), ("smollm2 o", 576, 576, 64), ("smollm2 gate+up", 3072, 576, 64),
    ("smollm2 down", 576, 1536, 128), ("qwen qkv", 1152, 896, 128), ("qwen down", 896, 4864, 64),
]


def _two_op(m, x):
    import tasa_ext
    if m.hadamard:
        x = tasa_ext.hadamard(x, m.group_size, False)
    y = tasa_ext.gemm(x, m.qweight, m.scales, m.zeros, m.gtable, m.perm, m.group_size)
    return y if m.bias is None else y + m.bias.to(y.dtype)


def per_call(args) -> list:
    from tasa.layers import TasaLinear
    from tasa.quant import LayerSpec
    rows = []
    for name, N, K, G in SHAPES:
        torch.manual_seed(N + K)
        m = TasaLinear.from_linear(torch.nn.Linear(K, N, bias=False),
                                   LayerSpec(bits=[4] * (K // G), group_size=G, mode="asym",
                                             hadamard=True))
        x = torch.randn(1, K)
        fns = {"fused": m.forward, "two-op": lambda x, m=m: _two_op(m, x)}
        same = torch.equal(fns["fused"](x), fns["two-op"](x))
        best = {k: float("inf") for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                for _ in range(20):
                    f(x)
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    f(x)
                best[k] = min(best[k], (time.perf_counter() - t0) / args.calls * 1e6)
        rows.append({"shape": name, "N": N, "K": K, "G": G, "fused_us": best["fused"],
                     "two_op_us": best["two-op"], "saved_us": best["two-op"] - best["fused"],
                     "ratio": best["two-op"] / best["fused"], "equal": same})
        print(rows[-1], flush=True)
    return rows


def fixed_cost(args) -> dict:
    """A gemm call's cost on a 16 x 128 matrix (nothing to stream) at 1 and 2 threads, next to a
    one-op baseline (tasa's rms_norm on a 576-wide row): what every small call pays."""
    import tasa_ext
    from tasa.layers import TasaLinear
    from tasa.quant import LayerSpec
    m = TasaLinear.from_linear(torch.nn.Linear(128, 16, bias=False),
                               LayerSpec(bits=[4], group_size=128, mode="asym"))
    x, xr, w = torch.randn(1, 128), torch.randn(1, 576), torch.ones(576)
    out = {}
    for th in (1, 2):
        torch.set_num_threads(th)
        for k, f in (("gemm_16x128", lambda: m(x)),
                     ("rms_norm_576", lambda: tasa_ext.ops.rms_norm(xr, w, 1e-5))):
            best = float("inf")
            for _ in range(args.rounds):
                for _ in range(20):
                    f()
                t0 = time.perf_counter()
                for _ in range(args.calls * 4):
                    f()
                best = min(best, (time.perf_counter() - t0) / (args.calls * 4) * 1e6)
            out[f"{k}_{th}t_us"] = best
    torch.set_num_threads(args.threads)
    return out


def step_profile(model, steps: int = 8) -> list:
    """The top ops of ``steps`` decode steps (torch.profiler, self CPU time per step)."""
    from torch.profiler import ProfilerActivity, profile

    from tasa.generation import _LeanDecoder
    ids = torch.arange(100, 116)[None]
    dec = _LeanDecoder(model, 16 + steps + 5)
    nxt = dec(ids, 0).argmax(-1)[:, None]
    for i in range(4):
        dec(nxt, 16 + i)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for i in range(steps):
            dec(nxt, 20 + i)
    ev = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev)
    rows = [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_step": e.count / steps} for e in ev[:8]]
    rows.append({"op": "all ops", "ms_per_step": total / 1e3 / steps, "calls_per_step": None})
    return rows


def per_step(args) -> dict:
    import tasa
    from tasa.layers import TasaLinear
    model = tasa.load(args.folder).eval()
    lins = [m for m in model.modules() if isinstance(m, TasaLinear)]
    rotated = sum(bool(m.hadamard) for m in lins)
    from tasa.generation import _LeanDecoder
    now = TasaLinear.bound           # the lean decoder calls each projection's bound closure
    ids = torch.arange(100, 116)[None]
    _LeanDecoder.LAYER_OP = False    # (the one-op layer step always rotates inside its gemms)
    try:
        times, toks = interleaved_decode(
            model, ids, args.steps, args.step_rounds,
            {"fused": lambda: setattr(TasaLinear, "bound", now),
             "two-op": lambda: setattr(TasaLinear, "bound", lambda m: lambda x: _two_op(m, x))})
    finally:
        TasaLinear.bound = now
        _LeanDecoder.LAYER_OP = True
    prof = step_profile(model)
    paired = [b / a for a, b in zip(times["fused"], times["two-op"])]
    return {"folder": str(args.folder), "linears": len(lins), "rotated": rotated,
            "fused_ms": statistics.median(times["fused"]),
            "two_op_ms": statistics.median(times["two-op"]),
            "fused_ms_all": times["fused"], "two_op_ms_all": times["two-op"],
            "paired_ratio_median": statistics.median(paired), "paired_ratios": paired,
            "same_tokens": toks["fused"] == toks["two-op"], "profile": prof}


def main(argv=None) -> int:
    import tasa_ext
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", default=None, help="a rotated tasa folder for the decode step")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--step-rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = machine()
    with torch.inference_mode():
        calls = per_call(args)
        fixed = fixed_cost(args)
        step = per_step(args) if args.folder else None
    L = [f"# The rotation inside gemm vs the hadamard op + gemm ({meta['device']})", "",
         f"{meta['date']}, commit {meta['commit']}, {args.threads} threads; command: "
         f"`{meta['command']}`", "",
         "Per call, M = 1, fp32 x, rotated 4-bit asymmetric matrices (L2/L3-resident), best of "
         f"{args.rounds} interleaved rounds of {args.calls} calls:", "",
         "| shape | N x K (G) | two ops (us) | one op (us) | saved (us) | ratio | outputs equal |",
         "|---|---|---|---|---|---|---|"]
    for r in calls:
        L.append(f"| {r['shape']} | {r['N']} x {r['K']} ({r['G']}) | {r['two_op_us']:.1f} | "
                 f"{r['fused_us']:.1f} | {r['saved_us']:.1f} | {r['ratio']:.3f} | {r['equal']} |")
    L += ["", "Fixed cost of a call (best of the rounds): gemm of a 16 x 128 matrix "
          f"{fixed['gemm_16x128_1t_us']:.1f} us on 1 thread, {fixed['gemm_16x128_2t_us']:.1f} us on 2 "
          f"(the OpenMP region); tasa's rms_norm op on a 576-wide row "
          f"{fixed['rms_norm_576_1t_us']:.1f} / {fixed['rms_norm_576_2t_us']:.1f} us."]
    if step:
        L += ["", f"Decode step of `{step['folder']}` ({step['rotated']} of {step['linears']} "
              f"linears rotated), tasa's lean decoder, {args.step_rounds} interleaved rounds of "
              f"{args.steps} steps: one op {step['fused_ms']:.2f} ms, two ops "
              f"{step['two_op_ms']:.2f} ms (medians); paired ratio two/one per round, median "
              f"{step['paired_ratio_median']:.3f}, range {min(step['paired_ratios']):.3f}-"
              f"{max(step['paired_ratios']):.3f}; greedy tokens equal: {step['same_tokens']}.", "",
              "Where one step's time goes (torch.profiler, 8 steps, self CPU time; the rest of a "
              "step is Python between the ops):", "", "| op | ms per step | calls per step |",
              "|---|---|---|"]
        for r in step["profile"]:
            n = "" if r["calls_per_step"] is None else f"{r['calls_per_step']:.0f}"
            L.append(f"| {r['op']} | {r['ms_per_step']:.2f} | {n} |")
    path = write_results(f"rot_gemm_{tasa_ext.ops.cpu_isa()}", meta,
                         {"calls": calls, "fixed": fixed, "step": step},
                         "\n".join(L) + "\n")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
