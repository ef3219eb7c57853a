"""Does the AVX2 int8-piece GEMV change what the models say? (issue 30 item 3's condition: a
cheaper low-width GEMV is kept only if the greedy tokens stay those of the exact path.)

    python benchmarks/check_gemv_i8.py --models smollm2-135m,qwen2.5-coder-0.5b,gemma3-270m
    python benchmarks/check_gemv_i8.py --compare pieces

``--compare i8`` (default): the int8 path on against off (the float GEMV); results
check_gemv_i8.{md,json}. ``--compare pieces``: the int8 path with fp32 x in 2 int8 pieces
(``tasa_ext.ops.set_x_pieces(2)``, error <= 254^-2 of each group's largest |x|) against 3
(254^-3); results check_x_pieces.{md,json}.

For each model: the TASA 3.5-bit plan of benchmarks/results/reproduction/<model> applied with
RTN (bench_generate's decode model: 3/4/8-bit groups, 8-bit embedding/head), then teacher-forced
decode steps (tasa's lean decoder, transformers' cached step for Gemma-3: every linear a
batch-1 GEMV) over --tokens tokens of
WikiText-2 test and of GSM8K train solutions, once with the int8 path on and once off (the float
GEMV). Reported: greedy (argmax) agreement of the two paths' next-token choice at every position,
the mean change of the gold-token NLL, the largest |logit| change. The AVX2 GEMV only: on an
AVX-512 machine this checks nothing (the script says so and stops).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_generate import _tasa_model  # noqa: E402
from common import RESULTS, machine  # noqa: E402


def texts(n_tokens: int, tok) -> dict:
    from tasa import corpora

    gsm = "\n\n".join(corpora.format_gsm8k(it) for it in corpora.load_gsm8k(None, "train", limit=40))
    out = {}
    for name, text in (("wikitext2", corpora.load_wikitext2(None, "test")[:40000]), ("gsm8k", gsm)):
        ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
        if ids.shape[1] < n_tokens:
            raise SystemExit(f"{name}: only {ids.shape[1]} tokens in the shipped text")
        out[name] = ids
    return out


def teacher_forced(model, ids):
    """Per-token gold NLL and logits [T-1, V] from decode steps (batch-1 GEMVs): tasa's lean
    decoder, or transformers' own step with its KV cache for architectures the lean decoder does
    not run (Gemma-3)."""
    from tasa.generation import FastPathUnavailable, _LeanDecoder

    T = ids.shape[1]
    with torch.inference_mode():
        try:
            step = _LeanDecoder(model, T)
            logits = torch.stack([step(ids[:, t:t + 1], t)[0].float() for t in range(T - 1)])
        except FastPathUnavailable:
            out, past = [], None
            for t in range(T - 1):
                r = model(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
                past = r.past_key_values
                out.append(r.logits[0, -1].float())
            logits = torch.stack(out)
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    return nll.double(), logits


def _switch_i8(on):
    import tasa_ext
    tasa_ext.ops.set_gemv_i8(on)


def _switch_pieces(on):
    import tasa_ext
    from tasa.generation import _LeanDecoder
    tasa_ext.ops.set_x_pieces(None if on is None else 2 if on else 3)     # the gemm op's
    _LeanDecoder.X_PIECES = 2 if on is not False else 3                   # the layer op's


# --compare: (results stem, title, what "on" and "off" are, switch(True / False / None))
COMPARE = {
    "i8": ("check_gemv_i8", "AVX2 int8-piece GEMV vs the float GEMV",
           "with the int8 path on and off (x enters it as 3 int8 pieces per group, fp32 "
           "activations: error <= 254^-3 of each group's largest |x|)", _switch_i8),
    "pieces": ("check_x_pieces", "fp32 x in 2 int8 pieces vs 3 in the AVX2 int8 GEMV",
               "with fp32 x in 2 int8 pieces per group (on: error <= 254^-2 of each group's "
               "largest |x|) and in 3 (off: 254^-3, the path before)", _switch_pieces),
}


def main(argv=None) -> int:
    import tasa_ext

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,gemma3-270m")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--compare", choices=sorted(COMPARE), default="i8")
    args = ap.parse_args(argv)
    stem, title, what, switch = COMPARE[args.compare]
    if tasa_ext.ops.cpu_isa() != "avx2":
        print(f"this CPU runs the {tasa_ext.ops.cpu_isa()} GEMV, not the AVX2 one: nothing to check")
        return 0
    torch.set_num_threads(2)
    # rows of models not checked now are kept from the last results file (each row says when
    # and at which commit it was measured), so one model can be (re)checked on its own
    old = RESULTS / f"{stem}.json"
    models = args.models.split(",")
    rows = [r for r in json.loads(old.read_text())["rows"] if r["model"] not in models] \
        if old.is_file() else []
    t0 = time.time()
    m = machine()
    for name in models:
        model, tok, note = _tasa_model(name, 8)
        for text, ids in texts(args.tokens, tok).items():
            res = {}
            for on in (False, True):
                switch(on)
                res[on] = teacher_forced(model, ids)
            switch(None)
            (n0, l0), (n1, l1) = res[False], res[True]
            row = {"model": name, "text": text, "positions": int(l0.shape[0]),
                   "greedy_agree": float((l0.argmax(-1) == l1.argmax(-1)).double().mean()),
                   "greedy_flips": int((l0.argmax(-1) != l1.argmax(-1)).sum()),
                   "dnll_mean": float((n1 - n0).mean()), "dnll_max_abs": float((n1 - n0).abs().max()),
                   "max_abs_logit_change": float((l1 - l0).abs().max()),
                   "logit_scale": float(l0.abs().max()), "model_note": note,
                   "date": m["date"], "commit": m["commit"]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "model_note"}), flush=True)
        del model
        _write(args, rows, t0, argv, stem, title, what)     # after each model: nothing lost
    return 0


def _write(args, rows, t0, argv, stem, title, what) -> None:
    meta = machine()
    meta.update({"command": "python benchmarks/check_gemv_i8.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "seconds": round(time.time() - t0, 1)})
    md = [f"# {title}: what the models say", "",
          f"{meta['date']}, commit {meta['commit']}, {meta['device']}, torch {meta['torch']}",
          f"command: `{meta['command']}` ({meta['seconds']} s)", "",
          "Teacher-forced decode steps (every linear a batch-1 GEMV) over the same tokens " + what
          + "; TASA 3.5-bit plans with RTN, 8-bit embedding/head (bench_generate's decode model).",
          "",
          "| model | text | positions | greedy agreement | flips | mean dNLL (nats) | max abs dNLL | max abs logit change (of max abs logit) |",
          "|---|---|---|---|---|---|---|---|"]
    now = args.models.split(",")
    earlier = sorted({(r["model"], r.get("date"), r.get("commit")) for r in rows
                      if r["model"] not in now})
    if earlier:                  # before the table's two header lines
        md[-2:-2] = ["Rows kept from earlier runs of the same check: " + "; ".join(
            f"{m_} ({d or 'date not recorded'}, commit {c or '?'})" for m_, d, c in earlier)
            + ".", ""]
    for r in rows:
        md.append(f"| {r['model']} | {r['text']} | {r['positions']} | {r['greedy_agree']:.4f} | "
                  f"{r['greedy_flips']} | {r['dnll_mean']:+.2e} | {r['dnll_max_abs']:.2e} | "
                  f"{r['max_abs_logit_change']:.2e} ({r['logit_scale']:.1f}) |")
    md += ["", "Models: " + "; ".join(sorted({f"{r['model']}: {r['model_note']}" for r in rows}))]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    raise SystemExit(main())
