"""Does the clipping search (tasa.quant.mse: gptq-mse, rtn-mse) move quality at equal size?
(issue 27 item 3, measured first at uniform 3 bits where it matters most.)

    python benchmarks/mse_methods.py --model smollm2-135m --data ../shared/data

Rows: uniform W3 and W4, groups of 128, symmetric, act-order for the GPTQ methods, 8-bit packed
embedding/head (tasa's default), GPTQ calibrated on general text only (32 x 512 tokens); each
width with gptq, gptq-mse, rtn, rtn-mse -- the same file size per width (same format).
Metrics on the same token ids (tasa.divergence): KL to the reference and top-1 agreement on
WikiText-2 test windows and on GSM8K test items, the GSM8K gold NLL; paired differences
(method minus its min/max twin) with 95% t-intervals over sequences.
Results: benchmarks/results/mse_methods_<model>.{md,json}.
"""
from __future__ import annotations

# The rows of this benchmark's committed results (and its caches) were made before format
# version 2's rotation existed: it stays off here so a re-run extends them consistently; the
# rotation is measured apart (benchmarks/hadamard_quality.py, hadamard_probe.py).
import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (KL_HEADER, kl_row, kl_scores, paired_cells,  # noqa: E402
                    run_meta, write_kl_results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--widths", default="3,4")
    ap.add_argument("--general-tokens", type=int, default=10240)
    ap.add_argument("--task-tokens", type=int, default=10240)
    ap.add_argument("--methods", default="gptq,gptq-mse,rtn,rtn-mse")
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    import tasa
    from tasa import pipeline
    from tasa.models import cache_dir, load_model
    from tasa.quant import plan_to_dict, uniform_plan
    work = Path(args.work) if args.work else cache_dir() / "mse" / args.model
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ref, tok, info = load_model(args.model)
    folders = {}
    for w in [int(x) for x in args.widths.split(",")]:
        for method in args.methods.split(","):
            name = f"W{w} {method}"
            folder = work / f"w{w}-{method}" if method != "rtn-mse" else work / f"w{w}-{method}-w2"
            if not (folder / "run.json").is_file():
                print(time.strftime("%H:%M:%S"), name, "->", folder, flush=True)
                model, mtok, _ = load_model(args.model)
                plan = uniform_plan(model, w, 128, "sym", fit_group_size=True)
                gptq = method.startswith("gptq")
                for s in plan.values():
                    s.act_order = gptq
                cfg = pipeline.PipelineConfig(model=args.model, data=args.data, alpha=1.0, hadamard=False,
                                              mode="sym", act_order=gptq, method=method,
                                              eval_windows=0)
                pipeline.run(cfg, folder, progress=False, quiet=True, report=False,
                             model=model, tokenizer=mtok, plan=plan_to_dict(plan))
            folders[name] = folder
    cands = {n: tasa.load(f) for n, f in folders.items()}
    res = kl_scores(ref, cands, tok, args.data, args.general_tokens, args.task_tokens)
    meta = run_meta("mse_methods.py", args.model, info, t0, argv)
    L = [f"# Clipping search vs min/max group parameters: {args.model}", "",
         f"{meta['date']}, commit {meta['commit']}, {meta['device']}, torch {meta['torch']}; "
         f"command: `{meta['command']}`", "",
         "Uniform widths, groups of 128, symmetric, 8-bit packed embedding/head; GPTQ rows "
         "act-order, calibrated on 32 x 512 general-text tokens. Same format and file size "
         "within a width. KL = mean KL(reference || row) in nats per position; ± = 95% "
         f"t-interval over sequences. General = WikiText-2 test "
         f"({res['general']['reference']['tokens']} positions), GSM8K = test items "
         f"({res['gsm8k']['reference']['tokens']} positions; NLL over gold-solution tokens).", "",
         *KL_HEADER]
    L += [kl_row(n, res) for n in folders]
    L += ["", "Paired: the clipping search minus its min/max twin (negative = better):", "",
          "| pair | ΔKL general | ΔKL GSM8K | ΔGSM8K NLL |", "|---|---|---|---|"]
    for n in folders:
        if n.endswith("-mse") and n[:-4] in folders:
            L.append(f"| {n} - {n[:-4]} | {paired_cells(res, n[:-4], n)} |")
    stem = f"mse_methods_{args.model}" + ("" if args.methods == "gptq,gptq-mse,rtn,rtn-mse" else
                                          "_" + args.methods.replace(",", "_"))
    write_kl_results(stem, L, meta, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
