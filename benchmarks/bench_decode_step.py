"""One decode step of tasa's lean decoder with one of its switches on and off:

* ``--flag TASA_OPS`` (default): its own CPU ops (tasa_ext.ops.decode_attention_ -- rotation,
  KV-cache writes and attention in one op -- and tasa_ext.ops.rms_norm) against the aten calls
  they replace; results benchmarks/results/decode_attention_<cpu isa>.{md,json}.
* ``--flag BIND``: the projections called through TasaLinear.bound closures against module
  calls (the op-by-op path: LAYER_OP off for both); results
  benchmarks/results/decode_bind_<cpu isa>.{md,json}.
* ``--flag LAYER_OP``: every layer of a one-token step in one op (tasa_ext.ops.decode_layers_)
  against the op-by-op path; results benchmarks/results/decode_layer_op_<cpu isa>.{md,json}.
* ``--flag THREADS``: ``--threads`` threads against one (the default decoder); results
  benchmarks/results/decode_threads_<cpu isa>.{md,json}.
* ``--flag X_PIECES``: fp32 x in 2 int8 pieces against 3 in the int8 GEMVs
  (tasa_ext.ops.set_x_pieces); results benchmarks/results/decode_x_pieces_<cpu isa>.{md,json}.
* ``--batch 1,2,4,8``: several streams per step (tasa.generation.BatchDecoder: one
  decode_layers_ call and one head gemm for all streams) against one stream: ms per step,
  tokens per second over all streams, and whether each stream's greedy tokens are those of its
  own one-stream decode; results benchmarks/results/decode_batch_<cpu isa>.{md,json}.
* ``--profile``: no comparison; where the default decoder's step time goes (torch.profiler,
  self CPU time per op per step; with the layer op: every decoder layer vs the output head);
  results benchmarks/results/decode_profile_<cpu isa>.{md,json}.

    python benchmarks/bench_decode_step.py --models smollm2-135m,qwen2.5-coder-0.5b [--flag BIND]

Model: bench_generate's decode model (the TASA 3.5-bit plan of benchmarks/results/reproduction
with RTN, tasa's default embedding/head). Each configuration decodes --steps tokens after a
16-token prompt (positions 16..16+steps, fixed input token), --rounds interleaved rounds,
median step time reported with min-max; the greedy token of every step is compared between the
two.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_generate import _prompt_ids, _tasa_model  # noqa: E402
from common import RESULTS, interleaved_decode, machine  # noqa: E402

# --flag: (title, "on" column, "off" column, results stem, the other flags held meanwhile)
FLAGS = {"TASA_OPS": ("tasa's decode ops (attention, RMSNorm) vs the aten path", "tasa ops",
                      "aten", "decode_attention", {"LAYER_OP": False}),
         "BIND": ("projections through TasaLinear.bound closures vs module calls", "bound",
                  "module calls", "decode_bind", {"LAYER_OP": False}),
         "LAYER_OP": ("every layer in one op (decode_layers_) vs the op-by-op path", "layer op",
                      "op by op", "decode_layer_op", {}),
         # not a switch of the decoder: --threads threads against one (how far a second core helps)
         "THREADS": ("--threads threads vs one thread", "--threads threads", "1 thread",
                     "decode_threads", {}),
         # nor only this: fp32 x in 2 int8 pieces vs 3 in the int8 GEMVs (the gemm op's
         # tasa_ext.ops.set_x_pieces and the layer op's _LeanDecoder.X_PIECES)
         "X_PIECES": ("fp32 x in 2 int8 pieces vs 3 (the int8 GEMVs)", "2 pieces", "3 pieces",
                      "decode_x_pieces", {})}


def _switch(args, on) -> None:
    """--flag on (True), off (False) or back to its default (None)."""
    import tasa_ext
    from tasa.generation import _LeanDecoder
    if args.flag == "THREADS":
        torch.set_num_threads(1 if on is False else args.threads)
    elif args.flag == "X_PIECES":        # the gemm op's setting and the layer op's argument
        tasa_ext.ops.set_x_pieces(None if on is None else 2 if on else 3)
        _LeanDecoder.X_PIECES = 2 if on is not False else 3
    else:
        setattr(_LeanDecoder, args.flag, on is not False)


def _meta_and_header(args, argv, title: str, **extra) -> tuple:
    """The run's metadata (machine, command line, load average after) and the report's first
    lines, shared by the flag comparison and the profile."""
    meta = machine()
    meta.update({"command": "python benchmarks/bench_decode_step.py " + " ".join(
        sys.argv[1:] if argv is None else argv), **extra,
        "load_average": open("/proc/loadavg").read().split()[:3]})
    md = [f"# {title}", "",
          f"{meta['date']}, commit {meta['commit']}, {meta['device']}, torch {meta['torch']}, "
          f"{args.threads} threads, load average after {' '.join(meta['load_average'])}",
          f"command: `{meta['command']}`", ""]
    return meta, md


def profile(args, argv) -> int:
    import tasa_ext
    from bench_rot_gemm import step_profile
    torch.set_num_threads(args.threads)
    out = {}
    for name in args.models.split(","):
        model, tok, note = _tasa_model(name, None)
        with torch.inference_mode():
            out[name] = {"rows": step_profile(model, args.steps), "note": note}
        for r in out[name]["rows"]:
            print(name, json.dumps(r), flush=True)
        del model
    meta, md = _meta_and_header(args, argv, "Decode step profile: where the default decoder's time goes")
    isa = tasa_ext.ops.cpu_isa()
    md += [f"torch.profiler over {args.steps} one-token steps after a 16-token prompt (4 warm-up "
           "steps); self CPU time per step of the top ops. With the layer op, `tasa::decode_layers_` "
           "is every decoder layer and the `tasa::gemm` call the output head.", ""]
    for name, d in out.items():
        md += [f"## {name}", "", "| op | ms per step | calls per step |", "|---|---|---|"]
        for r in d["rows"]:
            calls = "" if r["calls_per_step"] is None else f"{r['calls_per_step']:g}"
            md.append(f"| {r['op']} | {r['ms_per_step']:.3f} | {calls} |")
        md += ["", f"Model: {d['note']}", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decode_profile_{isa}.md").write_text("\n".join(md) + "\n")
    (RESULTS / f"decode_profile_{isa}.json").write_text(json.dumps({"meta": meta, "models": out}, indent=1))
    print("\n".join(md))
    return 0


def _greedy(bd, first, steps: int) -> list:
    """``steps`` greedy steps of a BatchDecoder from the tokens ``first`` [streams]: each
    stream's tokens."""
    nxt, got = first, []
    for _ in range(steps):
        nxt = bd.step(nxt).argmax(-1)
        got.append(nxt.tolist())
    return [[g[b] for g in got] for b in range(bd.streams)]


def batch(args, argv) -> int:
    """--batch: the step of B streams against one, interleaved rounds per model."""
    import tasa_ext
    from tasa.generation import BatchDecoder
    sizes = [int(b) for b in args.batch.split(",")]
    if 1 not in sizes:
        sizes = [1] + sizes
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model, tok, note = _tasa_model(name, None)
        # stream b's prompt: 16 + b tokens, so the streams sit at different positions
        prompts = [_prompt_ids(tok, 16 + b, model.config.vocab_size) for b in range(max(sizes))]
        times = {B: [] for B in sizes}
        tokens = {}
        with torch.inference_mode():
            for r in range(args.rounds + 1):            # round 0: warm-up
                for B in sizes:
                    bd = BatchDecoder(model, 16 + max(sizes) + args.steps + 1, B)
                    first = torch.stack([bd.prefill(b, prompts[b]) for b in range(B)]).argmax(-1)
                    t0 = time.perf_counter()
                    tokens[B] = _greedy(bd, first, args.steps)
                    if r:
                        times[B].append((time.perf_counter() - t0) / args.steps * 1e3)
        # stream b's tokens in every batch against one-stream decodes of the same prompt
        alone = {}
        with torch.inference_mode():
            for b in range(max(sizes)):
                bd = BatchDecoder(model, 16 + max(sizes) + args.steps + 1, 1)
                alone[b] = _greedy(bd, bd.prefill(0, prompts[b]).argmax(-1).view(1), args.steps)[0]
        base = statistics.median(times[1])
        for B in sizes:
            med = statistics.median(times[B])
            same = sum(tokens[B][b] == alone[b] for b in range(B))
            row = {"model": name, "streams": B, "ms": med, "range": [min(times[B]), max(times[B])],
                   "step_vs_one": med / base, "tokens_per_s": B / med * 1e3,
                   "throughput_vs_one": B * base / med, "streams_same_tokens": same, "note": note}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "note"}), flush=True)
        del model
    meta, md = _meta_and_header(args, argv, "Batched decode: several streams per step",
                                batch=args.batch)
    isa = tasa_ext.ops.cpu_isa()
    md += [f"tasa.generation.BatchDecoder: each stream's prompt (16 + b tokens for stream b) "
           f"prefilled into its cache slot, then {args.steps} steps of all streams together (one "
           f"decode_layers_ call and one head gemm per step), greedy; {args.rounds} interleaved "
           "rounds (median, min-max). `step x one` = a step's time over one stream's; `tokens/s` "
           "over all streams; `same tokens`: streams whose greedy tokens equal their own "
           "one-stream decode's (a gemm over B rows rounds differently from the GEMV's int8 "
           "pieces, which can move a near tie).", "",
           "| model | streams | ms/step | step x one | tokens/s | throughput x one | same tokens |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['streams']} | {r['ms']:.2f} ({r['range'][0]:.2f}-"
                  f"{r['range'][1]:.2f}) | {r['step_vs_one']:.2f}x | {r['tokens_per_s']:.1f} | "
                  f"{r['throughput_vs_one']:.2f}x | {r['streams_same_tokens']}/{r['streams']} |")
    notes = {r["model"]: r["note"] for r in rows}
    md += ["", "Models: " + "; ".join(f"{k}: {v}" for k, v in notes.items())]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decode_batch_{isa}.md").write_text("\n".join(md) + "\n")
    (RESULTS / f"decode_batch_{isa}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n".join(md))
    return 0


def main(argv=None) -> int:
    import tasa_ext
    from tasa.generation import _LeanDecoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flag", choices=sorted(FLAGS), default="TASA_OPS")
    ap.add_argument("--profile", action="store_true",
                    help="profile the default decoder's step instead of comparing a flag")
    ap.add_argument("--batch", default=None,
                    help="comma-separated stream counts: several streams per step against one "
                         "(tasa.generation.BatchDecoder) instead of comparing a flag")
    args = ap.parse_args(argv)
    if args.profile:
        return profile(args, argv)
    if args.batch:
        return batch(args, argv)
    title, on_name, off_name, stem, held = FLAGS[args.flag]
    for k, v in held.items():
        setattr(_LeanDecoder, k, v)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model, tok, note = _tasa_model(name, None)
        ids = _prompt_ids(tok, 16, model.config.vocab_size)
        with torch.inference_mode():
            ms, tokens = interleaved_decode(
                model, ids, args.steps, args.rounds,
                {v: (lambda v=v: _switch(args, v)) for v in (True, False)})
        times = {k: [t / 1e3 for t in v] for k, v in ms.items()}
        _switch(args, None)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "on_ms": med[True] * 1e3, "off_ms": med[False] * 1e3,
               "on_range": [min(times[True]) * 1e3, max(times[True]) * 1e3],
               "off_range": [min(times[False]) * 1e3, max(times[False]) * 1e3],
               "speedup": med[False] / med[True],
               "same_tokens": tokens[True] == tokens[False], "note": note}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "note"}), flush=True)
        del model
    meta, md = _meta_and_header(args, argv, f"Decode step: {title}", flag=args.flag)
    isa = tasa_ext.ops.cpu_isa()
    md += [f"{args.steps} one-token steps after a 16-token prompt, {args.rounds} interleaved rounds "
           "(median, min-max); the same greedy token at every step is checked"
           + (f"; held meanwhile: {held}" if held else "") + ".", "",
           f"| model | {on_name} ms/step | {off_name} ms/step | speed-up | same tokens |",
           "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['on_ms']:.2f} ({r['on_range'][0]:.2f}-{r['on_range'][1]:.2f}) | "
                  f"{r['off_ms']:.2f} ({r['off_range'][0]:.2f}-{r['off_range'][1]:.2f}) | "
                  f"{r['speedup']:.2f}x | {r['same_tokens']} |")
    md += ["", "Models: " + "; ".join(f"{r['model']}: {r['note']}" for r in rows)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}_{isa}.md").write_text("\n".join(md) + "\n")
    (RESULTS / f"{stem}_{isa}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
