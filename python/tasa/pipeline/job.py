"""The whole ``tasa quantize`` job: load, measure (or re-use a measurement), allocate, quantize,
save, evaluate quickly, report. The stages themselves are in :mod:`tasa.pipeline.stages`."""
from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

import tasa_ext

from .. import data, defaults
from .. import io as tio
from ..measurement import Measurement
from ..models import ModelInfo, load_model
from ..ppl import perplexity
from ..report import write_report
from ..util import peak_rss_mib, write_json_atomic
from .config import PipelineConfig
from .stages import Log, allocate, check_budget, measure, plan_document, quantize_with_plan, split_data

__all__ = ["run"]


def run(cfg: PipelineConfig, out, fresh: bool = False, measurement_from: Optional[str] = None,
        progress: bool = True, quiet: bool = False, report: bool = True,
        model: Optional[nn.Module] = None, tokenizer=None) -> dict:
    """The whole job (module docstring). Writes into ``out``: the quantized model
    (``model.safetensors`` + ``tasa_config.json`` + tokenizer), ``plan.json``,
    ``measurement.json``, ``report.md``, ``*.png``, ``run.json``. Returns the run summary.
    ``model``/``tokenizer``: an already-built model to use instead of loading ``cfg.model``
    (it is quantized in place)."""
    cfg.validate()
    log = Log(quiet)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    if model is None:
        model, tok, info = load_model(cfg.model)
    else:
        if tokenizer is None:
            raise ValueError("tasa: pass the tokenizer together with the model")
        tok = tokenizer
        info = getattr(model, "tasa_info", None) or ModelInfo(cfg.model, "in-memory")
    timings["load"] = time.perf_counter() - t
    log(info.note())
    check_budget(model, cfg)
    split = split_data(cfg)
    mpath = out / defaults.MEASUREMENT_NAME
    if measurement_from is not None:
        m = Measurement.load(measurement_from)
        m.check_settings(cfg.measure_fingerprint(), str(measurement_from))
        if not m.complete:
            raise ValueError(f"tasa: {measurement_from} is incomplete; resume it with its own --out")
        m.save(mpath)
        log(f"re-using the measurement {measurement_from} (no calibration)")
    else:
        t = time.perf_counter()
        m = measure(model, tok, cfg, mpath, fresh=fresh, progress=progress, log=log, split=split)
        timings["measure"] = time.perf_counter() - t
    wt_text = data.load_wikitext2(cfg.data, "test")

    def quick_ppl(stage):
        if cfg.eval_windows <= 0:
            return None
        t = time.perf_counter()
        r = perplexity(model, tok, wt_text, seqlen=cfg.eval_seqlen, max_windows=cfg.eval_windows,
                       progress=progress)
        timings[stage] = time.perf_counter() - t
        return r

    ref_ppl = quick_ppl("eval_reference")     # before the model is quantized in place
    # allocation
    t = time.perf_counter()
    A = allocate(m, cfg.bits, cfg.beta, cfg.widths, cfg.intra, cfg.act_order)
    timings["allocate"] = time.perf_counter() - t
    write_json_atomic(out / defaults.PLAN_NAME, plan_document(m, A))
    log(f"plan: {A['summary']['avg_bits']:.4f} average bits (budget {cfg.bits}); widths "
        + ", ".join(f"{b}-bit {100 * f:.1f}%" for b, f in A["summary"]["width_fraction"].items()))
    # quantization
    t = time.perf_counter()
    alpha = float(m.mixture.alpha_star)
    lplan, qinfo = quantize_with_plan(model, tok, cfg, A["plan"], alpha, progress=progress, log=log,
                                      split=split)
    timings["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    tio.save_quantized(model, out, lplan,
                       tokenizer=tok if hasattr(tok, "save_pretrained") else None, meta={
        "tasa_pipeline": dataclasses.asdict(cfg), "alpha": alpha,
        "avg_bits": A["summary"]["avg_bits"]})
    timings["save"] = time.perf_counter() - t
    q_ppl = quick_ppl("eval_quantized")
    timings["total"] = time.perf_counter() - t_start
    summary = {
        "model": cfg.model, "model_note": info.note(), "config": dataclasses.asdict(cfg),
        "alpha_star": alpha, "avg_bits": A["summary"]["avg_bits"],
        "width_fraction": A["summary"]["width_fraction"],
        "ppl_reference": None if ref_ppl is None else ref_ppl["ppl"],
        "ppl_quantized": None if q_ppl is None else q_ppl["ppl"],
        "ppl_protocol": None if q_ppl is None else {
            "windows": q_ppl["windows"], "seqlen": q_ppl["seqlen"], "tokens": q_ppl["tokens"],
            "text": "WikiText-2 test (" + ("shipped slice" if cfg.data is None else str(cfg.data)) + ")"},
        "quantization": qinfo, "timings_s": timings, "peak_rss_mib": peak_rss_mib(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "tasa_cpu_isa": tasa_ext.build_info().get("cpu_isa")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_json_atomic(out / defaults.RUN_NAME, summary)
    if report:
        write_report(out, m, A, summary)
    log(f"done in {timings['total']:.0f} s: {out}")
    return summary
