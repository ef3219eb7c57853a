"""The whole ``tasa quantize`` job: load, measure (or re-use a measurement), allocate, quantize,
save, evaluate quickly, report. The stages themselves are in :mod:`tasa.pipeline.stages`."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import platform
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn
from transformers import AutoTokenizer

import tasa_ext

from .. import alloc, corpora, defaults, distributed, divergence, lazy
from .. import storage as tio
from ..storage import check_output_folder
from ..measurement import Measurement
from ..modelquant import embedding_widths, quantize_embeddings, whole_model_estimate
from ..models import ModelInfo, load_model
from ..quant import LayerSpec, check_plan, default_targets, get_method, plan_from_dict, plan_shapes, plan_to_dict, read_plan
from ..report import quality_lines, write_report
from ..util import Log, clean_stale_temps, folder_lock, peak_rss_mib, write_json_atomic
from .config import PipelineConfig
from .stages import (CALIB_BATCH, allocate, as_layer_specs, check_budget, check_same_model,
                     gptq_calibration, measure, measure_fingerprint, plan_document,
                     quantize_with_plan, split_data, with_rotation)

__all__ = ["run", "run_lazy"]


def _given_plan(plan) -> tuple:
    """``(plan {name: LayerSpec}, document)`` of a plan given as a file, a parsed document or
    ``{name: LayerSpec}`` (the one reader of given plans: the CLI's --plan and tasa.quantize's
    ``plan=`` both come here)."""
    if isinstance(plan, (str, os.PathLike)):
        return read_plan(plan)
    if plan and all(isinstance(v, LayerSpec) for v in plan.values()):
        return dict(plan), plan_to_dict(plan)
    return plan_from_dict(plan), dict(plan)


def _given_alpha(cfg: PipelineConfig, doc: dict) -> float:
    """GPTQ's mixing ratio with a given plan: ``cfg.alpha``, else the plan's recorded alpha,
    else general text only."""
    return float(cfg.alpha if cfg.alpha is not None else doc.get("alpha", 1.0))


def _write_given_plan(out: Path, given, shapes, doc: dict) -> None:
    """The given plan as ``out/plan.json``, with its shapes and its own metadata."""
    write_json_atomic(out / defaults.PLAN_NAME, plan_to_dict(
        given, shapes, **{k: v for k, v in doc.items()
                          if k not in ("kind", "version", "format_version", "layers")}))


@contextlib.contextmanager
def _no_library_bars():
    """``progress=False`` silences every bar, transformers' own too (its "Loading weights" and
    "Writing model shards" bars ignore tasa's flag); the previous setting comes back after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _recorded_config(cfg: PipelineConfig, plan_given: bool) -> dict:
    """The settings as run.json and the folder's metadata record them: with a given plan the
    budget (``bits``/``budget``) was not used, so it is not recorded as if it had been."""
    d = dataclasses.asdict(cfg)
    if plan_given:
        d["bits"] = d["budget"] = None
    return d


def run(cfg: PipelineConfig, out, fresh: bool = False, measurement_from: Optional[str] = None,
        progress: bool = True, quiet: bool = False, report: bool = True,
        model: Optional[nn.Module] = None, tokenizer=None, plan=None) -> dict:
    """The whole job (module docstring). Writes into ``out``: the quantized model as a
    transformers folder (``config.json`` with the tasa ``quantization_config``,
    ``model.safetensors``, ``generation_config.json``, tokenizer), ``plan.json``,
    ``measurement.json``, ``report.md``, ``*.png``, ``run.json``. Returns the run summary.
    ``model``/``tokenizer``: an already-built model to use instead of loading ``cfg.model``
    (it is quantized in place). ``plan``: a plan file (or its parsed document) to quantize with
    instead of measuring and allocating -- no measurement, no report; GPTQ calibrates with
    ``cfg.alpha``, else the plan's recorded alpha, else general text only.

    Under torchrun (or in an initialised process group) the ranks share the work
    (:mod:`tasa.distributed`); rank 0 alone writes into ``out``, the others' copies of the
    files go to a private temporary folder that is removed at the end."""
    cfg.validate()
    out = Path(out)
    distributed.init_from_env()
    dist = distributed.current()
    with contextlib.ExitStack() as stack:
        if not progress:
            stack.enter_context(_no_library_bars())
        with dist.guard("the checks of --out"):      # an error here stops every rank at once
            if dist.is_writer:
                if out.exists() and not out.is_dir():
                    raise ValueError(f"tasa: --out {out} is a file, not a folder")
                if (model is None and Path(cfg.model).is_dir()
                        and Path(cfg.model).resolve() == out.resolve()):
                    raise ValueError(f"tasa: --out {out} is the --model folder; writing there "
                                     f"would replace the source checkpoint. Choose another --out")
                check_output_folder(out)
                stack.enter_context(folder_lock(out))
                removed = clean_stale_temps(out)
            else:
                out = Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix=f"tasa-rank{dist.rank}-")))
                removed, quiet, report = [], True, False
        return _run(cfg, out, fresh, measurement_from, progress and dist.is_writer, quiet, report,
                    model, tokenizer, plan, removed=removed, dist=dist, stack=stack)


def _run(cfg, out, fresh, measurement_from, progress, quiet, report, model, tokenizer, plan, *,
         removed, dist, stack):
    log = Log(quiet)
    if removed:
        log(f"removed what an interrupted run left in {out}: {', '.join(removed)}")
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    if model is None:
        model, tok, info = load_model(cfg.model)
    else:
        if tokenizer is None and (plan is None or get_method(cfg.method).needs_hessian):
            raise ValueError("tasa: pass the tokenizer together with the model (only a "
                             "data-free method with a given plan runs without one)")
        tok = tokenizer
        info = getattr(model, "tasa_info", None) or ModelInfo(cfg.model, "in-memory")
    timings["load"] = time.perf_counter() - t
    log(info.note())
    doc = None
    if plan is not None:
        if measurement_from is not None:
            raise ValueError("tasa: give either a plan or a measurement to re-use, not both")
        given, doc = _given_plan(plan)
        check_plan(model, given, plan_shapes(doc))
    else:
        check_budget(model, cfg)
    # the data: measuring, and calibrating a method that needs a Hessian (a data-free method
    # with a given plan reads none)
    needs_data = plan is None or get_method(cfg.method).needs_hessian
    split = split_data(cfg) if needs_data else None
    mpath = out / defaults.MEASUREMENT_NAME
    m = None
    if plan is not None:
        log(f"quantizing with the given plan ({len(given)} linears; no measurement)")
    elif measurement_from is not None:
        m = Measurement.load(measurement_from)
        fp = measure_fingerprint(model, cfg)
        check_same_model(m, fp, str(measurement_from), log)
        m.config = fp
        if not m.complete:
            raise ValueError(f"tasa: {measurement_from} is incomplete; resume it with its own --out")
        m.save(mpath)
        log(f"re-using the measurement {measurement_from} (no calibration)")
    else:
        t = time.perf_counter()
        m = measure(model, tok, cfg, mpath, fresh=fresh, progress=progress, log=log, split=split,
                    dist=dist)
        timings["measure"] = time.perf_counter() - t
    wt_text = corpora.load_wikitext2(cfg.data, "test") if cfg.eval_windows > 0 else None

    # How far the model moves (issue 27 item 4): the reference's top-k next-token
    # distributions on the first eval windows of WikiText-2 test and on held-out GSM8K test
    # items, kept while the model is quantized in place, then KL / top-1 / NLL of the
    # quantized model on the same tokens (perplexity = exp of the general text's NLL, the
    # quick check run.json always had).
    drift_seqs = {}
    if cfg.eval_windows > 0 and dist.is_writer and tok is not None:
        drift_seqs["general"] = divergence.text_windows(tok, wt_text, cfg.eval_windows,
                                                        cfg.eval_seqlen)
        try:
            drift_seqs["gsm8k"] = divergence.kl_sequences(
                tok, "gsm8k", data=cfg.data, max_tokens=defaults.DRIFT_TASK_TOKENS,
                seqlen=min(1024, getattr(model.config.get_text_config(),
                                         "max_position_embeddings", None) or 1024))
        except (OSError, ValueError) as e:
            log(f"note: no GSM8K drift check ({e})")

    def drift_pass(stage, refs=None):
        if not drift_seqs:
            return None
        t = time.perf_counter()
        with torch.inference_mode():
            r = {text: (divergence.reference_top(model, seqs, progress=progress,
                                                 desc=f"reference ({text})") if refs is None
                        else divergence.drift(model, seqs, refs[text], progress=progress,
                                              desc=f"KL ({text})"))
                 for text, seqs in drift_seqs.items()}
        timings[stage] = time.perf_counter() - t
        return r

    ref_top = drift_pass("eval_reference")     # before the model is quantized in place
    shapes = {f: (mod.out_features, mod.in_features) for f, mod in default_targets(model).items()}
    # a model from an earlier run in this folder stops being one before the new plan is
    # written (never a new plan beside the old model); a failure before the new model is saved
    # (disk full, an error, Ctrl-C) puts the old one back (tio.ReplacingModel)
    swap = stack.enter_context(tio.ReplacingModel(out))
    if plan is None:       # allocation
        t = time.perf_counter()
        A = allocate(m, cfg.bits, cfg.beta, cfg.widths, cfg.intra, cfg.act_order,
                     budget=cfg.budget)
        timings["allocate"] = time.perf_counter() - t
        write_json_atomic(out / defaults.PLAN_NAME, plan_document(m, A))
        the_plan, alpha, summary_ = A["plan"], float(m.mixture.alpha_star), A["summary"]
    else:
        A = None
        the_plan = given
        alpha = _given_alpha(cfg, doc)
        pshapes = {f: shapes[f] for f in given if f in shapes}
        summary_ = alloc.plan_summary({f: s.to_dict() for f, s in given.items()}, pshapes)
        _write_given_plan(out, given, pshapes, doc)
    whole = whole_model_estimate(model, as_layer_specs(the_plan), cfg.embed_bits, cfg.group_size,
                                 cfg.mode, cfg.head_bits)
    log(f"plan: decoder linears {summary_['avg_bits']:.4f} average bits stored, "
        f"{summary_['code_avg_bits']:.4f} code bits (budget "
        f"{f'{cfg.bits} {cfg.budget} bits' if plan is None else 'given'}); widths "
        + ", ".join(f"{b}-bit {100 * f:.1f}%" for b, f in summary_["width_fraction"].items())
        + f"; whole model ~{whole['bytes'] / 1e6:.1f} MB, {whole['bits_per_param']:.2f} bits per "
          f"parameter (embedding / head at "
          + ("their stored precision" if cfg.embed_bits == 0 else
             "{1}/{2} bits".format(*embedding_widths(model, cfg.embed_bits, cfg.head_bits)))
          + ")")
    # quantization
    t = time.perf_counter()
    lplan, qinfo = quantize_with_plan(model, tok, cfg, the_plan, alpha, progress=progress, log=log,
                                      split=split, shapes=plan_shapes(doc) if doc else None,
                                      dist=dist)
    embedding = None
    if cfg.embed_bits != 0:
        embedding = quantize_embeddings(model, cfg.embed_bits, cfg.group_size, cfg.mode,
                                        cfg.head_bits)
        log(f"{embedding['module']}{' + tied ' + embedding['head'] if embedding['tied'] else ''}: "
            f"RTN {embedding['bits']}-bit" + (f", head {embedding['head_bits']}-bit" if not
                                               embedding["tied"] and embedding["head"] else "")
            + f", {embedding['avg_bits']:.4f} average bits (counted apart "
            f"from the decoder linears)")
    timings["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    if dist.is_writer:
        tio.save_quantized(model, out, lplan,
                           tokenizer=tok if hasattr(tok, "save_pretrained") else None, meta={
            "method": cfg.method, "tasa_pipeline": _recorded_config(cfg, plan is not None),
            "alpha": alpha,
            "avg_bits": summary_["avg_bits"], "code_avg_bits": summary_["code_avg_bits"],
            "embedding": embedding})
    swap.commit()
    timings["save"] = time.perf_counter() - t
    size = tio.model_size(out) if dist.is_writer else None
    scores = drift_pass("eval_quantized", ref_top)
    drift = None if scores is None else {
        text: {**divergence.summarize(sc)["quantized"],
               "nll_reference": sc["reference"]["nll"],
               "ppl_reference": math.exp(sc["reference"]["nll"]),
               "sequences": len(sc["quantized"]["kl_seq"])}
        for text, sc in scores.items()}
    timings["total"] = time.perf_counter() - t_start
    summary = {
        "model": cfg.model, "model_note": info.note(),
        "config": _recorded_config(cfg, plan is not None),
        "target_bits": None if plan is not None else cfg.bits,
        "alpha_star": alpha, "avg_bits": summary_["avg_bits"],
        "code_avg_bits": summary_["code_avg_bits"],
        "width_fraction": summary_["width_fraction"], "plan_given": plan is not None,
        "embedding": embedding,
        "size": size,
        "ppl_reference": None if drift is None else drift["general"]["ppl_reference"],
        "ppl_quantized": None if drift is None else drift["general"]["ppl"],
        "ppl_protocol": None if drift is None else {
            "windows": drift["general"]["sequences"], "seqlen": cfg.eval_seqlen,
            "tokens": drift["general"]["tokens"] - drift["general"]["sequences"],
            "text": "WikiText-2 test (" + ("shipped slice" if cfg.data is None else str(cfg.data)) + ")"},
        # report.quality_lines reads these two: KL on the general text, task NLLs
        "kl": None if drift is None else drift["general"]["kl"],
        "task_nll": None if drift is None else {
            t: {"reference": d["nll_reference"], "quantized": d["nll"]}
            for t, d in drift.items() if t != "general"},
        "drift": drift,
        "drift_protocol": None if drift is None else (
            f"KL(reference || quantized) of the next-token distribution at every position, over "
            f"the reference's top {divergence.KL_TOP_K} tokens + one bucket for the rest (a "
            f"lower bound of the full KL); general = the first {cfg.eval_windows} windows of "
            f"{cfg.eval_seqlen} tokens of WikiText-2 test, gsm8k = GSM8K test items (held out "
            f"from calibration and sensitivity; NLL over the gold solutions), up to "
            f"{defaults.DRIFT_TASK_TOKENS} tokens; 95% t-intervals over sequences"),
        "quantization": qinfo, "timings_s": timings, "peak_rss_mib": peak_rss_mib(),
        "distributed": {"world_size": dist.world, "backend": dist.backend,
                        "max_over_mean_work": dict(dist.balance)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "tasa_cpu_isa": tasa_ext.build_info().get("cpu_isa")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_json_atomic(out / defaults.RUN_NAME, summary)
    if report and m is not None:
        write_report(out, m, A, summary)
    log(f"done in {timings['total']:.0f} s: {out}" + (
        f" -- {tio.size_line(size)}; the decoder linears average {summary_['avg_bits']:.3f} "
        f"bits (what --bits budgets)" if size else ""))
    if drift:     # in words, as report.md opens its result (a large loss is never silent)
        for line in quality_lines(summary, None if plan is not None else cfg.bits, cfg.widths,
                                  "--code-bits" if cfg.budget == "code" else "--bits"):
            if line:
                log(line.replace("**", ""))
    if dist.is_writer:
        log(f"how far it drifts from the reference, token by token: tasa eval --kl --quantized "
            f"{out}" + ("" if cfg.data is None else f" --data {cfg.data}"))
    return summary


def run_lazy(cfg: PipelineConfig, out, plan, progress: bool = True, quiet: bool = False) -> dict:
    """``tasa quantize --lazy``: quantize the safetensors checkpoint folder ``cfg.model`` with a
    given ``plan`` (file or parsed document) block by block (:func:`tasa.lazy.quantize_lazy`:
    the model is never held whole; peak host memory near one block plus the calibration
    activations). GPTQ calibrates as :func:`run` does with a plan (``cfg.alpha``, else the
    plan's recorded alpha, else general text only), so the packed weights are the same bits as
    ``tasa quantize --plan`` without ``--lazy``. Not lazy: the measurement (its probes rerun
    every later block per unit); measure on a machine that holds the model, or reuse a
    ``measurement.json`` with ``tasa allocate``. Writes the model folder, ``plan.json`` and
    ``run.json``; returns the run summary."""
    cfg.validate()
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise ValueError(f"tasa: --lazy reads a local checkpoint folder of safetensors; "
                         f"{cfg.model!r} is not a folder")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"tasa: --out {out} is a file, not a folder")
    distributed.init_from_env()
    dist = distributed.current()
    # the folder lock is held here, for the whole job, as run() holds it
    with (folder_lock(out) if dist.is_writer else contextlib.nullcontext()):
        return _run_lazy(cfg, folder, out, plan, progress, quiet, dist)


def _run_lazy(cfg, folder, out, plan, progress, quiet, dist) -> dict:
    log = Log(quiet or not dist.is_writer)
    t0 = time.perf_counter()
    given, doc = _given_plan(plan)
    given = with_rotation(cfg, given)
    alpha = _given_alpha(cfg, doc)
    calib_ids, qinfo = None, {"method": cfg.method, "hadamard": cfg.rotates()}
    if get_method(cfg.method).needs_hessian:
        calib_ids, qinfo["calibration"] = gptq_calibration(
            AutoTokenizer.from_pretrained(str(folder)), cfg, alpha, split_data(cfg), log)
    # (n_out, k_in) of every planned linear, from the plan or else the checkpoint's headers
    shapes = plan_shapes(doc) or lazy.Checkpoint(folder).linear_shapes(given)
    log(f"lazy: {folder} block by block with the given plan ({len(given)} linears)")
    res = lazy.quantize_lazy(folder, given, out, method=cfg.method, calib_ids=calib_ids,
                             damp=cfg.damp, batch_size=CALIB_BATCH, progress=progress,
                             dist=dist, meta={"alpha": alpha,
                                              "tasa_pipeline": _recorded_config(cfg, True)},
                             embed_bits=cfg.embed_bits, group_size=cfg.group_size,
                             mode=cfg.mode, head_bits=cfg.head_bits, lock=False)
    summary_ = alloc.plan_summary({f: s.to_dict() for f, s in given.items()}, shapes)
    summary = {"model": cfg.model, "lazy": True, "alpha_star": alpha, "plan_given": True,
               "avg_bits": summary_["avg_bits"], "code_avg_bits": summary_["code_avg_bits"],
               "quantization": {**qinfo, "seconds": res["seconds"],
                                "block_seconds": res["block_seconds"]},
               "timings_s": {"total": time.perf_counter() - t0}, "peak_rss_mib": peak_rss_mib(),
               "ppl_reference": None, "ppl_quantized": None,
               "distributed": {"world_size": dist.world, "backend": dist.backend},
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if dist.is_writer:
        summary["size"] = tio.model_size(out)
        _write_given_plan(out, given, shapes, doc)
        write_json_atomic(out / defaults.RUN_NAME, summary)
    log(f"done in {summary['timings_s']['total']:.0f} s: {out}"
        + (f" -- {tio.size_line(summary['size'])}" if summary.get("size") else ""))
    return summary
