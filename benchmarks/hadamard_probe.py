"""Is incoherence processing worth a format change? (issue 27 item 3, measured before building.)

    python benchmarks/hadamard_probe.py --model smollm2-135m --data ../shared/data

Incoherence processing (QuIP#, exllamav3's EXL3): store ``W' = W R`` with ``R`` block-diagonal,
one orthonormal randomized Hadamard transform ``diag(signs) H_G / sqrt(G)`` per group of ``G``
input columns, and compute ``y = (x R) W'^T`` at run time (a fast Walsh-Hadamard transform of x
per group: G log2 G adds per group, cheap next to the GEMV). The rotation spreads a group's
outliers over all of its weights, so the group's range shrinks relative to its typical weight and
fewer codes are wasted: the gain is largest at 3 bits.

This measures the gain with exact arithmetic before any kernel exists: each decoder linear is
quantized the way the tasa job would (GPTQ's sequential block-wise scheme, Hessians of the
inputs from the already-quantized blocks), then dequantized back into its fp32 nn.Linear
(rotated rows are rotated back: ``W_hat = dequant(Q(W R)) R^T``, mathematically what the
rotated kernel computes). Embedding and head stay fp32 in every row, so the rows differ only in
the decoder linears, at identical bits per weight within a width (the rotation's signs come
from a fixed seed, no bytes).

A group that is not a power of two (SmolLM2's 576 columns take groups of 96) is rotated in
blocks of the largest power of two dividing it (32 there): the rotation never mixes groups.

Rows: uniform W3 and W4, groups of 128 (or ``--group``), symmetric, GPTQ with act-order on 32 x
512 general-text tokens; per method the plain and the rotated (``+had``) variant.
Metrics (tasa.divergence, same token ids for every row): KL to the reference and top-1 agreement
on WikiText-2 test windows and GSM8K test items, the GSM8K gold NLL; paired rotated-minus-plain
differences with 95% t-intervals over sequences.
Results: benchmarks/results/hadamard_probe_<model>.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from tasa_ext.reference import sylvester

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (KL_HEADER, kl_row, kl_scores, paired_cells,  # noqa: E402
                    run_meta, write_kl_results)


def rotation(K: int, G: int, seed: int) -> torch.Tensor:
    """Block-diagonal orthonormal ``R [K, K]``: per group ``diag(signs) H_G / sqrt(G)``."""
    g = torch.Generator().manual_seed(seed)
    Hg = sylvester(G) / G ** 0.5
    R = torch.zeros(K, K)
    for a in range(0, K, G):
        s = torch.randint(0, 2, (G,), generator=g).float() * 2 - 1
        R[a:a + G, a:a + G] = s[:, None] * Hg
    return R


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--widths", default="3,4")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--methods", default="gptq-mse,rtn")
    ap.add_argument("--general-tokens", type=int, default=10240)
    ap.add_argument("--task-tokens", type=int, default=10240)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from tasa import calib, pipeline
    from tasa.models import load_model
    from tasa.quant import get_method, uniform_plan
    t0 = time.time()
    ref, tok, info = load_model(args.model)
    ref.eval()
    cfg = pipeline.PipelineConfig(model=args.model, data=args.data, alpha=1.0)
    ids, _ = pipeline.gptq_calibration(tok, cfg, 1.0)
    rot_cache = {}

    def build(width, method, had):
        model = copy.deepcopy(ref)
        meth = get_method(method)
        p = uniform_plan(model, width, args.group, "sym", fit_group_size=True)
        for s in p.values():
            s.act_order = meth.needs_hessian

        def fake(lin, full, H):
            W = lin.weight.data.float()
            K = W.shape[1]
            G = p[full].group_size
            R = None
            if had:
                rb = min(G & -G, args.group)    # the largest power of two dividing G
                key = (K, rb)
                if key not in rot_cache:
                    rot_cache[key] = rotation(K, rb, args.seed)
                R = rot_cache[key]
                W = W @ R
                if H is not None:
                    H = R.T @ H @ R
            q = meth.quantize(W, p[full], H, name=full)
            Wh = q.dequantize().float()
            if R is not None:
                Wh = Wh @ R.T
            lin.weight.data.copy_(Wh.to(lin.weight.dtype))

        if meth.needs_hessian:
            def on_block(idx, block, prefix, hessians):
                for lname, (H, cnt) in hessians.items():
                    full = f"{prefix}.{lname}"
                    if full in p:
                        fake(block.get_submodule(lname), full, H[0])
                return True
            calib.run_blockwise(model, ids, on_block, progress=False,
                                linear_filter=lambda f: f in p)
        else:
            mods = dict(model.named_modules())
            for full in p:
                fake(mods[full], full, None)
        return model

    cands = {}
    for w in [int(x) for x in args.widths.split(",")]:
        for m in args.methods.split(","):
            for had in (False, True):
                name = f"W{w} {m}" + (" +had" if had else "")
                print(time.strftime("%H:%M:%S"), "building", name, flush=True)
                cands[name] = build(w, m, had)
    res = kl_scores(ref, cands, tok, args.data, args.general_tokens, args.task_tokens)
    meta = run_meta("hadamard_probe.py", args.model, info, t0, argv)
    L = [f"# In-group Hadamard rotation vs none (exact arithmetic): {args.model}", "",
         f"{meta['date']}, commit {meta['commit']}, {meta['device']}, torch {meta['torch']}; "
         f"command: `{meta['command']}`", "",
         f"Uniform widths, groups of {args.group} (fitted where a row is not a multiple), "
         "symmetric; GPTQ rows act-order on 32 x 512 general-text tokens, sequential. "
         "Decoder linears fake-quantized (dequantized back to fp32, rotated rows rotated back); "
         "embedding and head fp32 in every row. Same bits per weight within a width. "
         "KL = mean KL(reference || row), nats per position; ± = 95% t-interval over "
         f"sequences. General = WikiText-2 test ({res['general']['reference']['tokens']} "
         f"positions), GSM8K = test items ({res['gsm8k']['reference']['tokens']} positions; NLL "
         "over gold-solution tokens).", "",
         *KL_HEADER]
    L += [kl_row(n, res) for n in cands]
    L += ["", "Paired: rotated minus plain (negative = the rotation helps):", "",
          "| pair | ΔKL general | ΔKL GSM8K | ΔGSM8K NLL |", "|---|---|---|---|"]
    for n in cands:
        if n.endswith(" +had"):
            L.append(f"| {n} - plain | {paired_cells(res, n[:-5], n)} |")
    stem = f"hadamard_probe_{args.model}" + ("" if args.group == 128 else f"_g{args.group}")
    write_kl_results(stem, L, meta, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
