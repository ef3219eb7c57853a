"""End-to-end generation on the CPU: decode and prefill tokens/s and peak memory of a tasa model
against transformers (fp32, bf16) and llama.cpp, side by side in one run.

    python benchmarks/bench_generate.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--reps 5]

Per model, each configuration runs in its own process (so peak RSS is that configuration's),
batch 1, ``--threads`` threads (default 2):

* ``hf-fp32`` / ``hf-bf16``: transformers ``generate`` (greedy) on the model (the dequantized
  GGUF checkpoint the registry ships), in fp32 / bf16.
* ``tasa-eager``: the model's 3.5-bit TASA plan (``pipeline.allocate`` on the committed
  measurement in benchmarks/results/reproduction/<model>/), transformers ``generate``.
* ``tasa-fast``: the same plan with tasa's defaults for the token embedding and output
  projection (one 8-bit packed table when tied, ``--embed-bits 8``), tasa's decode loop
  (``tasa.generation``). ``tasa-fast-head32``: the loop with the embedding and head as stored
  (``--embed-bits 0``: separates the two levers).
* ``tasa-saved``: what a user meets: the ``tasa-fast`` model saved as a tasa folder (by a
  separate preparation process), then a fresh process that only loads that folder
  (``tasa.load``) and generates: its peak RSS is loading + generating, and the table gives the
  folder's file size (every byte) beside the GGUF's.
* ``llama.cpp``: llama-cpp-python on the model's original GGUF, in a process that imports
  neither torch nor transformers (the prompt is the same text, tokenized by llama.cpp), so its
  peak RSS is llama.cpp's own. Found installed, or skipped with the command that installs it.
  Built with default flags (GGML_NATIVE) it segfaults in decode on the Intel Xeon with AMX
  measured here; this build works there (~5 minutes on 2 idle cores)::

      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON" \
        pip install llama-cpp-python==0.3.36

  On a CPU without AVX-512 (the AVX2-only EPYC) that build dies with SIGILL: leave the
  -DGGML_AVX512* flags out there. ``python -c "from tasa.gguf_export import INSTALL;
  print(INSTALL)"`` prints the command for the CPU at hand.

  A configuration whose process dies says how (the signal, or the last line of its error).
* ``tasa-saved-bf16``: the saved folder loaded, then ``model.to(torch.bfloat16)`` (the packed
  codes and fp16 scales stay as stored; activations, norms, attention and the prefill's dense
  matmuls run in bf16: oneDNN's AMX kernels where the CPU has them), the like of ``hf-bf16``.
  A ``-fused`` suffix on either tasa-saved configuration turns the dense prefill path off
  (every M through the fused dequant-GEMM, as before it existed).

Speed depends on the widths, not on how the codes were chosen, so the tasa rows quantize with
RTN under the TASA plan (the GPTQ codes of ``tasa quantize`` give the same kernel work).
Decode: ``--new`` tokens (default 128) after a 16-token prompt, forced (no early stop); prefill:
one forward pass over a ``--prompt-len``-token prompt (default 512) up to the first token's
logits. Medians with min-max over ``--reps`` repetitions (after one warm-up). Results:
benchmarks/results/generate_cpu.{md,json} with machine, date, commit, command, load average,
and torch.profiler tables of one decode step of tasa-eager and tasa-fast.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONFIGS = ("hf-fp32", "hf-bf16", "tasa-eager", "tasa-fast-head32", "tasa-fast", "tasa-saved",
           "tasa-saved-bf16", "llama.cpp")
# also accepted (not in the default list): "-fused" after a tasa-saved configuration turns the
# CPU gemm's dense prefill path off (tasa_ext.ops.set_dense_rows(0)), "-float" in one turns the
# AVX2 GEMV's int8-piece path off (tasa_ext.ops.set_gemv_i8(False)), for side-by-side ratios
MEASURED = HERE / "results" / "reproduction"
# (this process may import no tasa: the build command for this CPU is printed by tasa's own)
INSTALL_LLAMA = ('the build command for this CPU: python -c "from tasa.gguf_export import '
                 'INSTALL; print(INSTALL)"')
WIKI_SLICE = HERE.parent / "python" / "tasa" / "data" / "wikitext2_test_slice.txt"


def _prompt_ids(tok, n: int, vocab: int):
    """``n`` token ids of real text (the shipped WikiText-2 slice), ids < vocab."""
    from tasa import corpora

    ids = tok(corpora.load_wikitext2(None, "test")[:20000], return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n and int(ids.max()) < vocab
    return ids


def _tasa_model(name: str, embed_bits: int):
    import tasa
    from tasa import pipeline
    from tasa.measurement import Measurement
    from tasa.models import load_model
    from tasa.pipeline.stages import as_layer_specs

    model, tok, _ = load_model(name)
    m = Measurement.load(MEASURED / name)
    A = pipeline.allocate(m, 3.5)
    plan = as_layer_specs(A["plan"])
    tasa.quantize(model, tok, plan=plan, method="rtn", embed_bits=embed_bits, progress=False)
    note = (f"TASA 3.5 plan of {MEASURED.relative_to(HERE.parent) / name / 'measurement.json'}: "
            f"{A['summary']['avg_bits']:.4f} average bits (exact cost), widths "
            + ", ".join(f"{b}-bit {100 * f:.1f}%" for b, f in A["summary"]["width_fraction"].items()))
    return model, tok, note


def _profile_step(model, tok, fast: bool) -> str:
    """torch.profiler table of one decode step (after a 16-token prefill)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tasa.generation import _LeanDecoder

    ids = _prompt_ids(tok, 16, model.config.vocab_size)
    with torch.inference_mode():
        if fast:              # the step tasa.generation runs (its lean decoder)
            step = _LeanDecoder(model, 64)
            nxt = step(ids, 0).argmax(-1)[:, None]
            step(nxt, 16)                                                          # warm
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(nxt, 17)
        else:
            model.generate(ids, max_new_tokens=2, do_sample=False)
            n = 8
            with profile(activities=[ProfilerActivity.CPU]) as p1:
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               attention_mask=torch.ones_like(ids))
            prof = p1
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    if not fast:
        table = "(8 generated tokens: divide the times by 8 for one step)\n" + table
    return table


def prepare_saved(name: str, folder: str) -> dict:
    """The tasa-fast model written as a tasa folder (what ``tasa quantize`` leaves a user)."""
    import tasa  # noqa: F401
    from tasa.storage import model_size, save_quantized

    model, tok, note = _tasa_model(name, None)          # tasa's defaults (embedding_widths)
    save_quantized(model, folder, {}, tokenizer=tok)    # the plan: every packed module it has
    return {"note": note, "size": model_size(folder)}


def run_one(model_name: str, config: str, reps: int, new: int, prompt_len: int,
            threads: int, profile_step: bool, path: str = "") -> dict:
    res = {"model": model_name, "config": config}
    if config == "llama.cpp":
        # no torch / transformers / tasa import here: the RSS is llama.cpp's own
        try:
            import llama_cpp
        except ImportError:
            return {**res, "skipped": f"llama-cpp-python not installed ({INSTALL_LLAMA})"}
        gguf = Path(path)
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=prompt_len + 32, n_batch=prompt_len,
                              n_threads=threads, n_threads_batch=threads, verbose=False)
        res["note"] = f"llama-cpp-python {llama_cpp.__version__}, {gguf.name}"
        res["file_bytes"] = gguf.stat().st_size
        text = WIKI_SLICE.read_text(encoding="utf-8")[:20000].encode()
        toks = llm.tokenize(text, add_bos=False)
        short, long = toks[:16], toks[:prompt_len]
        assert len(long) == prompt_len

        def decode():
            llm.reset()
            llm.eval(short)
            t0 = time.perf_counter()
            for _ in range(new):
                nxt = int(llm.scores[llm.n_tokens - 1].argmax())
                llm.eval([nxt])
            return time.perf_counter() - t0

        def prefill():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(long)
            return time.perf_counter() - t0
    else:
        import torch

        torch.set_num_threads(threads)
        from tasa.generation import generate
        from tasa.models import load_model

        if config.startswith("tasa-saved"):
            import tasa
            import tasa_ext
            from transformers import AutoTokenizer

            if config.endswith("-fused"):
                tasa_ext.ops.set_dense_rows(0)
            if "-float" in config:
                tasa_ext.ops.set_gemv_i8(False)
            t0 = time.perf_counter()
            model = tasa.load(path)
            if "-bf16" in config:
                model = model.to(torch.bfloat16)
            tok = AutoTokenizer.from_pretrained(path)
            res["load_s"] = time.perf_counter() - t0
            res["load_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            from tasa.storage import model_size

            size = model_size(path)
            res["file_bytes"], res["bits_per_param"] = size["file_bytes"], size["bits_per_param"]
            res["note"] = (f"tasa folder {size['file_bytes'] / 1e6:.1f} MB, "
                           f"{size['bits_per_param']:.2f} bits/param; loaded in "
                           f"{res['load_s']:.1f} s")
        elif config.startswith("tasa"):
            model, tok, note = _tasa_model(model_name, None if config == "tasa-fast" else 0)
            res["note"] = note + ("; embedding + head at tasa's defaults" if config == "tasa-fast"
                                  else "; embedding + head as stored (fp32)")
        else:
            model, tok, _ = load_model(model_name)
            if config == "hf-bf16":
                model = model.to(torch.bfloat16)
        fast = config in ("tasa-fast", "tasa-fast-head32") or config.startswith("tasa-saved")
        short = _prompt_ids(tok, 16, model.config.vocab_size)
        long = _prompt_ids(tok, prompt_len, model.config.vocab_size)

        def decode():
            r = generate(model, tok, short, new, min_new_tokens=new, fast=fast)
            assert len(r.tokens) == new
            return r.decode_s * new / (new - 1)       # per-token time of the new - 1 steps

        def prefill():
            with torch.inference_mode():
                t0 = time.perf_counter()
                model(input_ids=long, use_cache=True, logits_to_keep=1)
                return time.perf_counter() - t0

        if profile_step and config in ("tasa-eager", "tasa-fast"):
            from tasa.generation import FastPathUnavailable
            try:
                res["profile"] = _profile_step(model, tok, fast)
            except FastPathUnavailable as e:          # Gemma: no lean step to profile
                res["profile"] = f"(no lean decode step: {e})"
    decode()                                          # warm-up
    prefill()
    res["decode_tok_s"] = [new / decode() for _ in range(reps)]
    res["prefill_tok_s"] = [prompt_len / prefill() for _ in range(reps)]
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def _fmt(xs) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "generate_cpu"))
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    ap.add_argument("--path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps < 5 and not args.one:
        print("note: fewer than 5 repetitions: not a reportable run", file=sys.stderr)
    if args.prepare:
        print(json.dumps(prepare_saved(*args.prepare)))
        return 0
    if args.one:
        print(json.dumps(run_one(*args.one, args.reps, args.new, args.prompt_len, args.threads,
                                 args.profile, args.path)))
        return 0
    from common import machine

    meta = machine()
    meta["load_average_before"] = os.getloadavg()
    meta["settings"] = {"reps": args.reps, "new_tokens": args.new, "prompt_len": args.prompt_len,
                        "threads": args.threads, "batch": 1}
    rows = []
    saved_root = Path(tempfile.mkdtemp(prefix="tasa-bench-"))
    configs = [c for c in args.configs.split(",") if c]
    for model in [m for m in args.models.split(",") if m]:
        path = {}
        if any(c.startswith("tasa-saved") for c in configs):
            folder = saved_root / model
            p = subprocess.run([sys.executable, __file__, "--prepare", model, str(folder)],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"preparing the tasa folder of {model} failed: {p.stderr[-800:]}")
            path.update({c: str(folder) for c in configs if c.startswith("tasa-saved")})
        if "llama.cpp" in configs:
            from tasa.models import resolve_gguf
            path["llama.cpp"] = str(resolve_gguf(model))
        for config in configs:
            cmd = [sys.executable, __file__, "--one", model, config, "--reps", str(args.reps),
                   "--new", str(args.new), "--prompt-len", str(args.prompt_len),
                   "--threads", str(args.threads), "--profile", "--path", path.get(config, "")]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            if p.returncode != 0:
                why = (f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0
                       else f"exit {p.returncode}: "
                       + " | ".join(p.stderr.strip().splitlines()[-1:]) or "(no message)")
                rows.append({"model": model, "config": config, "error": why})
                print(f"[{model}] {config}: FAILED ({why})", flush=True)
                continue
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            if "skipped" in row:
                print(f"[{model}] {config}: skipped ({row['skipped']})", flush=True)
            else:
                print(f"[{model}] {config}: decode {_fmt(row['decode_tok_s'])} tok/s, prefill "
                      f"{_fmt(row['prefill_tok_s'])} tok/s, peak RSS {row['peak_rss_mb']:.0f} MB",
                      flush=True)
    meta["load_average_after"] = os.getloadavg()
    md = ["# Generation on the CPU: tasa vs transformers vs llama.cpp\n",
          f"- date {meta['date']}, commit {meta['commit']}; device: {meta['device']}; torch "
          f"{meta['torch']}; {args.threads} threads, batch 1",
          f"- command: `{meta['command']}`",
          f"- load average before {tuple(round(x, 2) for x in meta['load_average_before'])}, "
          f"after {tuple(round(x, 2) for x in meta['load_average_after'])}",
          f"- decode: {args.new} new tokens after a 16-token prompt; prefill: one forward pass "
          f"over {args.prompt_len} tokens; median (min-max) of {args.reps} repetitions after a "
          f"warm-up, each configuration in its own process (peak RSS is its own)\n"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == model]
        md.append(f"## {model}\n")
        md.append("| configuration | decode tokens/s | prefill tokens/s | peak RSS MB | model file "
                  "MB | note |")
        md.append("|---|---|---|---|---|---|")
        base = {r["config"]: r for r in mr if "decode_tok_s" in r}
        for r in mr:
            if "decode_tok_s" not in r:
                md.append(f"| {r['config']} | - | - | - | - | {r.get('skipped') or r.get('error')} |")
                continue
            fb = f"{r['file_bytes'] / 1e6:.1f}" if r.get("file_bytes") else ""
            md.append(f"| {r['config']} | {_fmt(r['decode_tok_s'])} | {_fmt(r['prefill_tok_s'])} | "
                      f"{r['peak_rss_mb']:.0f} | {fb} | {r.get('note', '')} |")
        if "tasa-saved" in base and "llama.cpp" in base:
            a, b = base["tasa-saved"], base["llama.cpp"]
            md.append(f"\nUser-facing (tasa-saved vs llama.cpp, each a fresh process that loads its "
                      f"file): file {a['file_bytes'] / b['file_bytes']:.2f}x, peak RSS "
                      f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, decode "
                      f"{statistics.median(a['decode_tok_s']) / statistics.median(b['decode_tok_s']):.2f}x.")
        if "llama.cpp" in base:
            ref = statistics.median(base["llama.cpp"]["decode_tok_s"])
            md.append("\nDecode relative to llama.cpp (medians): " + ", ".join(
                f"{c} {statistics.median(r['decode_tok_s']) / ref:.2f}x" for c, r in base.items()))
        for hf in ("hf-fp32", "hf-bf16"):
            if hf in base:
                ref = statistics.median(base[hf]["prefill_tok_s"])
                md.append(f"\nPrefill relative to transformers {hf[3:]} (medians): " + ", ".join(
                    f"{c} {statistics.median(r['prefill_tok_s']) / ref:.2f}x"
                    for c, r in base.items()))
        for r in mr:
            if r.get("profile"):
                md.append(f"\n### Profile of one decode step: {model}, {r['config']}\n")
                md.append("```\n" + r["profile"] + "\n```")
        md.append("")
    shutil.rmtree(saved_root, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
