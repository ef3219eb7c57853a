"""Which precision for the token embedding and output projection? The quality cost of each
choice against the decoder's own, and what it does to the whole file.

For each model: the reference (the GGUF's dequantized weights, fp32); the embedding + head
(one table when tied) RTN-quantized at 8 and 4 bits with the decoder left in full precision
(the embedding's cost alone); the decoder quantized with TASA's 3.5-bit plan (GPTQ, the
plan allocated from the model's measurement.json in benchmarks/results, calibration mix alpha*
from that plan) with the embedding kept fp32, 8-bit and 4-bit (what the README job writes).
Metrics on the same token ids for every row (tasa.divergence): mean KL divergence to the
reference and top-1 agreement over every position of WikiText-2 test windows and of GSM8K
test items (question + gold solution), and the GSM8K gold-solution NLL; paired differences
with 95% intervals over sequences. Sizes: the saved folder's bytes and bits per parameter
over every parameter (tasa.storage.model_size), against the model's source GGUF.

    python benchmarks/embed_bits.py [--models smollm2-135m,qwen2.5-coder-0.5b,gemma3-270m]
        [--data ../shared/data] [--tokens 8192] [--method gptq|rtn]
"""
from __future__ import annotations

# The rows of this benchmark's committed results (and its caches) were made before format
# version 2's rotation existed: it stays off here so a re-run extends them consistently; the
# rotation is measured apart (benchmarks/hadamard_quality.py, hadamard_probe.py).
import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ci95, machine  # noqa: E402

import tasa  # noqa: E402,F401
from tasa import divergence as dv  # noqa: E402
from tasa.modelquant import quantize_embeddings, quantize_model  # noqa: E402
from tasa.storage import model_size, save_quantized  # noqa: E402
from tasa.models import load_model, resolve_gguf  # noqa: E402
from tasa.pipeline import PipelineConfig  # noqa: E402
from tasa.pipeline.stages import gptq_calibration, split_data  # noqa: E402
from tasa.quant import read_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEASUREMENTS = {m: REPO / "benchmarks/results" / d / m / "measurement.json"
                for m, d in (("smollm2-135m", "reproduction"),
                             ("qwen2.5-coder-0.5b", "reproduction_paper"),
                             ("gemma3-270m", "reproduction_paper"))}


def plan_for(name: str, bits: float, tmp: Path):
    out = tmp / f"{name}.plan.json"
    subprocess.run(["tasa", "allocate", "--measurement", str(MEASUREMENTS[name]), "--bits",
                    str(bits), "--out", str(out)], check=True, capture_output=True)
    specs, doc = read_plan(out)
    return specs, doc


def run_model(name: str, args, tmp: Path) -> dict:
    t0 = time.time()
    ref, tok, info = load_model(name)
    ref.eval()
    specs, doc = plan_for(name, args.bits, tmp)
    seqs = {t: dv.kl_sequences(tok, t, args.data, args.tokens) for t in dv.TEXTS}
    cands = {}
    for b in (8, 4):
        c = copy.deepcopy(ref)
        quantize_embeddings(c, b, 128, "asym")
        cands[f"emb{b} (decoder fp32)"] = c
    dec = copy.deepcopy(ref)
    if args.method == "gptq":
        cfg = PipelineConfig(model=name, data=args.data, hadamard=False)
        ids, _ = gptq_calibration(tok, cfg, float(doc["alpha"]), split_data(cfg), log=lambda *a: None)
        quantize_model(dec, specs, "gptq", calib_ids=ids, progress=False)
    else:
        quantize_model(dec, specs, "rtn", progress=False)
    sizes = {}
    for b in (0, 8, 4):
        c = copy.deepcopy(dec)
        if b:
            quantize_embeddings(c, b, 128, "asym")
        label = f"decoder {args.bits} + " + (f"emb{b}" if b else "emb fp32")
        cands[label] = c
        folder = tmp / f"{name}-{b}"
        save_quantized(c, folder, specs)
        sizes[label] = model_size(folder)
    del dec
    gc.collect()
    res = {t: dv.compare(ref, cands, s, progress=not args.no_progress, desc=f"{name} {t}")
           for t, s in seqs.items()}
    gguf = os.path.getsize(resolve_gguf(name))
    return {"model": name, "gguf_bytes": gguf, "plan_avg_bits": doc["summary"]["avg_bits"],
            "alpha": doc["alpha"], "results": res, "sizes": sizes,
            "seconds": time.time() - t0, "note": info.note()}


def table(r: dict) -> list:
    L = [f"### {r['model']}\n",
         f"`{r.get('command', '')}` ({r.get('tokens_per_text', '?')} tokens per text, "
         f"{r['seconds'] / 60:.0f} min)\n",
         f"Source GGUF {r['gguf_bytes'] / 1e6:.1f} MB. Decoder plan: TASA {r['plan_avg_bits']:.3f} "
         f"storage bits (alpha* {r['alpha']:.3f}). {r['note']}.\n"]
    g, m = r["results"]["general"], r["results"]["gsm8k"]
    L.append("| row | general KL | general top-1 | GSM8K-text KL | GSM8K top-1 | GSM8K gold NLL "
             "(nats/token) | file MB | bits/param (whole file) | x source GGUF |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for n in g:
        s = r["sizes"].get(n)
        sz = (f"{s['file_bytes'] / 1e6:.1f} | {s['bits_per_param']:.2f} | "
              f"{s['file_bytes'] / r['gguf_bytes']:.2f}x" if s else "| |")
        L.append(f"| {n} | {g[n]['kl']:.5f} | {100 * g[n]['top1']:.2f}% | {m[n]['kl']:.5f} | "
                 f"{100 * m[n]['top1']:.2f}% | {m[n]['nll']:.4f} | {sz} |")
    L.append("")
    L.append("Paired differences (95% t-interval over sequences: "
             f"{len(g['reference']['kl_seq'])} general windows, {len(m['reference']['kl_seq'])} "
             "GSM8K items):\n")
    dec = [n for n in g if n.startswith("decoder")]
    base = dec[0]
    for n in dec[1:] + [k for k in g if k.startswith("emb")]:
        other = base if n.startswith("decoder") else "reference"
        for t, R in (("general KL", g), ("GSM8K KL", m)):
            d, h = ci95([b - a for a, b in zip(R[other]["kl_seq"], R[n]["kl_seq"])])
            L.append(f"- {n} vs {other}, {t}: {d:+.5f} +- {h:.5f}")
        d, h = ci95([b - a for a, b in zip(m[other]["nll_seq"], m[n]["nll_seq"])])
        L.append(f"- {n} vs {other}, GSM8K gold NLL: {d:+.4f} +- {h:.4f} nats/token")
    L.append("")
    return L


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,gemma3-270m")
    ap.add_argument("--data", default=None, help="a folder like shared/data (default: slices "
                                                   "shipped with tasa)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per text")
    ap.add_argument("--bits", type=float, default=3.5, help="the decoder plan's storage bits")
    ap.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    ap.add_argument("--out", default="embed_bits")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    rows, commands = [], []
    prev = RESULTS / f"{args.out}.json"
    if prev.is_file():               # rows of models not rerun now are kept (with their command)
        old = json.loads(prev.read_text())
        wanted = set(args.models.split(","))
        rows = [r for r in old["rows"] if r["model"] not in wanted]
        commands = [c for c in old["meta"].get("commands", [old["meta"].get("command")])
                    if rows and c]
    with tempfile.TemporaryDirectory(prefix="tasa-embed-") as tmp:
        for name in args.models.split(","):
            rows.append(run_model(name, args, Path(tmp)))
            rows[-1]["command"] = "python " + " ".join(sys.argv)
            rows[-1]["tokens_per_text"] = args.tokens
            gc.collect()
            meta = {**machine(), "command": "python " + " ".join(sys.argv),
                    "commands": commands + ["python " + " ".join(sys.argv)],
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            md = ["# Embedding / head precision: quality cost and file size\n",
                  f"- {meta['device']}; {meta['date']}; commit {meta['commit']}",
                  "- commands: " + "; ".join(f"`{c}`" for c in meta["commands"]),
                  "- KL: nats per position, mean over every "
                  "position of the text, to the reference's next-token distribution; top-1: "
                  "agreement of the argmax with the reference's.", ""]
            for r in rows:
                md += table(r)
            (RESULTS / f"{args.out}.md").write_text("\n".join(md))
            (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}))
            print("\n".join(table(rows[-1])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
