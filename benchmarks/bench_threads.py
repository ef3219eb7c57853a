"""Decode speed when the CPU is shared: tasa at 1 and 2 threads and with its thread governor
(``tasa.generation.ThreadGovernor``, the default), llama.cpp at 1 and 2 threads beside it, with
0, 1 and 2 competing busy processes (``python -c "while True: pass"``), in one run.

    python benchmarks/bench_threads.py [--reps 4] [--new 160]

Each measurement is a fresh process (load, 8 warm-up tokens, then ``--new`` greedy tokens
forced, decode tokens/s). Within a repetition the configurations run in a shuffled order
(seeded) under each load, so a drift of the machine spreads over all of them; the table gives
medians with min-max over ``--reps``. The tasa model: SmolLM2-135M, uniform 4-bit RTN with the
8-bit packed embedding/head (speed depends on the widths only); llama.cpp: the model's own
Q4_1 GGUF through llama-cpp-python (skipped, saying so, when it is not installed).
Results: benchmarks/results/threads_contention.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = r'''
import json, os, sys, time
kind, threads, path, new = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
prompt = "The history of the city begins"
if kind == "llama.cpp":
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, verbose=False,
                n_ctx=512)
    toks = llm.tokenize(prompt.encode())
    llm.eval(toks)
    for _ in range(8):
        llm.eval([llm.sample(temp=0.0)])
    t0 = time.perf_counter()
    for _ in range(new):
        llm.eval([llm.sample(temp=0.0)])
    print(json.dumps({"tok_s": new / (time.perf_counter() - t0), "switches": None}))
else:
    import torch, tasa
    from tasa import generation as G
    from transformers import AutoTokenizer
    torch.set_num_threads(threads)
    m = tasa.load(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(prompt, return_tensors="pt").input_ids
    adapt = kind == "tasa-governor"
    G.generate(m, tok, ids, 8, min_new_tokens=8, adapt_threads=False)
    r = G.generate(m, tok, ids, new, min_new_tokens=new, adapt_threads=adapt)
    print(json.dumps({"tok_s": r.decode_tokens_per_s, "switches": r.threads if adapt else None}))
'''

CONFIGS = [("tasa", 1), ("tasa", 2), ("tasa-governor", 2), ("llama.cpp", 1), ("llama.cpp", 2)]


def prepare(folder: Path) -> None:
    import tasa
    from tasa.models import load_model

    model, tok, _ = load_model("smollm2-135m")
    model = tasa.quantize(model, None, bits=4, method="rtn", embed_bits=8, progress=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def run_one(kind, threads, path, new) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(threads), str(path), str(new)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    import importlib.util

    from common import machine, write_results
    from tasa.models import resolve_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--new", type=int, default=160)
    ap.add_argument("--loads", default="0,1,2", help="numbers of competing busy processes")
    args = ap.parse_args()
    meta = machine()
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    configs = [c for c in CONFIGS if have_llama or c[0] != "llama.cpp"]
    gguf = resolve_gguf("smollm2-135m")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "smol-tasa"
        prepare(folder)
        rng = random.Random(0)
        for rep in range(args.reps):
            for load in [int(x) for x in args.loads.split(",")]:
                hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        for _ in range(load)]
                time.sleep(1.0)
                try:
                    order = list(configs)
                    rng.shuffle(order)
                    for kind, threads in order:
                        path = gguf if kind == "llama.cpp" else folder
                        res = run_one(kind, threads, path, args.new)
                        rows.append({"rep": rep, "load": load, "config": kind,
                                     "threads": threads, **res})
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
    meta["loadavg_after"] = os.getloadavg()
    lines = [f"# Decode when the CPU is shared ({meta['device']})", "",
             f"{meta['date']}, commit {meta['commit']}, `{meta['command']}`; "
             f"SmolLM2-135M (tasa: uniform 4-bit RTN + 8-bit embedding/head; llama.cpp: its Q4_1 "
             f"GGUF{'' if have_llama else ' -- not installed, skipped'}), {args.new} forced "
             f"greedy tokens after 8 warm-up tokens, a fresh process per measurement, "
             f"{args.reps} repetitions (configurations shuffled within each), competing load = "
             f"busy `while True: pass` processes.", "",
             "Decode tokens/s, median (min-max):", "",
             "| configuration | " + " | ".join(f"{n} busy" for n in args.loads.split(",")) + " |",
             "|---|" + "---|" * len(args.loads.split(","))]
    for kind, threads in configs:
        cells = []
        for load in [int(x) for x in args.loads.split(",")]:
            v = [r["tok_s"] for r in rows if r["config"] == kind and r["threads"] == threads
                 and r["load"] == load and "tok_s" in r]
            cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v
                         else "failed")
        name = f"{kind}, {threads} thread{'s' if threads > 1 else ''}" + (
            " max" if kind == "tasa-governor" else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sw = [(r["load"], r["switches"]) for r in rows if r["config"] == "tasa-governor"
          and r.get("switches") is not None]
    lines += ["", "Governor thread choices ((step, threads) at each switch; step 0 = the start "
              "from /proc/stat's running threads), per load: "
              + "; ".join(f"{ld} busy: {s}" for ld, s in sw[:9])]
    print(write_results("threads_contention", meta, rows, "\n".join(lines) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
