"""GSM8K exact match through lm-eval on the CPU: tasa's decode loop (``tasa eval`` default,
``generation="fast"``) against transformers' ``generate`` on lm-eval's padded batches
(``generation="hf"``), same model, same items, side by side in one run.

    python benchmarks/bench_eval_generation.py [--model qwen2.5-coder-0.5b] [--limit 10]

The model is bench_generate's 3.5-bit TASA plan (full-precision head). Reported: seconds per
path, exact match, and how many responses are identical (transformers' batched generate pads
on the left, which can move a greedy token where two logits nearly tie). Results:
benchmarks/results/eval_generation_<model>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (both paths)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None, help="results stem (default results/eval_generation_<model>)")
    args = ap.parse_args(argv)
    args.out = args.out or str(HERE / "results" / f"eval_generation_{args.model}")

    import torch

    from bench_generate import _tasa_model
    from common import machine
    from tasa import evaluation as tev

    torch.set_num_threads(args.threads)
    meta = machine()
    model, tok, note = _tasa_model(args.model, 0)
    out, samples = {}, {}
    for path in ("hf", "fast"):
        raw = Path(args.out).with_name(f"eval_generation_{path}.tmp.json")
        s = tev.evaluate(model, tok, tasks=["gsm8k"], data=args.data, limit=args.limit, seed=0,
                         batch_size=args.batch_size, generation=path, out_path=raw, progress=False)
        out[path] = {"seconds": s["config"]["seconds"], **s["results"]["gsm8k"]}
        samples[path] = [x["resps"] for x in json.loads(raw.read_text())["samples"]["gsm8k"]]
        raw.unlink()
        print(path, json.dumps(out[path]), flush=True)
    same = sum(a == b for a, b in zip(samples["hf"], samples["fast"]))
    res = {"meta": meta, "model": args.model, "plan": note, "limit": args.limit,
           "batch_size": args.batch_size, "paths": out, "identical_responses": same,
           "responses": len(samples["hf"])}
    Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    hf, fast = out["hf"], out["fast"]
    md = ["# GSM8K generation in lm-eval: tasa's decode loop vs transformers' generate\n",
          f"- date {meta['date']}, commit {meta['commit']}; device: {meta['device']}; torch "
          f"{meta['torch']}; {args.threads} threads",
          f"- command: `{meta['command']}`",
          f"- model: {args.model}, {note}; full-precision head",
          f"- {args.limit} GSM8K items, 5-shot, lm-eval batch size {args.batch_size}\n",
          "| path | seconds | exact match (strict) | exact match (flexible) |", "|---|---|---|---|"]
    for k, v in out.items():
        md.append(f"| {k} | {v['seconds']:.1f} | {v.get('exact_match_strict', float('nan')):.3f} | "
                  f"{v.get('exact_match_flexible', float('nan')):.3f} |")
    md.append(f"\nSpeed-up of the decode loop: **{hf['seconds'] / fast['seconds']:.2f}x**; identical "
              f"responses: {same} of {len(samples['hf'])} (lm-eval logs one response per filter).")
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
