"""Baselines: WikiText-2 perplexity of a model for the reference, RTN and GPTQ at uniform bits.

Writes benchmarks/results/baselines.md. Each configuration runs in its own subprocess so that
its peak RSS is its own. Example (the run reported in the results file):

    python benchmarks/baselines.py --model smollm2-135m --nsamples 64 --calib-seqlen 512 \
        --seqlen 2048 --max-windows 20

The registry models were distributed already quantized (GGUF): the "reference" row is the
dequantized GGUF weights, not the original bf16 checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def run_one(args) -> dict:
    import torch

    from tasa import corpora, models, ppl
    from tasa.layers import quantized_modules
    from tasa.quant import uniform_plan
    from tasa.modelquant import quantize_model

    torch.manual_seed(0)
    model, tok, info = models.load_model(args.model)
    res = {"config": args.only, "note": info.note()}
    data_src = str(args.data) if args.data and Path(args.data).is_dir() else None
    if args.only != "reference":
        method, bits = args.only.split("-w")
        bits = int(bits)
        plan = uniform_plan(model, bits, args.group_size, args.mode, act_order=args.act_order,
                              fit_group_size=True)
        calib_ids = None
        t0 = time.perf_counter()
        if method == "gptq":
            pools = {"general": corpora.Pool("general", corpora.load_general(data_src))}
            batch = corpora.calibration_batch(tok, pools, args.nsamples, args.calib_seqlen, seed=0)
            calib_ids = batch.input_ids
        quantize_model(model, plan, method, calib_ids=calib_ids, batch_size=args.batch_size,
                       progress=False)
        res["quant_seconds"] = time.perf_counter() - t0
        cost = sum(s.cost_bits(model.get_submodule(n).out_features,
                               model.get_submodule(n).in_features) for n, s in plan.items())
        numel = sum(m.out_features * m.in_features for m in quantized_modules(model).values())
        res["avg_bits"] = cost / numel
        res["group_sizes"] = sorted({s.group_size for s in plan.values()})
        res["n_linears"] = len(plan)
        res["rss_quant_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r = ppl.wikitext2_perplexity(model, tok, data_src, seqlen=args.seqlen,
                                 max_windows=args.max_windows, progress=False)
    res.update({"ppl": r["ppl"], "tokens": r["tokens"], "windows": r["windows"],
                "ppl_seconds": r["seconds"],
                "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="data folder like shared/data (default ../shared/data); shipped slices if absent")
    p.add_argument("--configs", default="reference,rtn-w4,rtn-w3,gptq-w4,gptq-w3")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--mode", default="asym", choices=["sym", "asym"])
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "baselines.md"))
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        res = run_one(args)
        Path(args.json).write_text(json.dumps(res))
        return
    cmd = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    rows = []
    t_all = time.perf_counter()
    for cfg in args.configs.split(","):
        out = Path(args.out).with_suffix(f".{cfg}.json")
        sub = [sys.executable, __file__, "--only", cfg, "--json", str(out)] + \
              (argv if argv is not None else sys.argv[1:])
        print(f"[baselines] {cfg} ...", flush=True)
        subprocess.run(sub, check=True)
        rows.append(json.loads(out.read_text()))
        out.unlink()
        print(f"[baselines] {cfg}: {rows[-1]}", flush=True)
    import tasa_ext
    import torch
    import transformers

    meta = machine("cpu", include_untracked=True)   # an untracked new source file counts as dirty
    ref = next((r for r in rows if r["config"] == "reference"), None)
    mode_txt = f"{args.mode}{', act-order' if args.act_order else ''}"
    lines = [
        f"# Baselines: {args.model}, WikiText-2 test perplexity",
        "",
        f"- **Model**: {rows[0]['note']}. The *reference* row is therefore the dequantized GGUF "
        f"weights, and RTN/GPTQ re-quantize those weights.",
        f"- **Quantization**: uniform bits on every decoder-block nn.Linear "
        f"({rows[-1].get('n_linears', '?')} linears); lm_head and embeddings full precision. "
        f"Requested group size {args.group_size}, mode **{mode_txt}**; where K is not divisible by "
        f"{args.group_size} the largest multiple of 32 below it that divides K is used "
        f"(group sizes used: {rows[-1].get('group_sizes', '?')}; for SmolLM2 K=576 -> 96, "
        f"K=1536 -> 128).",
        f"- **Average bits**: exact `tasa_ext.cost_bits` summed over the quantized linears / their "
        f"weight count (codes incl. column padding, fp16 scales{' and zeros' if args.mode == 'asym' else ''}, "
        f"group tables{', permutation' if args.act_order else ''}).",
        f"- **GPTQ**: sequential block-by-block (inputs of block l+1 from quantized block l), "
        f"damp 0.01, blocks aligned to groups, {'act-order' if args.act_order else 'no act-order'}; "
        f"calibration {args.nsamples} x {args.calib_seqlen} tokens (seed 0) of general text "
        f"(`general/*` C4 + Wikipedia samples), disjoint from WikiText-2 test.",
        f"- **Perplexity**: GPTQ protocol (test rows joined with \"\\n\\n\", non-overlapping "
        f"{args.seqlen}-token windows), **first {args.max_windows} windows only** "
        f"({ref['tokens'] if ref else '?'} scored tokens) to fit a 2-core CPU; numbers are comparable "
        f"across rows, not to full-test-set numbers in papers. Inference runs through TasaLinear "
        f"(`tasa_ext.gemm`, CPU kernel).",
        f"- **Time / memory**: wall-clock quantization time and peak RSS of the process (model "
        f"load + quantization + evaluation) on this machine.",
        "",
        "| config | avg bits | WikiText-2 ppl | Δ vs ref | quant time (s) | peak RSS after quant (MiB) | peak RSS incl. eval (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["config"]
        if name != "reference":
            m, b = name.split("-w")
            name = f"{m.upper()} W{b} g{args.group_size} {args.mode}"
        else:
            name = "reference (dequantized GGUF, fp32)"
        d = f"{r['ppl'] - ref['ppl']:+.3f}" if ref and r is not ref else "-"
        ab = f"{r['avg_bits']:.4f}" if "avg_bits" in r else "32 (fp32)"
        qt = f"{r['quant_seconds']:.1f}" if "quant_seconds" in r else "-"
        rq = f"{r['rss_quant_mib']:.0f}" if "rss_quant_mib" in r else "-"
        lines.append(f"| {name} | {ab} | {r['ppl']:.3f} | {d} | {qt} | {rq} | {r['rss_peak_mib']:.0f} |")
    lines += [
        "",
        "## Run",
        "",
        f"- machine: {meta['device']}, torch threads {meta['threads']}, {platform.platform()}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, tasa_ext format v{tasa_ext.FORMAT_VERSION}, "
        f"CPU ISA {tasa_ext.build_info()['cpu_isa']}",
        f"- date: {meta['date']}",
        f"- git commit: {meta['commit']}",
        f"- command: `{cmd}`",
        f"- total wall time: {time.perf_counter() - t_all:.0f} s",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
