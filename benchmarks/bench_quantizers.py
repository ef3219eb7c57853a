"""How long does each per-matrix quantizer take, with tasa's CPU kernels for GPTQ's column loop
(tasa::gptq_cols_) and the clipping search (tasa::mse_params) against the torch loops they
replaced (tasa_ext.reference, the tests' oracles)? Both paths give the same codes (checked here
on every row: codes equal, or for the clipping search the same error to rounding).

    python benchmarks/bench_quantizers.py --model smollm2-135m

Shapes: one block's linears of the model (q, k, o, gate, down: v and up share k's and gate's
shapes), random weights, a Hessian from random correlated inputs; widths 3 and 4, groups of 128
(96 where K = 576, as tasa's plans fit them), symmetric, act-order (the plan's defaults). Times: the median of --reps runs per matrix, summed
over a block's seven linears, and the projection to every block of the model. Idle machine
please: a second CPU-heavy process doubles every time here.
Results: benchmarks/results/bench_quantizers_<model>.{md,json}.
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
from common import machine, write_results  # noqa: E402

SHAPES = {   # name: (n_out, k_in), per block, with how many linears of the block have it
    "smollm2-135m": {"q/o": ((576, 576), 2), "k/v": ((192, 576), 2), "gate/up": ((1536, 576), 2),
                     "down": ((576, 1536), 1), "blocks": 30},
    "qwen2.5-coder-0.5b": {"q/o": ((896, 896), 2), "k/v": ((128, 896), 2),
                           "gate/up": ((4864, 896), 2), "down": ((896, 4864), 1), "blocks": 24},
}


def _hessian(K, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, K // 4, generator=g) / (K // 4) ** 0.5
    X = torch.randn(1024, K // 4, generator=g) @ A.T + 0.1 * torch.randn(1024, K, generator=g)
    return 2 * X.T @ X / X.shape[0]


def _time(f, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        out = f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--methods", default="gptq,gptq-mse,rtn-mse")
    ap.add_argument("--widths", default="3,4")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    import tasa  # noqa: F401  (registers the methods)
    import tasa_ext
    from tasa_ext import reference
    from tasa.quant import LayerSpec
    from tasa.quant.spec import resolve_group_size
    from tasa.quant.methods import get_method

    kernels = {"gptq_cols_": tasa_ext.gptq_cols_, "mse_params": tasa_ext.mse_params}
    torch_loops = {"gptq_cols_": reference.gptq_cols_, "mse_params": reference.mse_params}

    def use(impl):
        for k, f in impl.items():
            setattr(tasa_ext, k, f)

    cfg = SHAPES[args.model]
    rows = []
    try:
        for method in args.methods.split(","):
            m = get_method(method)
            for bits in [int(b) for b in args.widths.split(",")]:
                tot = {"kernel": 0.0, "torch": 0.0}
                for shape_name, ((N, K), count) in ((k, v) for k, v in cfg.items() if k != "blocks"):
                    W = torch.randn(N, K, generator=torch.Generator().manual_seed(N + K))
                    H = _hessian(K, seed=K) if m.needs_hessian else None
                    G = resolve_group_size(K, 128)
                    spec = LayerSpec(bits=[bits] * (K // G), group_size=G, mode="sym",
                                     act_order=m.needs_hessian, n_out=N, k_in=K)
                    res = {}
                    for path, impl in (("kernel", kernels), ("torch", torch_loops)):
                        use(impl)
                        res[path] = _time(lambda: m.quantize(W, spec, H), args.reps)
                    use(kernels)
                    qk, qt = res["kernel"][1], res["torch"][1]
                    same = float((qk.codes == qt.codes).float().mean())
                    row = {"method": method, "bits": bits, "shape": shape_name, "N": N, "K": K,
                           "kernel_s": res["kernel"][0], "torch_s": res["torch"][0],
                           "speedup": res["torch"][0] / res["kernel"][0], "codes_equal": same}
                    rows.append(row)
                    for p in tot:
                        tot[p] += count * res[p][0]
                    print(f"{method:9s} W{bits} {shape_name:8s} {N}x{K}: kernel "
                          f"{row['kernel_s'] * 1e3:8.1f} ms, torch {row['torch_s'] * 1e3:8.1f} ms "
                          f"({row['speedup']:.1f}x), codes equal {same:.4f}", flush=True)
                rows.append({"method": method, "bits": bits, "shape": "block", "kernel_s": tot["kernel"],
                             "torch_s": tot["torch"], "speedup": tot["torch"] / tot["kernel"],
                             "model_kernel_s": tot["kernel"] * cfg["blocks"],
                             "model_torch_s": tot["torch"] * cfg["blocks"]})
    finally:
        use(kernels)
    meta = machine()
    md = [f"# Per-matrix quantizer time, tasa kernels vs the torch loops ({args.model} shapes)", "",
          f"{meta['date']}, {meta['device']}, commit {meta['commit']}, torch {meta['torch']}, "
          f"{meta['threads']} threads.", "", f"Command: `{meta['command']}`", "",
          "Groups of 128 (96 where K = 576), symmetric, act-order for the GPTQ methods; random weights, a Hessian "
          "of random correlated inputs; the median of "
          f"{args.reps} runs per matrix. `codes equal`: the share of codes the two paths agree "
          "on (the column loop is bit-exact; the clipping search may pick another candidate "
          "of equal error on a near-tie).", "",
          "| method | bits | shape | N x K | kernel ms | torch ms | speed-up | codes equal |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["shape"] == "block":
            md.append(f"| **{r['method']}** | {r['bits']} | one block (7 linears) | | "
                      f"**{r['kernel_s'] * 1e3:.0f}** | **{r['torch_s'] * 1e3:.0f}** | "
                      f"**{r['speedup']:.1f}x** | |")
        else:
            md.append(f"| {r['method']} | {r['bits']} | {r['shape']} | {r['N']} x {r['K']} | "
                      f"{r['kernel_s'] * 1e3:.1f} | {r['torch_s'] * 1e3:.1f} | {r['speedup']:.1f}x | "
                      f"{r['codes_equal']:.4f} |")
    md += ["", f"A whole model ({cfg['blocks']} blocks), one width: " + "; ".join(
        f"{r['method']} W{r['bits']} {r['model_kernel_s']:.0f} s vs {r['model_torch_s']:.0f} s"
        for r in rows if r["shape"] == "block") + ".", ""]
    path = write_results(f"bench_quantizers_{args.model}", {**meta, **vars(args)}, rows, "\n".join(md))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
