"""The ``tasa`` command line.

    tasa quantize --model M --bits B --out DIR   the TASA pipeline: mixture search, multi-objective
                                   sensitivity, knapsack + group allocation, GPTQ, save, report
    tasa allocate --measurement F --bits B --out plan.json   re-allocate from a measurement
                                   (seconds, no model or data needed)
    tasa eval ...                  lm-eval evaluation of a model or a saved quantized model
    tasa generate --model M --prompt TEXT   chat / completion, streamed (tasa's decode loop)
    tasa serve --model DIR         an OpenAI-compatible HTTP server (chat, completions, streaming)
    tasa lm-eval-tasks             the folder of tasa's offline tasks for lm-eval's --include_path
    tasa convert OLD NEW           rewrite an older tasa folder as a transformers folder
    tasa info                      build and machine information
    tasa demo [--n N --k K ...]    pack a random mixed-bit matrix, check the fused kernel against
                                   the pure-torch reference, and time it against dense torch
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

import tasa_ext
from tasa_ext import reference
from tasa_ext.machine import timeit
from tasa_ext.testing import random_packed

from . import defaults, generation, pipeline
from . import evaluation as tev
from .distributed import RankFailed
from .storage import convert_legacy, load_quantized
from .measurement import Measurement
from .models import REGISTRY, load_model
from .layers import quantized_modules
from .quant import METHODS, method_names
from .util import FolderLockedError, write_json_atomic


def cmd_info(args) -> int:
    print(json.dumps(tasa_ext.build_info(), indent=1))
    return 0


def cmd_demo(args) -> int:
    pattern = {"3": [3], "3.5": [3, 4], "4": [4], "8": [8]}[args.bits]
    N, K, G = args.n, args.k, args.group_size
    if K % G:
        print(f"error: --k {K} is not divisible by --group-size {G}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    p = random_packed(N, K, G, pattern, seed=0, scale_range=(1e-3, 0.021))
    bits = p["bits"]
    args_ = (p["qweight"], p["scales"], None, p["gtable"], None, G)
    x = torch.randn(args.batch, K)
    y = tasa_ext.gemm(x, *args_)
    W = reference.dequant(*args_)
    y_ref = x @ W.T
    rel = float((y - y_ref).norm() / y_ref.norm())
    t_q = timeit(lambda: tasa_ext.gemm(x, *args_))
    t_d = timeit(lambda: torch.nn.functional.linear(x, W))
    avg = tasa_ext.average_bits(N, K, G, bits, "sym")
    print(f"tasa demo: W [{N} x {K}], group {G}, bits {args.bits} -> {avg:.3f} average bits "
          f"(exact storage cost), batch {args.batch}")
    print(f"  fused kernel vs dequantized fp32 matmul: relative error {rel:.2e}")
    print(f"  tasa {t_q * 1e6:8.1f} us   torch fp32 dense {t_d * 1e6:8.1f} us   "
          f"speedup {t_d / t_q:.2f}x   ({tasa_ext.build_info()['cpu_isa']} path)")
    return 0 if rel < 1e-4 else 1


def _parse_fewshot(s: Optional[str]):
    if s is None:
        return None
    if "=" not in s:
        return int(s)
    out = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = int(v)
    return out


def _stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _fit_history(tok, messages: list, max_new: int, ctx) -> list:
    """Drops the oldest user/assistant turns (the system message stays) until the chat fits the
    context with room for ``max_new`` tokens; refuses when the last message alone does not."""
    msgs = list(messages)
    while True:
        n = generation.chat_ids(tok, msgs).shape[1]
        if not isinstance(ctx, int) or n + max_new <= ctx:
            return msgs
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            return msgs      # generation.generate refuses it with the numbers
        del msgs[first:first + 2]


_DTYPE_HELP = ("activation dtype: float32 (default) or bfloat16 (a bf16 model's arithmetic: "
               "prompts ~3-4x faster on CPUs with AMX or AVX-512 BF16, "
               "benchmarks/results/prefill_cpu.md; the packed weights stay as stored)")


def _to_dtype(model, name: str):
    """The model in activation dtype ``name`` (packed tasa layers keep their codes and fp16
    scales: TasaLinear._apply)."""
    return model if name == "float32" else model.to(getattr(torch, name))


def cmd_generate(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompt is None and not args.interactive:
        print("error: give --prompt TEXT, or --interactive for a conversation", file=sys.stderr)
        return 2
    try:
        sampling = generation.Sampling(args.temperature, args.top_p, args.top_k, args.seed)
        model, tok, _info = load_model(args.model)
        model = _to_dtype(model, args.dtype)
    except (ValueError, KeyError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not quantized_modules(model):
        print(f"[tasa] note: {args.model} is not quantized (no tasa layers): this runs the "
              f"full-precision model; give a folder written by `tasa quantize` to run a "
              f"quantized one", file=sys.stderr)
    chat = not args.raw and generation.has_chat_template(tok)
    if args.system is not None and not chat:
        print("error: --system needs a chat template (this tokenizer has none, or --raw was "
              "given)", file=sys.stderr)
        return 2
    ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    history = [{"role": "system", "content": args.system}] if args.system is not None else []

    def one(prompt: str) -> int:
        if chat:
            history.append({"role": "user", "content": prompt})
            history[:] = _fit_history(tok, history, args.max_new_tokens, ctx)
            ids = generation.chat_ids(tok, history)
        else:
            ids = tok(prompt, return_tensors="pt").input_ids
            sys.stdout.write(prompt)      # raw completion: the text continues the prompt
        try:
            r = generation.generate(model, tok, ids, args.max_new_tokens, fast=not args.eager,
                                    sampling=sampling, stop_strings=args.stop,
                                    on_text=_stream_to_stdout)
        except ValueError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            if chat:
                history.pop()
            return 2
        sys.stdout.write("\n")
        if chat:
            history.append({"role": "assistant", "content": r.text})
        print(f"[tasa] {len(r.tokens)} new tokens ({r.path} path, {r.finish_reason}): prefill "
              f"{r.n_prompt} tokens at {r.prefill_tokens_per_s:.1f} tokens/s, decode "
              f"{r.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
        return 0

    if not args.interactive:
        return one(args.prompt)
    print(f"[tasa] {'chat' if chat else 'raw completion'} with {args.model}; an empty line or "
          f"Ctrl-D ends{', /reset forgets the conversation' if chat else ''}", file=sys.stderr)
    rc = one(args.prompt) if args.prompt else 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return rc
        if not line.strip():
            return rc
        if chat and line.strip() == "/reset":
            del history[1 if args.system is not None else 0:]
            continue
        rc = one(line)


def cmd_serve(args) -> int:
    try:   # fastapi/uvicorn are imported only by the one command that serves
        from . import serve
    except ImportError as e:
        print(f"error: tasa serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok, _info = load_model(args.model)
        model = _to_dtype(model, args.dtype)
    except (ValueError, KeyError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not quantized_modules(model):
        print(f"[tasa] note: {args.model} is not quantized (no tasa layers): serving the "
              f"full-precision model", file=sys.stderr)
    name = args.name or Path(str(args.model).rstrip("/")).name
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[tasa] warning: listening on {args.host}: anyone who can reach this port can "
              f"use the model (there is no authentication)", file=sys.stderr)
    print(f"[tasa] serving {name!r} at http://{args.host}:{args.port}/v1 (OpenAI-compatible: "
          f"/v1/models, /v1/completions, /v1/chat/completions); Ctrl-C stops", file=sys.stderr)
    serve.serve(model, tok, name, args.host, args.port, args.max_queue)
    return 0


def cmd_convert(args) -> int:
    try:
        out = convert_legacy(args.src, args.dst)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: transformers folder (load with AutoModelForCausalLM.from_pretrained after "
          f"`import tasa`)")
    return 0


def cmd_export(args) -> int:
    """Handler of ``tasa export --gguf``: a tasa plan (or a saved folder's) as a GGUF."""
    from . import gguf_export
    try:
        if args.size_mb is None and args.bits_per_param is None:
            if args.measurement is not None or args.fit_scoring != "tasa" or args.exclude_types:
                raise ValueError("--measurement, --fit-scoring and --exclude-types go with "
                                 "--size-mb or --bits-per-param (fitting types to a size)")
            report = gguf_export.export(args.gguf, model=args.model, plan=args.plan,
                                        quantized=args.quantized, alpha=args.alpha,
                                        data=args.data, progress=not args.quiet)
        else:
            from . import gguf_fit
            size = None if args.size_mb is None else args.size_mb * 1e6
            if size is not None and not size > 0:
                raise ValueError(f"--size-mb must be positive, got {args.size_mb}")
            report = gguf_fit.export(args.gguf, None if size is None else int(size),
                                     bits_per_param=args.bits_per_param,
                                     model=args.model, plan=args.plan,
                                     quantized=args.quantized, alpha=args.alpha, data=args.data,
                                     scoring=args.fit_scoring, measurement=args.measurement,
                                     exclude=[t for t in (args.exclude_types or "").split(",")
                                              if t], progress=not args.quiet)
    except (ImportError, ValueError, KeyError, FileNotFoundError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(gguf_export.format_report(report))
    if args.report:
        write_json_atomic(args.report, report)
        print(f"per-tensor report written to {args.report}")
    return 0


def cmd_eval(args) -> int:
    """Handler of ``tasa eval``: loads the model (and the quantized folder), evaluates, prints a
    table; returns the exit status."""
    if args.kl:
        return _cmd_eval_kl(args)
    if args.against:
        print("error: tasa: --against compares KL divergences: use it with --kl", file=sys.stderr)
        return 2
    try:
        tev.require_lm_eval()
        tasks = tev.check_tasks(args.tasks)
        quantized, model, tok, _info = _quantized_and_reference(args)
        if quantized is not None:
            model = quantized
            model.tasa_info = _info
        s = tev.evaluate(model, tok, tasks=tasks, data=args.data, limit=args.limit, seed=args.seed,
                     num_fewshot=_parse_fewshot(args.num_fewshot), batch_size=args.batch_size,
                     max_gen_toks=args.max_gen_toks, max_length=args.max_length,
                     out_path=args.out, progress=not args.quiet, generation=args.generation)
    except (ImportError, ValueError, KeyError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tev.format_table(s))
    c = s["config"]
    m = c["model"]
    print(f"\nmodel: {m.get('source', args.model)} ({m['class']}, {m['tasa_linear_modules']} "
          f"TasaLinear" + (f", {m['quantized_avg_bits']:.3f} avg bits" if "quantized_avg_bits" in m
                           else "") + ")" + (f"; {m['note']}" if "note" in m else ""))
    print(f"limit {c['limit']} ({c['subset']}), seed {c['seed']}, {c['seconds']:.1f} s")
    if args.out:
        print(f"summary and per-sample results written to {args.out}")
    return 0


def _cmd_eval_kl(args) -> int:
    """``tasa eval --kl``: KL divergence and top-1 agreement of a tasa folder against its
    reference (the field's yardstick) on every token of a text, with 95% intervals."""
    from . import divergence
    try:
        if not args.quantized:
            raise ValueError("tasa: --kl compares a quantized folder with its reference: give "
                             "--quantized DIR")
        quantized, reference, tok, _info = _quantized_and_reference(args)
        cands = {_folder_name(args.quantized, {}): quantized}
        for d in args.against or []:
            other = load_quantized(d)
            _check_same_base(d, _base_model(other), args.model, other, reference)
            cands[_folder_name(d, cands)] = other
        seqs = divergence.kl_sequences(tok, args.text, data=args.data, max_tokens=args.kl_tokens,
                                       seqlen=args.seqlen)
        scores = divergence.compare(reference, cands, seqs, progress=not args.quiet)
    except (ImportError, ValueError, KeyError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = divergence.summarize(scores)
    print(divergence.format_summary(summary))
    first = next(iter(cands))
    paired = {}
    for n in list(cands)[1:]:
        paired[n] = divergence.paired_kl(scores, first, n)
        d = paired[n]
        print(f"KL({n}) - KL({first}): {d['dkl']:+.5f} +- {d['dkl_ci']:.5f} nats per token "
              f"(paired over {d['sequences']} sequences, 95%); top-1 agreement "
              f"{d['dtop1']:+.4f} +- {d['dtop1_ci']:.4f}")
    tokens = scores["reference"]["tokens"]
    print(f"\ntext: {args.text} ({len(seqs)} sequences, {tokens} scored positions); "
          f"KL(reference || quantized) of the next-token distribution at every position; "
          f"+- are 95% t-intervals over sequences (NLL - ref: paired)")
    if args.out:
        write_json_atomic(args.out, {"text": args.text, "model": args.model,
                                     "quantized": str(args.quantized),
                                     "against": [str(d) for d in args.against or []],
                                     "sequences": len(seqs), "summary": summary,
                                     "paired": paired, "scores": scores})
        print(f"written to {args.out}")
    return 0


def _folder_name(folder, taken) -> str:
    """A folder's name for the tables (its last path component, made unique among ``taken``;
    "quantized" for a bare root)."""
    name = Path(str(folder)).name or "quantized"
    base, i = name, 2
    while name in taken or name == "reference":
        name, i = f"{base}#{i}", i + 1
    return name


def _base_model(quantized):
    """The base model a loaded tasa folder records (None if it records none)."""
    return ((getattr(quantized, "tasa_config", None) or {}).get("meta") or {}).get("base_model")


def _quantized_and_reference(args) -> tuple:
    """``(the --quantized folder's model or None, the reference, tokenizer, info)``: --model
    defaults to the folder's base model (else tasa's default) and must be that model."""
    quantized = load_quantized(args.quantized) if args.quantized else None
    base = _base_model(quantized) if quantized is not None else None
    if args.model is None:
        args.model = base if base is not None else defaults.MODEL
    reference, tok, info = load_model(args.model)
    if quantized is not None:
        _check_same_base(args.quantized, base, args.model, quantized, reference)
    return quantized, reference, tok, info


def _canonical(name) -> str:
    key = str(name).lower()
    return REGISTRY[key].name if key in REGISTRY else str(Path(str(name)).expanduser().resolve())


def _check_same_base(folder, base, model_arg, quantized, reference) -> None:
    """A quantized folder evaluated with another model's tokenizer and reference gives numbers
    that mean nothing (accuracy 0.0, rc 0): refuse unless the folder's base model and the
    vocabulary agree with ``--model``."""
    if base is not None and _canonical(base) != _canonical(model_arg):
        raise ValueError(f"tasa: {folder} was quantized from {base!r} but --model is "
                         f"{model_arg!r}; pass --model {base} (or leave --model out)")
    qv = getattr(quantized.config.get_text_config(), "vocab_size", None)
    rv = getattr(reference.config.get_text_config(), "vocab_size", None)
    if qv != rv:
        raise ValueError(f"tasa: {folder} has a vocabulary of {qv} tokens but --model "
                         f"{model_arg!r} has {rv}: not the same model")


def _non_negative(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {s!r}")
    return v


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {s!r}")
    return v


def _threads(s: str) -> int:
    """``--threads``: 0 (torch's default) up to 4x this machine's CPUs. More only oversubscribes
    the cores, and past a few thousand OpenMP aborts (20000) or the process segfaults (100000)."""
    v = _non_negative(s)
    cap = 4 * (os.cpu_count() or 1)
    if v > cap:
        raise argparse.ArgumentTypeError(f"at most {cap} (4x this machine's {os.cpu_count()} "
                                         f"CPUs), got {v}")
    return v


def _widths(s: str) -> tuple:
    try:
        return tuple(sorted({int(x) for x in s.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, got {s!r}")


_PC = pipeline.PipelineConfig()        # the one home of the pipeline's defaults


def _item_span(v: str) -> tuple:
    names = tuple(x.strip() for x in v.split(",") if x.strip() and x.strip() != "none")
    bad = [x for x in names if x not in defaults.SENS_ITEM_SPAN_OBJECTIVES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"objectives among {','.join(defaults.SENS_ITEM_SPAN_OBJECTIVES)}, got {','.join(bad)}")
    return names


def _dflt(name: str):
    """A PipelineConfig default as --help shows it (tuples comma-separated)."""
    v = getattr(_PC, name)
    return ",".join(map(str, v)) if isinstance(v, tuple) else v


def _add_budget(p, required: bool) -> None:
    """--bits / --code-bits, the two ways to give the budget (read back by :func:`_budget`)."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--bits", type=float, default=None,
                   help="target average bits per weight of the decoder's quantized linears, exact "
                        "storage cost (codes + fp16 scales/zeros + tables)"
                        + ("" if required else f"; default {_dflt('bits')}")
                        + ". The token embedding and output projection are not counted here "
                          "(--embed-bits); the run's last line gives the whole file in bits per "
                          "parameter over every parameter, as llama.cpp counts")
    g.add_argument("--code-bits", type=float, default=None,
                   help="target average CODE bits per weight (the paper's convention: scales, "
                        "zeros and tables not counted); the report states both")


def _budget(args) -> tuple:
    """``(bits, budget kind)`` from --bits / --code-bits; ``(None, None)`` when neither."""
    if getattr(args, "code_bits", None) is not None:
        return args.code_bits, "code"
    if getattr(args, "bits", None) is not None:
        return args.bits, "storage"
    return None, None


def _pipeline_config(args):
    """A PipelineConfig from the parsed options: every field whose option was given (an option
    is named after its field), the budget from :func:`_budget`, --no-intra."""
    cfg = pipeline.PipelineConfig()
    for f in dataclasses.fields(cfg):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in ("bits", "budget", "intra"):
            setattr(cfg, f.name, v)
    bits, budget = _budget(args)
    if bits is not None:
        cfg.bits, cfg.budget = bits, budget
    if getattr(args, "no_intra", False):
        cfg.intra = False
    return cfg


def cmd_quantize(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _pipeline_config(args)
    if args.plan is not None and args.eval_windows is None:
        cfg.eval_windows = 0      # a given plan: no perplexity check unless asked (92 of 98 s)
    try:
        if args.lazy:
            if args.plan is None or args.measurement is not None:
                raise ValueError("tasa: --lazy quantizes with a given --plan (the measurement "
                                 "holds the whole model: measure where it fits, or allocate a "
                                 "plan from a measurement.json with `tasa allocate`)")
            summary = pipeline.run_lazy(cfg, args.out, args.plan, progress=not args.no_progress,
                                        quiet=args.quiet)
        else:
            summary = pipeline.run(cfg, args.out, fresh=args.fresh,
                                   measurement_from=args.measurement,
                                   progress=not args.no_progress, quiet=args.quiet, plan=args.plan)
    except (ValueError, KeyError, OSError, ImportError, FolderLockedError, RankFailed) as e:
        msg = str(e)
        if isinstance(e, OSError) and not msg.startswith("tasa:"):
            msg = f"tasa: cannot write the output ({e})"       # read-only --out, ...
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary.get(k) for k in ("avg_bits", "code_avg_bits", "alpha_star",
                                                  "ppl_reference", "ppl_quantized", "kl",
                                                  "peak_rss_mib")}
                     | {"seconds": round(summary["timings_s"]["total"], 1), "out": args.out}))
    return 0


def _check_plan_target(out: Path) -> None:
    """``tasa allocate --out`` may replace a plan, never another file (a measurement, a model
    config ...)."""
    if not out.exists():
        return
    try:
        doc = json.loads(out.read_text())
    except (ValueError, UnicodeDecodeError):
        doc = None
    is_plan = isinstance(doc, dict) and "layers" in doc and doc.get("kind", "tasa.plan") == "tasa.plan"
    if not is_plan:
        raise ValueError(f"tasa: --out {out} exists and is not a tasa plan "
                         f"({(doc or {}).get('kind', 'not a plan') if isinstance(doc, dict) else 'not JSON'}); "
                         f"refusing to overwrite it")


def cmd_allocate(args) -> int:
    try:
        m = Measurement.load(args.measurement)
        bits, budget = _budget(args)
        A = pipeline.allocate(m, bits, args.beta, args.widths, not args.no_intra, budget=budget,
                              scoring=args.scoring)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.is_dir():
        out = out / defaults.PLAN_NAME
    try:
        _check_plan_target(out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(out, pipeline.plan_document(m, A))
    s = A["summary"]
    print(f"{out}: decoder linears {s['avg_bits']:.4f} average bits stored, "
          f"{s['code_avg_bits']:.4f} code bits (budget {bits} {budget} bits); "
          + ", ".join(f"{b}-bit {100 * f:.1f}%" for b, f in s["width_fraction"].items())
          + " (the whole file, embedding and head included: `tasa quantize --plan` reports it)")
    return 0


def _add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``tasa eval``; the handler is set as ``fn`` (``args.fn(args)`` runs it)."""
    p = subparsers.add_parser(
        "eval", help="evaluate a model (optionally quantized) with lm-eval on local data",
        description="Evaluate with lm-eval, offline, on local files: " + ", ".join(tev.TASKS) +
                    ". Default data: the small slices shipped with tasa (quick checks).")
    p.add_argument("--model", default=None,
                   help="registry name (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b), .gguf "
                        "file or checkpoint directory: its tokenizer and reference (default: "
                        "the --quantized folder's base model, else smollm2-135m)")
    p.add_argument("--quantized", default=None, metavar="DIR",
                   help="a tasa folder to evaluate; refused when it was quantized from another "
                        "model than --model")
    p.add_argument("--tasks", default=",".join(tev.DEFAULT_TASKS),
                   help=f"comma-separated, from {','.join(tev.TASKS)} (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="score a seeded random subset of N items per task")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the --limit subset and few-shot draws (default %(default)s)")
    p.add_argument("--data", default=None,
                   help="folder laid out like shared/data (default: the shipped slices)")
    p.add_argument("--num-fewshot", default=None,
                   help="K for all tasks but wikitext, or task=K,task=K (default: gsm8k 5, "
                        "others 0)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="lm-eval's batch size (default %(default)s)")
    p.add_argument("--max-gen-toks", type=int, default=256,
                   help="generation cap of generating tasks, gsm8k (default %(default)s)")
    p.add_argument("--max-length", type=int, default=None,
                   help="context length in tokens (default: the model's)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the summary and lm-eval's per-sample results as JSON")
    p.add_argument("--generation", choices=tev.GENERATION, default="fast",
                   help="greedy decoding of generating tasks (gsm8k): fast = tasa's decode loop, "
                        "one request at a time (default); hf = transformers' generate on "
                        "lm-eval's padded batches")
    p.add_argument("--kl", action="store_true",
                   help="instead of lm-eval tasks: KL divergence and top-1 agreement of the "
                        "--quantized folder against its reference over every token of --text "
                        "(llama.cpp's --kl-divergence yardstick)")
    p.add_argument("--against", action="append", default=None, metavar="DIR",
                   help="with --kl: another tasa folder of the same base model, scored on the "
                        "same tokens, with its KL minus the --quantized folder's as a paired "
                        "difference over sequences (repeatable)")
    p.add_argument("--text", default="general",
                   help="with --kl: general (WikiText-2 test), gsm8k (test questions with their "
                        "solutions) or the path of your own UTF-8 text file (default %(default)s)")
    p.add_argument("--kl-tokens", type=_positive, default=16384,
                   help="with --kl: score up to this many tokens (default %(default)s)")
    p.add_argument("--seqlen", type=_positive, default=512,
                   help="with --kl: window length in tokens (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_eval)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tasa", description="Task-aware mixed-precision quantization of LLMs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("quantize", help="run the TASA pipeline and save the quantized model",
                       description="Measures (mixture search, multi-objective sensitivity), "
                                   "allocates bits (knapsack + group DP), quantizes (--method) "
                                   "and saves a transformers folder with its plan, measurement "
                                   "and report. Re-running the same command resumes.")
    p.add_argument("--model", default=None,
                   help="registry name (smollm2-135m, qwen2.5-coder-0.5b, gemma3-270m), .gguf "
                        f"file, local checkpoint folder or Hugging Face id (default {_dflt('model')})")
    _add_budget(p, required=False)
    p.add_argument("--out", required=True, help="output folder (resumes a run found there)")
    p.add_argument("--data", default=None,
                   help="data folder laid out like shared/data (default: the slices shipped with tasa)")
    p.add_argument("--beta", type=float, default=None,
                   help=f"weight of the perplexity objective in the aggregate (default {_dflt('beta')})")
    p.add_argument("--alpha", type=float, default=None,
                   help="fix the share of general text in the calibration mix (default: search)")
    p.add_argument("--widths", type=_widths, default=None,
                   help=f"allowed widths, comma-separated (default {_dflt('widths')})")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"weights per group (default {_dflt('group_size')})")
    p.add_argument("--mode", choices=["sym", "asym"], default=None,
                   help=f"symmetric or asymmetric groups (default {_dflt('mode')})")
    p.add_argument("--method", choices=method_names(), default=None,
                   help="the per-matrix quantizer under the plan (registered in tasa.quant: "
                        + "; ".join(f"{n}: {METHODS[n].description}" for n in method_names())
                        + f"; default {_dflt('method')})")
    p.add_argument("--act-order", action="store_true", default=None,
                   help="GPTQ columns in decreasing Hessian-diagonal order (stored as a "
                        "permutation)")
    p.add_argument("--hadamard", action=argparse.BooleanOptionalAction, default=None,
                   help="store every quantized linear rotated (an in-group Hadamard transform, "
                        "format version 2; the probes rotate too): on by default for the GPTQ "
                        "methods, where it measured better at 3 and 4 bits; off for RTN, where "
                        "it measured worse")
    p.add_argument("--granularity", choices=["block", "sublayer", "linear"], default=None,
                   help=f"sensitivity/allocation unit: a decoder block, its attention or MLP, or "
                        f"one linear (default {_dflt('granularity')})")
    p.add_argument("--sens-widths", type=_widths, default=None,
                   help=f"probe widths, each measured per unit (default {_dflt('sens_widths')}); an "
                        f"allocation width not probed gets the nearest lower probe times the "
                        f"unit's own quantizer-error ratio")
    p.add_argument("--sens-dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help=f"the probes' compute dtype (default {_dflt('sens_dtype')}: bf16 "
                        f"autocast where bf16 is native -- a GPU, a CPU with AVX-512 BF16 or "
                        f"AMX -- float32 elsewhere, where emulated bf16 ran 7x slower)")
    p.add_argument("--sens-scoring", choices=list(defaults.SENS_SCORINGS), default=None,
                   help=f"how a probe is scored: nll = the gold-token NLL increase, kl = the KL "
                        f"divergence from the full-precision model at every scored position "
                        f"(default {_dflt('sens_scoring')})")
    p.add_argument("--sens-method", choices=method_names(), default=None,
                   help=f"the probes' quantizer: rtn, or the method the model is quantized with "
                        f"(a Hessian method probes each unit alone with it, calibrated as the "
                        f"final quantization at alpha*; costs one quantization of the model per "
                        f"probe width) (default {_dflt('sens_method')})")
    p.add_argument("--sens-item-span", type=_item_span, default=None,
                   help=f"comma-separated objectives among math,arc whose probes score every "
                        f"token of an item, the question's too ('' or none: only the gold "
                        f"answer given the question) (default {_dflt('sens_item_span') or 'none'})")
    p.add_argument("--sens-ppl-windows", type=int, default=None,
                   help=f"windows of the perplexity objective (default {_dflt('sens_ppl_windows')})")
    p.add_argument("--sens-math-items", type=int, default=None,
                   help=f"GSM8K items of the math objective (default {_dflt('sens_math_items')})")
    p.add_argument("--sens-arc-items", type=int, default=None,
                   help=f"ARC items of the arc objective (default {_dflt('sens_arc_items')})")
    p.add_argument("--n-calib", type=int, default=None,
                   help=f"GPTQ calibration sequences (default {_dflt('n_calib')})")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"GPTQ sequence length in tokens (default {_dflt('seqlen')})")
    p.add_argument("--n-gen", type=int, default=None,
                   help=f"general-text sequences of the mixture search (default {_dflt('n_gen')})")
    p.add_argument("--n-task", type=int, default=None,
                   help=f"task sequences of the mixture search (default {_dflt('n_task')})")
    p.add_argument("--n-test", type=int, default=None,
                   help=f"held-out task sequences the mixture is scored on (default "
                        f"{_dflt('n_test')})")
    p.add_argument("--mix-seqlen", type=int, default=None,
                   help=f"sequence length of the mixture search (default {_dflt('mix_seqlen')})")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="WikiText-2 windows for the drift check of the quantized model "
                        "against the reference (perplexity, KL, top-1; with "
                        f"{defaults.DRIFT_TASK_TOKENS} tokens of GSM8K test; default "
                        f"{_dflt('eval_windows')}; 0 with --plan unless given; 0: skip)")
    p.add_argument("--no-intra", action="store_true", help="skip the intra-layer group step")
    p.add_argument("--embed-bits", "--lm-head-bits", dest="embed_bits", type=int, default=None,
                   choices=[0, 2, 3, 4, 8],
                   help=f"RTN width of the token embedding, quantized after GPTQ (default: "
                        f"{defaults.HEAD_BITS} when it is tied to the output projection -- one "
                        f"table --, {defaults.UNTIED_EMBED_BITS} when untied); 0 keeps the "
                        f"embedding and the head as the checkpoint stores them. Not counted in "
                        f"--bits: the run's last line and report.md give the whole file's bits "
                        f"per parameter (--lm-head-bits is the old name)")
    p.add_argument("--head-bits", type=int, default=None, choices=[2, 3, 4, 8],
                   help=f"RTN width of the output projection (default {defaults.HEAD_BITS}); "
                        f"a tied head is the embedding's table (the two must then agree)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of every draw (data split, subsets, calibration; default "
                        f"{_dflt('seed')})")
    p.add_argument("--measurement", default=None,
                   help="re-use this measurement.json (same settings) instead of measuring")
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="quantize with this plan.json (from `tasa allocate` / `tasa quantize`) "
                        "instead of measuring and allocating; --bits is then ignored")
    p.add_argument("--lazy", action="store_true",
                   help="with --plan and a local safetensors --model folder: never hold the "
                        "whole model; read, quantize and write one decoder block at a time")
    p.add_argument("--fresh", action="store_true",
                   help="discard a measurement.json of other settings found in --out")
    p.add_argument("--threads", type=_threads, default=0,
                   help="torch threads (0: torch default; at most 4x the CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (any library's)")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    p.set_defaults(fn=cmd_quantize)
    p = sub.add_parser("allocate", help="re-allocate bits from a measurement.json (seconds)",
                       description="A new plan from an existing measurement, for another budget "
                                   "or allocation setting: no model, no data, seconds.")
    p.add_argument("--measurement", required=True, help="measurement.json or its folder")
    _add_budget(p, required=True)
    p.add_argument("--scoring", choices=list(pipeline.SCORINGS), default="tasa",
                   help="tasa: measured task-aware probes; higgs / hawq: the non-task-aware "
                        "baselines (see tasa.pipeline.unit_errors; default %(default)s)")
    p.add_argument("--beta", type=float, default=_dflt("beta"),
                   help="weight of the perplexity objective in the aggregate (default "
                        "%(default)s)")
    p.add_argument("--widths", type=_widths, default=_PC.widths,
                   help=f"allowed widths, comma-separated (default {_dflt('widths')})")
    p.add_argument("--no-intra", action="store_true", help="skip the intra-layer group step")
    p.add_argument("--out", required=True, help="plan.json path (or a folder)")
    p.set_defaults(fn=cmd_allocate)
    _add_eval_parser(sub)
    p = sub.add_parser("generate", help="chat or complete text with a model, streamed (tasa's "
                                        "fast decode loop)",
                       description="Generates from a tasa folder (or any model tasa can load). "
                                   "With a tokenizer that has a chat template (Instruct models) "
                                   "the prompt is a user message and the answer the assistant's; "
                                   "--raw continues the text instead. Greedy by default "
                                   "(identical to transformers' generate); --temperature > 0 "
                                   "samples, reproducibly for a given --seed.")
    p.add_argument("--model", default=defaults.MODEL,
                   help="a tasa folder (what `tasa quantize --out` wrote), or a registry name, "
                        ".gguf file or model folder to run unquantized (default: %(default)s)")
    p.add_argument("--prompt", default=None,
                   help="the user message (chat) or the text to continue (--raw); optional with "
                        "--interactive")
    p.add_argument("--raw", action="store_true",
                   help="raw completion: do not apply the tokenizer's chat template")
    p.add_argument("--system", default=None, help="a system message (chat only)")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="a conversation: read a message per line, answer it, keep the history "
                        "(oldest turns dropped to fit the context); an empty line ends")
    p.add_argument("--max-new-tokens", type=_positive, default=128,
                   help="tokens to generate at most per answer (default %(default)s; with the "
                        "prompt, within the model's context)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples from the softmax at this temperature")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches P "
                        "(default %(default)s: all)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the K most likely tokens (default 0: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed: the same seed gives the same text (default %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable); the end-of-sequence token always "
                        "stops")
    p.add_argument("--eager", action="store_true",
                   help="use transformers' generate instead of tasa's decode loop")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help=_DTYPE_HELP)
    p.add_argument("--threads", type=_threads, default=0,
                   help="torch threads (0: torch default; at most 4x the CPUs)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a model (/v1/models, "
                                     "/v1/completions, /v1/chat/completions, streaming)",
                       description="Serves one model over OpenAI's HTTP API, for chat UIs, "
                                   "agents, the openai client and lm-eval's local-completions. "
                                   "Requests are queued and run one at a time. No "
                                   "authentication: it listens on 127.0.0.1 unless --host says "
                                   "otherwise.")
    p.add_argument("--model", required=True,
                   help="a tasa folder (or a registry name / model folder, unquantized)")
    p.add_argument("--name", default=None,
                   help="the model id clients ask for (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                       "%(default)s: this machine only)")
    p.add_argument("--port", type=_positive, default=8000, help="default %(default)s")
    p.add_argument("--max-queue", type=_positive, default=64,
                   help="requests waiting at most; more get 503 (default %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help=_DTYPE_HELP)
    p.add_argument("--threads", type=_threads, default=0,
                   help="torch threads (0: torch default; at most 4x the CPUs)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("lm-eval-tasks",
                       help="print the folder of tasa's offline lm-eval tasks (tasa_gsm8k, "
                            "tasa_gsm8k_nll, tasa_arc_easy, tasa_arc_challenge, tasa_wikitext) for "
                            "lm-eval's --include_path",
                       description="Prints the folder to pass to lm-eval's own CLI as "
                                   "--include_path; its tasks read the data shipped with tasa "
                                   "(or --metadata '{\"tasa_data\": \"DIR\"}', a folder laid "
                                   "out like shared/data), offline.")
    p.set_defaults(fn=lambda args: print(tev.LM_EVAL_TASK_DIR) or 0)
    p = sub.add_parser("export", help="write a tasa plan as a GGUF that llama.cpp runs (llama.cpp "
                                      "quantizes the reference with the plan's type per tensor and "
                                      "tasa's task-aware importance matrix)",
                       description="The plan's width per tensor becomes a llama.cpp type (2 Q2_K, "
                                   "3 Q3_K, 4 Q4_K, 5 Q5_K, 6 Q6_K, 8 Q8_0; rows that are no "
                                   "multiple of 256 get llama.cpp's own fallback, stated); the "
                                   "importance matrix is tasa's Hessian diagonal on the plan's "
                                   "calibration mix alpha*. Needs llama-cpp-python.")
    p.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--plan", metavar="FILE", help="a plan.json (tasa allocate / tasa quantize)")
    g.add_argument("--quantized", metavar="DIR", help="a saved tasa folder: its plan and widths")
    p.add_argument("--model", default=None,
                   help="the reference: a registry name or a .gguf file (default: the folder's "
                        "base model, else smollm2-135m)")
    p.add_argument("--alpha", type=float, default=None,
                   help="calibration mix of the importance matrix (default: the plan's alpha*)")
    p.add_argument("--data", default=None,
                   help="folder laid out like shared/data (default: the shipped slices)")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--size-mb", type=float, default=None, metavar="MB",
                   help="instead of the plan's widths: fit llama.cpp's own types (Q3_K .. Q8_0, "
                        "IQ4_XS/NL, Q4_1 .. Q5_1) to a whole file of at most MB megabytes (1e6 "
                        "bytes), by the job's measured sensitivities x each type's "
                        "Hessian-weighted error (tasa.gguf_fit)")
    s.add_argument("--bits-per-param", type=float, default=None, metavar="BPP",
                   help="as --size-mb, the size given in whole-file bits per parameter")
    p.add_argument("--fit-scoring", choices=("tasa", "proxy"), default="tasa",
                   help="with a size: 'tasa' weighs each unit by its probes (needs the job's "
                        "measurement.json), 'proxy' by the task-aware Hessian alone "
                        "(default: %(default)s)")
    p.add_argument("--exclude-types", default=None, metavar="T1,T2",
                   help="with a size: llama.cpp types left out of the menu (e.g. the source "
                        "GGUF's own type, which its dequantized weights re-quantize to almost "
                        "losslessly)")
    p.add_argument("--measurement", default=None, metavar="FILE",
                   help="the job's measurement.json (default: beside the plan / in the folder)")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write the per-tensor report (widths, types, bytes) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("convert", help="rewrite a folder of an older tasa (tasa_config.json) as "
                                       "a transformers folder")
    p.add_argument("src", help="the old folder (kept as it is)")
    p.add_argument("dst", help="the new folder")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("info", help="build and machine information")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("demo", help="kernel demo on a random mixed-bit matrix")
    p.add_argument("--n", type=int, default=4096, help="output features")
    p.add_argument("--k", type=int, default=4096, help="input features")
    p.add_argument("--bits", choices=["3", "3.5", "4", "8"], default="3.5",
                   help="widths of the random matrix (3.5: half 3, half 4; default %(default)s)")
    p.add_argument("--group-size", type=int, default=128, help="default %(default)s")
    p.add_argument("--batch", type=int, default=1, help="rows of x (default %(default)s)")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        # one line instead of a traceback; measurement.json / the output folder are written
        # atomically and a re-run of the same command resumes
        print("\ninterrupted: nothing half-written was kept; re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
