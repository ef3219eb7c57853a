"""Past one machine: peak host memory and time per decoder block of the measurement's
calibration pass and of GPTQ, loading one block at a time (tasa.lazy), 1 process x 2 threads
against 2 processes x 1 thread (torch.distributed, gloo), and the projection to LLaMA-3-8B
(32 blocks) and a 70B (80 blocks).

    python benchmarks/bench_scale.py            # LLaMA-3-8B shapes, 2 decoder blocks
    python benchmarks/bench_scale.py --quick    # tiny shapes: checks the script in seconds

The model: a LLaMA-3-8B-shaped config (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab
128256) with 2 decoder blocks and random bf16 weights, saved as safetensors. Each run is a fresh
process (or 2, under torch.distributed.run) so its peak RSS (ru_maxrss) is its own; "above base"
subtracts the resident set after the imports and the meta skeleton (code, not data).

Measured per block (median over the blocks):
* ``hessians3``: the mixture stage's calibration pass: the block read from safetensors, the
  forward of the calibration tokens with 3-source Hessian hooks (no eigendecompositions: those
  are timed apart, ``eigh``, and projected with K^3), on 1 process: on 2 processes its float64
  sums (3 sources x (3 h^2 + i^2) x 8 bytes = 6.2 GB per rank at 8B) do not fit twice in this
  machine's 24 GB beside the other engineer's jobs;
* ``hessians1``: the same with one source (what GPTQ accumulates), 1 and 2 processes, the
  float64 sums all-reduced;
* ``gptq``: lazy GPTQ: read, forward + Hessians, GPTQ of the 7 linears (split by N K^2 among
  the ranks, packed weights broadcast), outputs recomputed, the quantized shard written;
* ``probe``: one block's share of a sensitivity probe: RTN of its 7 linears + one forward of
  the objective tokens through it (a probe of block l recomputes blocks l..L-1).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, n_layers_full=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, n_layers_full=80),
    "quick": dict(hidden_size=256, intermediate_size=896, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, n_layers_full=32),
}


def block_params(s) -> int:
    h, i = s["hidden_size"], s["intermediate_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def gptq_cost(s) -> float:
    """sum over the block's linears of N K^2 (GPTQ's Cholesky-inverse + column updates)."""
    h, i = s["hidden_size"], s["intermediate_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    return h * h * h + 2 * kv * h * h + h * h * h + 2 * i * h * h + h * i * i


def make_model(path: Path, shape: str, blocks: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                      num_attention_heads=s["num_attention_heads"],
                      num_key_value_heads=s["num_key_value_heads"], vocab_size=s["vocab_size"],
                      num_hidden_layers=blocks, max_position_embeddings=8192,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path)
    del m


# ---- the worker (one process, or one rank) -------------------------------------------------------

def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    from tasa import calib, distributed
    from tasa.lazy import Checkpoint, materialize, quantize_lazy, release, skeleton
    from tasa.quant import LayerSpec, default_targets, quantize_rtn

    distributed.init_from_env()
    d = distributed.current()
    sk = skeleton(args.model)
    base_rss = rss_now()
    cfg = sk.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.n_calib, args.seqlen), generator=gen)
    res = {"rank": d.rank, "world": d.world, "threads": args.threads,
           "what": args.what + (f"{args.sources}" if args.what == "hessians" else ""),
           "base_rss": base_rss}
    if args.what == "gptq":
        plan = {n: LayerSpec([4] * (m.in_features // 128), 128, "asym")
                for n, m in default_targets(sk).items()}
        r = quantize_lazy(args.model, plan, args.out, calib_ids=ids, batch_size=args.batch,
                          progress=False, dist=d)
        res["block_seconds"] = r["block_seconds"]
    else:        # the mixture's calibration pass (3 sources) + a probe's per-block share
        model = skeleton(args.model)
        ckpt = Checkpoint(args.model)
        layers, prefix = calib.decoder_layers(model)
        base = model.model
        materialize(base, ckpt, "model", torch.float32, skip=["layers"])
        times, probe = [], []
        t = {}

        def on_enter(li):
            if li == 0:            # block 0's input is captured: the embedding is done with
                release(base.embed_tokens)
            t["t"] = time.perf_counter()
            materialize(layers[li], ckpt, f"{prefix}.{li}", torch.float32)

        def on_block(li, block, p, hessians):
            # a probe's share: RTN of the block's linears + one forward of the objective tokens
            t0 = time.perf_counter()
            lins = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
            saved = [m.weight.data for m in lins]
            for m in lins:
                spec = LayerSpec([3] * (m.in_features // 128), 128, "asym")
                m.weight.data = quantize_rtn(m.weight, spec).dequantize()
            h = torch.randn(args.obj_seqs, args.seqlen, cfg.hidden_size, generator=gen)
            pos = torch.arange(args.seqlen)[None]
            emb = base.rotary_emb(h, pos)
            with torch.no_grad():
                block(h, position_embeddings=emb, attention_mask=None)
            for m, w in zip(lins, saved):
                m.weight.data = w
            probe.append(time.perf_counter() - t0)
            return False

        def on_leave(li, block):
            release(block)
            times.append(time.perf_counter() - t["t"] - probe[-1])

        kw = {}
        ids_r, src_r = ids, torch.arange(args.n_calib) % args.sources
        if d.active:
            ids_r, src_r = d.shard(ids, src_r, args.batch)
            kw["reduce"] = d.reduce_hessians
        calib.run_blockwise(model, ids_r, on_block, src=src_r, n_sources=args.sources,
                            batch_size=args.batch,
                            progress=False, on_enter=on_enter, on_leave=on_leave, **kw)
        res["block_seconds"] = times
        res["probe_seconds"] = probe
        if args.eigh and d.rank == 0:
            res["eigh"] = {}
            for K in args.eigh:
                A = torch.randn(K, K, dtype=torch.float64, generator=gen)
                A = A @ A.T
                t0 = time.perf_counter()
                torch.linalg.eigh(A)
                res["eigh"][K] = time.perf_counter() - t0
    res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["balance"] = dict(d.balance)
    Path(args.result_dir, f"{res['what']}_w{d.world}_r{d.rank}.json").write_text(json.dumps(res))


# ---- the driver --------------------------------------------------------------------------------

def run(args, model_dir: Path, what: str, world: int, threads: int, tmp: Path, eigh=(),
        sources: int = 1) -> list:
    rdir = tmp / f"res_{what}{sources}_{world}"
    rdir.mkdir()
    cmd = [str(HERE / "bench_scale.py"), "--worker", what, "--model", str(model_dir),
           "--out", str(tmp / f"out_{what}_{world}"), "--threads", str(threads),
           "--result-dir", str(rdir), "--n-calib", str(args.n_calib), "--seqlen",
           str(args.seqlen), "--batch", str(args.batch), "--obj-seqs", str(args.obj_seqs),
           "--sources", str(sources)]
    if eigh:
        cmd += ["--eigh", *map(str, eigh)]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-port", str(29500 + os.getpid() % 1000)] + cmd
    else:
        cmd = [sys.executable] + cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    out = [json.loads(p.read_text()) for p in sorted(rdir.glob("*.json"))]
    for o in out:
        o["wall_s"] = wall
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shapes (checks the script)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--n-calib", type=int, default=8, help="calibration sequences")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="sequences per block forward")
    ap.add_argument("--obj-seqs", type=int, default=4, help="objective sequences per probe")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--eigh", type=int, nargs="*", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sources", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.what = args.worker
        return worker(args)
    from common import machine, write_results

    shape = "quick" if args.quick else "8b"
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scale-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_model(tmp / "model", shape, args.blocks)
        print(f"model written in {time.perf_counter() - t0:.0f} s", flush=True)
        eigh = (256, 896) if args.quick else (1024, 2048, 4096)
        # the mixture's pass (3 sources: float64 sums of 3 K x K per input and rank) on one
        # process; the one-source pass (what GPTQ accumulates) and GPTQ on 1 and on 2 processes
        for what, sources, worlds in (("hessians", 3, ((1, 2),)),
                                      ("hessians", 1, ((1, 2), (2, 1))),
                                      ("gptq", 1, ((1, 2), (2, 1)))):
            for world, threads in worlds:
                rs = run(args, tmp / "model", what, world, threads, tmp, sources=sources,
                         eigh=eigh if (what == "hessians" and sources == 3) else ())
                rows.extend(rs)
                print(what, world, threads, [(r["rank"], [round(x, 1) for x in r["block_seconds"]],
                                               round(r["peak_rss"] / 2**30, 2)) for r in rs],
                      flush=True)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    meta = machine() | {"shape": shape, "blocks": args.blocks, "n_calib": args.n_calib,
                        "seqlen": args.seqlen, "batch": args.batch, "obj_seqs": args.obj_seqs,
                        "uptime_before": uptime, "uptime_after": uptime_after}
    md = report(meta, rows, shape, args)
    path = write_results("scale" if not args.quick else "scale_quick", meta, rows, md)
    print(md)
    print(f"written {path}")


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def report(meta, rows, shape, args) -> str:
    s = SHAPES[shape]
    blk = block_params(s) * 4          # fp32 bytes of one block in memory
    GiB = 2 ** 30
    L = [
        f"# Scale: block-by-block loading and torch.distributed ({'LLaMA-3-8B' if shape == '8b' else 'tiny'} shapes)",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['device']}, torch {meta['torch']}.",
        f"Command: `{meta['command']}`.",
        f"Load before: `{meta['uptime_before']}`; after: `{meta['uptime_after']}`"
        # (only the load before counts: the one after includes this run's own processes)
        + (" -- **other jobs shared the 2 cores (load > 0.5 before the run): times are upper "
           "bounds**" if _load(meta['uptime_before']) > 0.5
           else " -- idle before the run (the load after is this run's own processes)"),
        "",
        f"Model: {args.blocks} decoder blocks of hidden {s['hidden_size']}, MLP "
        f"{s['intermediate_size']}, {s['num_attention_heads']}/{s['num_key_value_heads']} heads, "
        f"vocab {s['vocab_size']}, random bf16 weights in safetensors; computed in fp32 (one "
        f"block = {blk / GiB:.2f} GiB). Calibration: {args.n_calib} x {args.seqlen} tokens, "
        f"{args.batch} sequences per forward; probe objective {args.obj_seqs} x {args.seqlen}.",
        "",
        "| step | processes x threads | rank | s / block (median) | peak RSS GiB | above base GiB | "
        "/ one fp32 block | slowest/mean work |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        above = r["peak_rss"] - r["base_rss"]
        bal = r["balance"].get("gptq" if r["what"] == "gptq" else "calibration", 1.0)
        L.append(f"| {r['what']} | {r['world']} x {r['threads']} | {r['rank']} | "
                 f"{_med(r['block_seconds']):.1f} | {r['peak_rss'] / GiB:.2f} | "
                 f"{above / GiB:.2f} | {above / blk:.2f} | {bal:.2f} |")
    probes = [x for r in rows if r["what"] == "hessians3" and r["world"] == 1
              for x in r.get("probe_seconds", [])]
    eig = next((r["eigh"] for r in rows if r.get("eigh")), {})
    L += ["", f"Probe share per block (RTN of 7 linears + one block forward of the objective, "
              f"1 x 2 threads): {_med(probes):.1f} s.",
          "eigh (float64, 1 x 2 threads): " + ", ".join(f"K={k}: {v:.1f} s" for k, v in eig.items()),
          ""]
    # projection
    def med_of(what, world):
        xs = [_med(r["block_seconds"]) for r in rows if r["what"] == what and r["world"] == world]
        return max(xs) if xs else float("nan")
    t_h1, t_h2 = med_of("hessians1", 1), med_of("hessians1", 2)
    t_m1 = med_of("hessians3", 1)
    t_g1, t_g2 = med_of("gptq", 1), med_of("gptq", 2)
    t_p = _med(probes)
    peak_g = max((r["peak_rss"] - r["base_rss"]) for r in rows if r["what"] == "gptq" and r["world"] == 1)
    factor = peak_g / blk
    # eigh: fit c K^3 on the largest K measured
    kmax = max(eig, key=int) if eig else None
    c_eig = eig[kmax] / int(kmax) ** 3 if eig else float("nan")
    L += ["## Projection", "",
          "Per block, with `P` = block parameters, `h` hidden, `i` MLP width, `n T` calibration "
          "tokens, `L` blocks (1 fp32 = 4 bytes):",
          "",
          "* host memory per process ~ `f * 4 P` (+ the calibration activations `2 n T h 4` bytes "
          "and the skeleton/code); `f` measured above for GPTQ on 1 process "
          f"= **{factor:.2f}** (the block, its Hessians `4 (3 h^2 + i^2)` bytes, GPTQ's K x K "
          "temporaries of down_proj `~4 i^2 * 4` bytes, the quantized copy);",
          "* time per block: forward ~ `2 P n T` flop, GPTQ ~ `sum N K^2` over the 7 linears "
          "(Cholesky inverse + column updates), mixture eigendecompositions `c K^3` for K = h "
          "(3 unique inputs) and K = i; probes: block l is recomputed by the l+1 probes of blocks "
          "0..l, so the sensitivity costs `L (L+1) / 2` block forwards of the objective;",
          "* model time = `L x` time per block (+ the probes' `L (L+1)/2` term); with `W` "
          "processes the forward and GPTQ parts divide by ~`W` (the work split below), the "
          "eigendecompositions are repeated on every rank (not split).",
          "",
          "| model | L | fp32 block GiB | activations GiB | host / process GiB (f x block) | "
          "mixture pass s/block | GPTQ s/block (1x2 / 2x1) | eigh s/block | probes s (all) | "
          "GPTQ model h (1x2 / 2x1) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("8b", "70b") if shape == "8b" else ("quick",):
        t = SHAPES[name]
        Lf = t["n_layers_full"]
        P = block_params(t)
        r_fwd = P / block_params(s)
        r_gptq = gptq_cost(t) / gptq_cost(s)
        act = 2 * args.n_calib * args.seqlen * t["hidden_size"] * 4
        eig_blk = c_eig * (3 * t["hidden_size"] ** 3 + t["intermediate_size"] ** 3)
        # split the measured GPTQ block time into its forward part (~ the Hessian pass) and the
        # rest (GPTQ proper), scaled apart
        g_rest1 = max(t_g1 - 2 * t_h1, 0)
        g_rest2 = max(t_g2 - 2 * t_h2, 0)
        g1 = 2 * t_h1 * r_fwd + g_rest1 * r_gptq
        g2 = 2 * t_h2 * r_fwd + g_rest2 * r_gptq
        probes_all = t_p * r_fwd * Lf * (Lf + 1) / 2
        L.append(f"| {name} | {Lf} | {4 * P / GiB:.2f} | {act / GiB:.2f} | "
                 f"{factor * 4 * P / GiB + act / GiB:.1f} | {t_m1 * r_fwd:.0f} | "
                 f"{g1:.0f} / {g2:.0f} | {eig_blk:.0f} | {probes_all:.0f} | "
                 f"{Lf * g1 / 3600:.1f} / {Lf * g2 / 3600:.1f} |")
    L += ["", "Scaling used: forward parts by the block's parameter count, GPTQ proper by "
              "`sum N K^2`, eigh by `K^3` from the largest K measured; the GPTQ block time is "
              "split as 2 Hessian-pass times (capture + recompute) + GPTQ proper.",
          "Not measured here: the mixture's eigendecompositions at K = 14336 (projected), "
          "the lm_head part of a probe, a whole 8B/70B model (2 blocks only)."]
    return "\n".join(L) + "\n"


def _load(uptime: str) -> float:
    try:
        return float(uptime.split("load average:")[1].split(",")[0])
    except (IndexError, ValueError):
        return float("nan")


if __name__ == "__main__":
    main()
