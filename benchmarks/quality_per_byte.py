"""Quality per byte against what users pick instead (issue 26): TASA, GPTQ and llama.cpp's own
quantizations of the same reference weights, on one yardstick, with whole-file sizes.

    python benchmarks/quality_per_byte.py --model smollm2-135m --data ../shared/data

Rows (every one built from the same reference weights: the model's dequantized GGUF):

* ``reference``: the dequantized weights in fp32 (transformers).
* ``TASA c<b>``: the tasa job at code-bit budgets ``--budgets`` (widths 3/4/8, intra-layer step,
  8-bit packed embedding/head: tasa's defaults; one measurement with tasa's current default
  settings, re-used by every budget), GPTQ on the alpha* mix.
* ``GPTQ W3/W4 g128``: uniform GPTQ with GPTQModel's usual settings (group 128, symmetric,
  act-order, no rotation) on general text only (alpha = 1: 32 x 512 tokens of the general pool),
  run by tasa's own GPTQ with its default method (gptq-mse: the Hessian-weighted scale search
  GPTQModel's ``mse`` option does; GPTQModel itself is not installed here), tasa's default 8-bit
  embedding/head.
* ``tasa W3/W4 +had`` (``--rotated``): the same uniform rows with tasa's in-group Hadamard
  rotation (format version 2; the same bytes).
* ``llama.cpp <mix>``: llama.cpp's quantizer (llama-cpp-python's ``llama_model_quantize``) on
  the F32 reference GGUF (``tasa.gguf_export.reference_gguf``: metadata and tokenizer kept), with
  an importance matrix from the SAME general-text calibration sequences as the GPTQ rows.
* ``TASA c<b> -> GGUF``: the TASA folder's plan exported by ``tasa export --gguf`` (llama.cpp's
  quantizer, one type per tensor, tasa's importance matrix at alpha*).

Metrics, the same token ids for every row (llama.cpp rows scored through llama-cpp-python with
the logits of every position): mean KL(reference || row) of the next-token distribution and
top-1 agreement over ``--general-tokens`` of WikiText-2 test (windows of 512) and over GSM8K
test items (question + gold solution, ``--task-tokens``), the GSM8K gold-solution NLL, and on
``--mc`` ARC-Easy test items the multiple-choice accuracy (sum log-likelihood of each choice,
lm-eval's ``acc``) and the KL over the item with its correct answer. All of these texts are held
out from tasa's calibration and sensitivity sets (those use GSM8K train, ARC validation and the
general pool). Paired differences with 95% t-intervals between rows neighbouring in size.

Results: ``benchmarks/results/quality_per_byte_<model>.{md,json,png}``; the built files under
``--work`` (default ``$TASA_CACHE/qpb/<model>``) are re-used by a second run.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, ci95, machine  # noqa: E402

# Q4_1 is there to show a bias of these references: they are dequantized GGUFs, SmolLM2's a
# Q4_1 file, so a 32-block 4-bit format can land on its grid again (see the report's note)
LLAMA_MIXES = ("Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_XS", "Q4_0", "Q4_1", "Q5_K_M")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---- building the rows ---------------------------------------------------------------------------

def build_tasa(model_name, args, work: Path) -> dict:
    """The tasa job at each budget: the first measures (tasa's current defaults), the others
    re-use its measurement.json (allocation + GPTQ only)."""
    from tasa import pipeline
    out = {}
    # a budget already built lends its measurement to the others, whatever their order
    mpath = next((work / f"tasa-c{b}" / "measurement.json" for b in args.budgets
                  if (work / f"tasa-c{b}" / "run.json").is_file()), None)
    for b in args.budgets:
        folder = work / f"tasa-c{b}"
        if not (folder / "run.json").is_file():
            log(f"TASA {b} code bits -> {folder}" + ("" if mpath else " (measuring)"))
            cfg = pipeline.PipelineConfig(model=model_name, data=args.data, bits=b, budget="code",
                                          eval_windows=0)
            pipeline.run(cfg, folder, measurement_from=None if mpath is None else str(mpath),
                         progress=False, quiet=True, report=False)
        mpath = mpath or folder / "measurement.json"
        out[f"TASA c{b}"] = folder
    return out


def build_gptq(model_name, args, work: Path) -> dict:
    """Uniform GPTQ W3/W4 g128: as GPTQModel makes them (no rotation) and, for widths in
    ``--rotated``, tasa's uniform rows with its in-group rotation (format version 2)."""
    from tasa import pipeline
    from tasa.models import load_model
    from tasa.quant import plan_to_dict, uniform_plan
    out = {}
    rows = [(w, False) for w in (3, 4)] + [(w, True) for w in args.rotated]
    for w, had in rows:
        folder = work / (f"gptq-w{w}" + ("-had" if had else ""))
        name = f"tasa W{w} +had" if had else f"GPTQ W{w} g128"
        if not (folder / "run.json").is_file():
            log(f"{name} -> {folder}")
            model, tok, _ = load_model(model_name)
            plan = uniform_plan(model, w, 128, "sym", fit_group_size=True)
            for s in plan.values():
                s.act_order = True
            # GPTQModel does not rotate: tasa's rotation only on the "tasa W +had" rows
            cfg = pipeline.PipelineConfig(model=model_name, data=args.data, alpha=1.0,
                                          mode="sym", act_order=True, eval_windows=0,
                                          hadamard=had)
            pipeline.run(cfg, folder, progress=False, quiet=True, report=False, model=model,
                         tokenizer=tok, plan=plan_to_dict(plan))
        out[name] = folder
    return out


def build_llama(model_name, args, work: Path, ref, tok) -> dict:
    from tasa import gguf_export as ge
    from tasa import pipeline
    from tasa.quant import default_targets
    ref_file = ge.cached_reference(model_name, log=log)
    names = list(default_targets(ref))
    out = {}
    todo = [m for m in LLAMA_MIXES if not (work / f"llama-{m}.gguf").is_file()]
    if todo:
        cfg = pipeline.PipelineConfig(model=model_name, data=args.data)
        ids, _ = pipeline.gptq_calibration(tok, cfg, 1.0, log=log)
        im = ge.importance(ref, ids, names, progress=False)
        gmap = ge.gguf_name_map(ge.gguf_architecture(ref_file),
                                ref.config.get_text_config().num_hidden_layers, names)
        im = {gmap[n]: v for n, v in im.items()}
        for m in todo:
            log(f"llama.cpp {m} (imatrix: general text) -> {work / f'llama-{m}.gguf'}")
            ge.llama_quantize(ref_file, work / f"llama-{m}.gguf", m, imatrix=im)
    for m in LLAMA_MIXES:
        out[f"llama.cpp {m}"] = work / f"llama-{m}.gguf"
    return out


def build_exports(model_name, args, work: Path, tasa_rows: dict) -> dict:
    from tasa import gguf_export as ge
    out = {}
    for b in args.export_budgets:
        f = work / f"tasa-c{b}.gguf"
        if not f.is_file() or not (work / f"tasa-c{b}.gguf.json").is_file():
            log(f"export TASA c{b} -> {f}")
            rep = ge.export(f, model=model_name, quantized=tasa_rows[f"TASA c{b}"],
                            data=args.data, progress=False, log=log)
            (work / f"tasa-c{b}.gguf.json").write_text(json.dumps(rep, indent=1))
        out[f"TASA c{b} -> GGUF"] = f
    return out


def build_fits(model_name, args, work: Path, rows: dict) -> dict:
    """``tasa export --gguf --size-mb``: the TASA measurement fitted to llama.cpp's type menu at
    the exact size of each llama.cpp mix of ``--fit`` (``tasa.gguf_fit``), by each scoring of
    ``--fit-scorings`` ("tasa": the probes' gains; "proxy": the task-aware Hessian alone), and
    the lossless-type control."""
    from tasa import gguf_fit
    out = {}
    folder = rows[f"TASA c{args.budgets[0]}"]

    def one(name, f, what, size, **kw):
        if not f.is_file() or not f.with_suffix(".gguf.json").is_file():
            log(f"fit ({what}) to {size} bytes -> {f}")
            rep = gguf_fit.export(f, size, model=model_name, quantized=folder, data=args.data,
                                  progress=False, log=log, **kw)
            rep["fit"].pop("table", None)
            f.with_suffix(".gguf.json").write_text(json.dumps(rep, indent=1))
        out[name] = f

    from tasa import gguf_export as ge
    for mix in args.fit:
        size = rows[f"llama.cpp {mix}"].stat().st_size
        # the mix's own embedding and head types, fixed: the fit places the decoder linears.
        # (Qwen2.5-Coder: the plan's 4-bit embedding maps to Q5_0 on its 896-long rows, 93.6 MB,
        # where llama.cpp's mixes use IQ4_NL or Q4_0, 76.6 MB: with the plan's type no file
        # fitted IQ4_XS's size, 426 MB against a 432 MB smallest.)
        tens = ge.gguf_tensors(rows[f"llama.cpp {mix}"])
        fixed = {"embedding_type": tens["token_embd.weight"]["type"],
                 "head_type": tens.get("output.weight", {}).get("type")}
        for sc in args.fit_scorings:
            one(("TASA" if sc == "tasa" else "proxy") + f" fit @{mix}",
                work / f"fit-{sc}-{mix}.gguf", f"{sc}, llama.cpp {mix}'s size", size, scoring=sc,
                **fixed)
        if args.fit_lossless_control:
            one(f"TASA fit w/o lossless @{mix}", work / f"fit-tasa-nolossless-{mix}.gguf",
                f"tasa, no lossless types, llama.cpp {mix}'s size", size, scoring="tasa",
                drop_lossless=True, **fixed)
    return out


# ---- sizes -------------------------------------------------------------------------------------

def size_of(path: Path) -> dict:
    """Whole-file bytes and bits per parameter; the decoder linears' bits per weight."""
    if path.suffix == ".gguf":
        from tasa import gguf_export as ge
        tens = ge.gguf_tensors(path)
        lin = [t for n, t in tens.items() if n.startswith("blk.") and t["shape"].__len__() == 2]
        params = sum(t["params"] for t in tens.values())
        types = {}
        for n, t in tens.items():
            if len(t["shape"]) == 2:
                types[t["type"]] = types.get(t["type"], 0) + 1
        return {"bytes": path.stat().st_size, "params": params,
                "bpp": 8 * path.stat().st_size / params,
                "linear_bits": 8 * sum(t["bytes"] for t in lin) / sum(t["params"] for t in lin),
                "types": types,
                "embedding": tens["token_embd.weight"]["type"],
                "output": tens.get("output.weight", {}).get("type", "tied")}
    from tasa import storage
    s = storage.model_size(path)
    run = json.loads((path / "run.json").read_text())
    return {"bytes": s["file_bytes"], "params": s["params"], "bpp": s["bits_per_param"],
            "linear_bits": s["parts"]["decoder linears"]["bits_per_param"],
            "plan_bits": run["avg_bits"], "code_bits": run.get("code_avg_bits")}


# ---- scoring -----------------------------------------------------------------------------------

class HFScorer:
    def __init__(self, model):
        self.m = model

    @torch.no_grad()
    def logprobs(self, ids):
        return F.log_softmax(self.m(ids[None]).logits[0].float(), -1)

    @torch.no_grad()
    def mc(self, ctx, conts):
        """``(sum log-likelihood of each continuation, log-probs [T, V] of ctx + conts[0])``."""
        seqs = [ctx + c for c in conts]
        L = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
        lp = F.log_softmax(self.m(ids, attention_mask=mask).logits.float(), -1)
        lls = []
        for i, c in enumerate(conts):
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c))
            lls.append(float(lp[i, pos, torch.tensor(c)].sum()))
        return lls, lp[0, :len(seqs[0])]


class LlamaScorer:
    """llama.cpp through llama-cpp-python: the context evaluated once, each continuation after
    it (the KV cache beyond the context is dropped by ``eval``)."""

    def __init__(self, path, n_ctx=512):
        from tasa import gguf_export as ge
        self.a = ge.LlamaCppLogits(path, n_ctx=n_ctx)
        self.llm = self.a.llm

    def logprobs(self, ids):
        return F.log_softmax(self.a(ids[None]).logits[0], -1)

    def mc(self, ctx, conts):
        out = self._mc(ctx, conts)
        if not getattr(self, "checked", False):       # the prefix re-use equals a full pass
            self.checked = True
            for c, ll in zip(conts, out[0]):
                lp = self.logprobs(torch.tensor(ctx + c))
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c))
                full = float(lp[pos, torch.tensor(c)].sum())
                if abs(full - ll) > 1e-2 * max(1.0, abs(full)):
                    raise RuntimeError(f"llama.cpp prefix re-use gives {ll}, a full pass {full}")
        return out

    def _mc(self, ctx, conts):
        llm = self.llm
        llm.reset()
        llm.eval(ctx)
        ctx_logits = np.array(llm.scores[:len(ctx)], dtype=np.float32)
        lls, first = [], None
        for i, c in enumerate(conts):
            llm.n_tokens = len(ctx)
            llm.eval(c)
            cl = np.array(llm.scores[len(ctx):len(ctx) + len(c)], dtype=np.float32)
            full = torch.from_numpy(np.concatenate([ctx_logits, cl]))
            lp = F.log_softmax(full, -1)
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c))
            lls.append(float(lp[pos, torch.tensor(c)].sum()))
            if i == 0:
                first = lp
        return lls, first


def kl_rows(lr, lq):
    pr = lr.exp()
    kl = (pr * (lr - lq)).sum(-1).clamp_min(0)
    top1 = (lq.argmax(-1) == lr.argmax(-1)).float()
    return kl, top1


class Checkpoint:
    """A scoring loop's partial sums on disk, so that a killed run resumes after the last item
    saved instead of scoring every row of that text again (a Qwen2.5-Coder-0.5B text costs
    ~20 rows x 40 sequences of 512 tokens, hours on 2 cores; the loop is item-major so the
    reference runs once per item). Valid only for the same rows in the same order and the same
    number of items; anything else starts afresh. Saved at most every ``every_s`` seconds."""

    def __init__(self, path: Path, rows, n_items: int, every_s: float = 60.0):
        self.path, self.key, self.every_s = path, {"rows": list(rows), "n_items": n_items}, every_s
        self.last = time.time()

    def resume(self):
        """``(next item, partial results)``, or ``(0, None)``."""
        if not self.path.is_file():
            return 0, None
        d = json.loads(self.path.read_text())
        if d.get("key") != self.key:
            return 0, None
        log(f"{self.path.name}: resuming after item {d['done']} of {self.key['n_items']}")
        return d["done"], d["res"]

    def save(self, done: int, res: dict, force: bool = False) -> None:
        if not force and time.time() - self.last < self.every_s:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "done": done, "res": res}))
        tmp.replace(self.path)        # atomic: a kill mid-write leaves the previous checkpoint
        self.last = time.time()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _items(items, desc, ckpt, fresh):
    """(res, iterator of (index, item)) from the checkpoint's next item on, with a progress bar."""
    from tqdm import tqdm
    start, res = ckpt.resume() if ckpt is not None else (0, None)
    res = res or fresh
    it = tqdm(items[start:], desc=desc, mininterval=30, initial=start, total=len(items))
    return res, enumerate(it, start)


def score_text(scorers: dict, seqs, desc: str, ckpt: "Checkpoint" = None) -> dict:
    fresh = {n: {"kl_seq": [], "top1_seq": [], "nll_seq": [], "kl_sum": 0.0, "top1_sum": 0.0,
                 "pos": 0} for n in scorers}
    res, items = _items(seqs, desc, ckpt, fresh)
    for i, s in items:
        lr = scorers["reference"].logprobs(s.ids)
        tgt = s.ids[s.nll_from:]
        for n, sc in scorers.items():
            lq = lr if n == "reference" else sc.logprobs(s.ids)
            kl, top1 = kl_rows(lr, lq)
            nll = -lq[s.nll_from - 1:-1].gather(1, tgt[:, None])[:, 0]
            r = res[n]
            r["kl_seq"].append(float(kl.mean()))
            r["top1_seq"].append(float(top1.mean()))
            r["nll_seq"].append(float(nll.mean()))
            r["kl_sum"] += float(kl.sum())
            r["top1_sum"] += float(top1.sum())
            r["pos"] += kl.numel()
        if ckpt is not None:
            ckpt.save(i + 1, res)
    for r in res.values():
        r["kl"], r["top1"] = r["kl_sum"] / r["pos"], r["top1_sum"] / r["pos"]
        r["nll"] = float(np.mean(r["nll_seq"]))
    return res


def mc_items(tok, data, n, seed):
    from tasa import corpora
    items = corpora.load_arc(data, "easy", "test")
    random.Random(seed).shuffle(items)
    out = []
    for it in items:
        ctx_text = corpora.qa_prompt(it["question"])
        ctx = tok(ctx_text).input_ids
        conts, ok = [], True
        order = [it["gold"]] + [i for i in range(len(it["choices"])) if i != it["gold"]]
        for i in order:
            full = tok(f"{ctx_text} {it['choices'][i]}").input_ids
            if full[:len(ctx)] != ctx or len(full) == len(ctx):
                ok = False
                break
            conts.append(full[len(ctx):])
        if ok:
            out.append((ctx, conts))       # the gold answer first
        if len(out) == n:
            break
    return out


def score_mc(scorers: dict, items, desc="ARC-Easy", ckpt: "Checkpoint" = None) -> dict:
    fresh = {n: {"correct": [], "kl_seq": [], "top1_seq": [], "kl_sum": 0.0, "pos": 0}
             for n in scorers}
    res, its = _items(items, desc, ckpt, fresh)
    for i, (ctx, conts) in its:
        lls_r, lr = scorers["reference"].mc(ctx, conts)
        for n, sc in scorers.items():
            lls, lq = (lls_r, lr) if n == "reference" else sc.mc(ctx, conts)
            kl, top1 = kl_rows(lr, lq)
            r = res[n]
            r["correct"].append(float(int(np.argmax(lls)) == 0))
            r["kl_seq"].append(float(kl.mean()))
            r["top1_seq"].append(float(top1.mean()))
            r["kl_sum"] += float(kl.sum())
            r["pos"] += kl.numel()
        if ckpt is not None:
            ckpt.save(i + 1, res)
    for r in res.values():
        r["acc"] = float(np.mean(r["correct"]))
        r["kl"] = r["kl_sum"] / r["pos"]
    return res


# ---- the report ----------------------------------------------------------------------------------

def fmt_ci(m, h, nd=4):
    return f"{m:.{nd}f} ± {h:.{nd}f}" if math.isfinite(h) else f"{m:.{nd}f}"


def write_report(model_name, rows, scores, meta, stem):
    order = sorted(rows, key=lambda n: (-1 if n == "reference" else rows[n]["bpp"]))
    L = [f"# Quality per byte: {model_name}", "",
         f"{meta['date']}, commit {meta['commit']}, {meta['device']}, torch {meta['torch']}, "
         f"{meta['threads']} threads; command: "
         f"`{meta['command']}`", "",
         "Every row is built from the same reference weights (the dequantized source GGUF). "
         "x = whole-file bits per parameter (every byte of the file over every parameter, as "
         "llama.cpp reports); `linear` = the decoder linears' bits per weight. KL = mean "
         "KL(reference || row) in nats per position, top-1 = agreement of the argmax with the "
         "reference's, over every position; ± = 95% t-interval over sequences (items).", "",
         "**A bias to read first:** the registry's references are dequantized GGUF files "
         "(SmolLM2: Q4_1, asymmetric 4-bit in blocks of 32; Qwen2.5-Coder and Gemma-3: Q4_K_M "
         "with their fallbacks), so the reference weights already lie on a 4-bit grid of 32- "
         "(or 256-) blocks. A llama.cpp format with the same blocks can land on that grid "
         "again (the Q4_1 row on SmolLM2), while tasa's groups of 128 and GPTQ's cannot: "
         "llama.cpp's 4.5-bit rows are favoured here in a way they would not be on original "
         "bf16 weights, which no package on this machine ships.", "",
         "Rows: `TASA c<b>` = the tasa job with its defaults at <b> code bits (GPTQ-MSE, the "
         "in-group Hadamard rotation, 8-bit embedding/head; one measurement for every budget); "
         "`GPTQ W<w> g128` = uniform GPTQ as GPTQModel makes it (group 128, symmetric, "
         "act-order, no rotation; tasa's GPTQ with its MSE scale search; general-text "
         "calibration); `tasa W<w> +had` = the same with tasa's rotation (the same bytes); "
         "`llama.cpp <mix>` = llama.cpp's quantizer with an importance matrix from the same "
         "general-text calibration; `TASA c<b> -> GGUF` = that TASA folder's plan exported by "
         "`tasa export --gguf` (llama.cpp's own quantizer and types, tasa's importance matrix "
         "at alpha*: llama.cpp has no rotation, so the export quantizes unrotated weights); "
         "`TASA fit @<mix>` = `tasa export --gguf --size-mb` at exactly that llama.cpp mix's "
         "file size, with that mix's embedding and head types: the TASA measurement fitted to "
         "llama.cpp's type menu for the decoder linears (tasa.gguf_fit: each "
         "type's Hessian-weighted error on the alpha* mix x the unit's gain calibrated on its "
         "probes, a knapsack over the real bytes); `proxy fit @<mix>` = the same with every "
         "gain 1 (the task-aware Hessian alone, no probes); `TASA fit w/o lossless @<mix>` = "
         "the TASA fit without, per tensor, the types whose measured error is exactly 0 (the "
         "reference was dequantized from such a grid, e.g. Q4_1 and Q5_1 on SmolLM2: "
         "re-quantizing to it is lossless here and would not be on original weights; a "
         "control for how much of a fit's lead is that artifact).", "",
         f"Texts: general = WikiText-2 test, {scores['general']['reference']['pos']} positions; "
         f"GSM8K = test questions + gold solutions, {scores['gsm8k']['reference']['pos']} "
         f"positions (NLL = gold-solution NLL in nats/token); ARC = {len(scores['arc']['reference']['correct'])} "
         f"ARC-Easy test items (accuracy: sum log-likelihood of each choice; KL over question + "
         f"correct answer, {scores['arc']['reference']['pos']} positions).", "",
         "| row | MB | bits/param | linear | KL general | top-1 gen | KL GSM8K | GSM8K NLL | KL ARC | ARC acc |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for n in order:
        r = rows[n]
        g, m, a = scores["general"][n], scores["gsm8k"][n], scores["arc"][n]
        L.append(f"| {n} | {r['bytes'] / 1e6:.1f} | {r['bpp']:.3f} | "
                 f"{r['linear_bits']:.3f} | {fmt_ci(g['kl'], ci95(g['kl_seq'])[1])} | "
                 f"{g['top1']:.4f} | {fmt_ci(m['kl'], ci95(m['kl_seq'])[1])} | "
                 f"{m['nll']:.4f} | {fmt_ci(a['kl'], ci95(a['kl_seq'])[1])} | "
                 f"{fmt_ci(a['acc'], ci95(a['correct'])[1], 3)} |")
    L += ["", "Paired differences between rows neighbouring in size (next minus previous; "
          "95% t-intervals over the same sequences / items):", "",
          "| from -> to | Δbits/param | ΔKL general | ΔKL GSM8K | ΔGSM8K NLL | ΔARC acc |",
          "|---|---|---|---|---|---|"]
    q = [n for n in order if n != "reference"]

    def pair(a_, b_):
        def d(text, key):
            return ci95([y - x for x, y in zip(scores[text][a_][key], scores[text][b_][key])])
        return (f"| {a_} -> {b_} | {rows[b_]['bpp'] - rows[a_]['bpp']:+.3f} | "
                f"{fmt_ci(*d('general', 'kl_seq'))} | {fmt_ci(*d('gsm8k', 'kl_seq'))} | "
                f"{fmt_ci(*d('gsm8k', 'nll_seq'))} | {fmt_ci(*d('arc', 'correct'), 3)} |")
    for a_, b_ in zip(q, q[1:]):
        L.append(pair(a_, b_))
    fits = [(n.rsplit("@", 1)[1], n) for n in q if " fit " in n and "@" in n]
    if fits:
        L += ["", "Each fitted export against the llama.cpp mix of its size (fit minus mix; "
              "negative = the fit is closer to the reference):", "",
              "| mix -> fit | Δbits/param | ΔKL general | ΔKL GSM8K | ΔGSM8K NLL | ΔARC acc |",
              "|---|---|---|---|---|---|"]
        for mix, n in fits:
            if f"llama.cpp {mix}" in rows:
                L.append(pair(f"llama.cpp {mix}", n))
    L += target_section(rows, scores)
    L += ["", "llama.cpp tensor types (2-D tensors; rows that are no multiple of 256 cannot "
          "hold k-quants and take llama.cpp's fallback types):", ""]
    for n in order:
        if "types" in rows[n]:
            L.append(f"- {n}: {rows[n]['types']}; token_embd {rows[n]['embedding']}, output "
                     f"{rows[n]['output']}")
    return "\n".join(L) + "\n"


COMPETITORS = ("GPTQ ", "llama.cpp ")
TARGET_METRICS = (("general", "kl_seq", "KL general"), ("gsm8k", "kl_seq", "KL GSM8K"),
                  ("gsm8k", "nll_seq", "GSM8K NLL"))


def verdict(mean, half):
    """A paired difference (tasa minus competitor) in words: below / on / above the
    competitor, by its 95% interval."""
    if not math.isfinite(half):
        return "below" if mean < 0 else "on" if mean == 0 else "above"
    return "below" if mean + half < 0 else "above" if mean - half > 0 else "on (within noise)"


def target_section(rows, scores) -> list:
    """Issue 26's targets, row by row: for every GPTQ and llama.cpp row, the tasa row of at most
    its whole-file size that is closest to the reference on each metric (tasa's best curve at
    that size), the paired difference and its verdict; then each fitted export against the
    llama.cpp mix of its size on GSM8K-text KL. Fits that may pick a type the reference was
    dequantized from (re-quantizing to it is lossless here, not on original weights) are left
    out of tasa's curve; their ``w/o lossless`` controls stay in."""
    comp = sorted((n for n in rows if n.startswith(COMPETITORS)), key=lambda n: rows[n]["bpp"])
    ours = [n for n in rows if n != "reference" and not n.startswith(COMPETITORS)
            and not (" fit @" in n)]
    if not comp or not ours:
        return []
    L = ["", "Targets (issue 26): at each GPTQ / llama.cpp row's whole-file size, the tasa row of at "
         "most that size closest to the reference on each metric (`TASA fit` / `proxy fit` rows "
         "left out: they may re-use the reference's own grid; their `w/o lossless` controls "
         "count), tasa minus competitor with its paired 95% interval; `below` = tasa's curve lies "
         "below the competitor's there beyond noise:", "",
         "| competitor | bits/param | " + " | ".join(
             f"{label}: best tasa row, Δ, verdict" for _, _, label in TARGET_METRICS) + " |",
         "|---|---|" + "---|" * len(TARGET_METRICS)]
    def diff(text, key, a, b):          # b minus a over the same sequences
        return ci95([y - x for x, y in zip(scores[text][a][key], scores[text][b][key])])

    tally = {}
    for c in comp:
        cells = []
        for text, key, label in TARGET_METRICS:
            cand = [n for n in ours if rows[n]["bpp"] <= rows[c]["bpp"] * (1 + 1e-6)]
            if not cand:
                cells.append("no tasa row this small")
                tally.setdefault(label, []).append("none")
                continue
            best = min(cand, key=lambda n: float(np.mean(scores[text][n][key])))
            m, h = diff(text, key, c, best)
            v = verdict(m, h)
            tally.setdefault(label, []).append(v.split()[0])
            cells.append(f"{best} ({rows[best]['bpp']:.3f}): {fmt_ci(m, h)}, {v}")
        L.append(f"| {c} | {rows[c]['bpp']:.3f} | " + " | ".join(cells) + " |")
    L += ["", "Verdicts over the competitor rows: " + "; ".join(
        f"{label}: " + ", ".join(f"{k} {v.count(k)}" for k in ("below", "on", "above", "none")
                                 if v.count(k)) for label, v in tally.items()) + "."]
    fits = [(n.rsplit("@", 1)[1], n) for n in rows if " fit" in n and "@" in n]
    pairs = [(f"llama.cpp {mix}", n) for mix, n in fits if f"llama.cpp {mix}" in rows]
    if pairs:
        L += ["", "Fitted TASA exports against llama.cpp's own mix of the same size, GSM8K-text "
              "KL (fit minus mix): " + "; ".join(
                  f"{n}: {fmt_ci(*diff('gsm8k', 'kl_seq', mx, n))} "
                  f"({verdict(*diff('gsm8k', 'kl_seq', mx, n))})" for mx, n in pairs) + "."]
    return L


def plot(model_name, rows, scores, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    fams = {"TASA c": ("tab:red", "o"), "GPTQ": ("tab:blue", "s"), "llama.cpp": ("tab:green", "^"),
            "-> GGUF": ("tab:purple", "D"), "tasa W": ("tab:orange", "v"),
            "TASA fit": ("tab:brown", "*"), "proxy fit": ("tab:gray", "x"),
            "fit w/o": ("tab:pink", "P")}

    def fam(n):
        for k in ("fit w/o", "TASA fit", "proxy fit", "-> GGUF", "TASA c", "tasa W", "GPTQ",
                  "llama.cpp"):
            if k in n:
                return k
    for ax, (text, title) in zip(axes, (("general", "KL, general text"),
                                         ("gsm8k", "KL, GSM8K solutions"),
                                         ("arc", "KL, ARC answers"))):
        for k, (col, mk) in fams.items():
            pts = sorted((rows[n]["bpp"], scores[text][n]["kl"], n) for n in rows
                         if n != "reference" and fam(n) == k)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=mk, color=col, label=k)
        ax.set_xlabel("whole-file bits per parameter")
        ax.set_ylabel("mean KL to the reference (nats)")
        ax.set_yscale("log")
        ax.set_title(f"{model_name}: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--budgets", default="3.0,3.5,4.0,4.25")
    ap.add_argument("--export-budgets", default="3.5,4.25")
    ap.add_argument("--rotated", default="3,4",
                    help="widths of uniform rows with tasa's rotation beside the GPTQ rows")
    ap.add_argument("--fit", default="IQ4_XS,Q3_K_M",
                    help="llama.cpp mixes whose file size a fitted export is made at")
    ap.add_argument("--fit-scorings", default="tasa,proxy")
    ap.add_argument("--no-fit-lossless-control", dest="fit_lossless_control",
                    action="store_false",
                    help="leave out the TASA fit row per mix that may not use a type the "
                         "reference re-quantizes to losslessly (its own grid)")
    ap.add_argument("--general-tokens", type=int, default=20480)
    ap.add_argument("--task-tokens", type=int, default=20480)
    ap.add_argument("--mc", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    args.budgets = [float(x) for x in args.budgets.split(",")]
    args.export_budgets = [float(x) for x in args.export_budgets.split(",") if x]
    args.rotated = [int(x) for x in args.rotated.split(",") if x]
    args.fit = [x for x in args.fit.split(",") if x]
    args.fit_scorings = [x for x in args.fit_scorings.split(",") if x]
    unknown = [m for m in args.fit if m not in LLAMA_MIXES]
    if unknown:
        ap.error(f"--fit: {unknown} are not among the llama.cpp rows {list(LLAMA_MIXES)}")
    from tasa import divergence
    from tasa.gguf_export import llama_cpp_problem
    from tasa.models import cache_dir, load_model
    why = llama_cpp_problem()     # in a child: a build for another CPU would kill this run
    if why:
        print(why, file=sys.stderr)
        return 2
    log("llama-cpp-python found")
    work = Path(args.work) if args.work else cache_dir() / "qpb" / args.model
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ref, tok, info = load_model(args.model)
    paths = {}
    paths.update(build_tasa(args.model, args, work))
    paths.update(build_gptq(args.model, args, work))
    paths.update(build_llama(args.model, args, work, ref, tok))
    paths.update(build_exports(args.model, args, work, {k: v for k, v in paths.items()}))
    paths.update(build_fits(args.model, args, work, dict(paths)))
    rows = {n: size_of(p) for n, p in paths.items()}
    rows["reference"] = {"bytes": float("nan"), "bpp": 32.0, "linear_bits": 32.0}
    import tasa
    scorers = {"reference": HFScorer(ref)}
    for n, p in paths.items():
        scorers[n] = LlamaScorer(p) if p.suffix == ".gguf" else HFScorer(tasa.load(p))
    # one cache file per text and its settings (a later run with another --mc keeps the texts
    # already scored); the older combined files are read too
    def cached(text, tag, compute):
        f = work / f"scores-{text}-{tag}.json"
        stored = json.loads(f.read_text()) if f.is_file() else {}
        got = stored if f.is_file() else None
        if got is None:
            for old in work.glob("scores-g*-t*-mc*-s*.json"):
                g, t, mc, sd = old.stem.split("-")[1:]
                want = {"general": g == f"g{args.general_tokens}",
                        "gsm8k": t == f"t{args.task_tokens}",
                        "arc": mc == f"mc{args.mc}" and sd == f"s{args.seed}"}[text]
                d = json.loads(old.read_text())
                if want and text in d:
                    got = d[text]
        got = {n: r for n, r in (got or {}).items() if n in scorers}
        todo = [n for n in scorers if n not in got]
        if todo:                      # only the rows not scored yet (the reference is re-run)
            log(f"{text}: scoring {', '.join(n for n in todo if n != 'reference')}")
            sc = {n: scorers[n] for n in ["reference"] + todo}
            items = compute()
            ckpt = Checkpoint(work / f"partial-{text}-{tag}.json", sc, len(items))
            new = (score_mc if text == "arc" else score_text)(sc, items, text, ckpt)
            got.update({n: new[n] for n in todo})
            stored.update(got)                # rows scored before and not asked now are kept
            f.write_text(json.dumps(stored))
            ckpt.clear()
        return got

    scores = {
        "general": cached("general", f"g{args.general_tokens}", lambda: list(
            divergence.kl_sequences(tok, "general", data=args.data,
                                    max_tokens=args.general_tokens, seqlen=512))),
        "gsm8k": cached("gsm8k", f"t{args.task_tokens}", lambda: list(
            divergence.kl_sequences(tok, "gsm8k", data=args.data,
                                    max_tokens=args.task_tokens, seqlen=512))),
        "arc": cached("arc", f"mc{args.mc}-s{args.seed}", lambda: mc_items(
            tok, args.data, args.mc, args.seed))}
    meta = machine()
    meta.update({"model": args.model, "model_note": info.note(),
                 "command": "python benchmarks/quality_per_byte.py " + " ".join(
                     sys.argv[1:] if argv is None else argv),
                 "seconds": time.time() - t0, "work": str(work)})
    stem = f"quality_per_byte_{args.model}"
    md = write_report(args.model, rows, scores, meta, stem)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(md)
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "summary": {t: {n: {k: v for k, v in r.items()
                                                          if not k.endswith("_seq") and k != "correct"}
                                                      for n, r in s.items()}
                                                  for t, s in scores.items()}}, indent=1))
    plot(args.model, rows, scores, RESULTS / f"{stem}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
