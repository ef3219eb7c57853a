"""The TASA pipeline: measure once (mixture search + multi-objective sensitivity), allocate bits
for any budget, quantize, save, report.

Stages (``tasa quantize`` runs them all; every measured quantity lands in ``measurement.json``):

1. **Data split** (deterministic in ``seed``). General text: the last ``holdout`` fraction of
   the documents is held out (the ``ppl`` objective), the rest is the general calibration pool
   ``D_gen``. Task data (GSM8K train, ARC-Challenge + ARC-Easy validation): a seeded shuffle,
   the last ``holdout`` fraction of each is the held-out task slice ``D_test`` (for ``H_test``
   and the ``math``/``arc`` objectives), the rest is the task calibration pool ``D_task``
   (GSM8K and ARC in equal numbers of sequences). Evaluation sets (WikiText-2 test, GSM8K test,
   ARC test) are never read here except for the final perplexity check.
2. **Mixture search** (:mod:`tasa.mixture`): one block-by-block pass over ``n_gen + n_task +
   n_test`` sequences accumulates ``H_gen, H_task, H_test`` for every linear in one pass
   (``tasa.hessian_accumulate_`` with a source id per token); each block's unique Hessians are
   eigendecomposed as soon as the block is done (then freed), giving the closed-form curve
   ``f(alpha) = sum_l w_l tr(H_test (alpha H_gen + (1-alpha) H_task + lam I)^-1)``. ``alpha*``
   is its continuous argmin (or ``--alpha``). The same pass keeps ``diag(H_gen)`` and
   ``diag(H_task)``; with ``alpha*`` they give the per-group RTN errors
   ``sum_k diag(H_alpha)_k ||W_k - RTN_b(W_k)||^2`` of every linear at every width, for the
   intra-layer step.
3. **Sensitivity** (:mod:`tasa.sensitivity`): per decoder block, attention/MLP or linear
   (``granularity``), RTN of that unit alone at every width of ``sens_widths`` (or, with
   ``sens_method``, the unit alone quantized by that method: :func:`probe_weights`); loss increase
   for ``ppl``, ``math``, ``arc``, with per-item losses. Each probe is written to
   ``measurement.json`` as soon as it finishes (an interrupted run resumes there); at the end the
   rank agreement between objectives and its noise bounds (:func:`noise_bounds`).
4. **Allocation** (:mod:`tasa.alloc`, seconds, re-runnable for any budget from the measurement):
   the measured per-width errors of :func:`unit_errors` (``beta`` between ``ppl`` and the
   tasks), exact multiple-choice knapsack over ``widths`` under the budget (``budget``:
   ``"storage"``, exact ``tasa_ext.cost_bits``, or ``"code"``, the code bits alone), then per
   linear the group-level step around the chosen width using the measured per-group errors.
5. **Quantization**: GPTQ (or RTN) with a calibration set drawn with mixing ratio ``alpha*``
   (``mixture.mixture_counts``), one decoder block at a time; the model is saved with
   :func:`tasa.storage.save_quantized` (+ ``plan.json``).
6. **Report**: ``report.md`` and PNG plots (alpha curve, sensitivities, bit map), WikiText-2
   perplexity of the reference and of the quantized model on the first ``eval_windows`` windows.
"""
from __future__ import annotations

import dataclasses

import math
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

import tasa_ext

from .. import alloc, calib, corpora, defaults, mixture, sensitivity, stats
from ..measurement import Measurement, MixtureResult, SensitivityResult
from ..quant import LayerSpec, check_plan, output_error, default_targets, get_method, plan_to_dict, resolve_group_size
from ..modelquant import quantize_model
from ..util import weights_digest
from ..scoring import SCORINGS, unit_errors
from .config import PipelineConfig

__all__ = ["split_data", "mixture_calibration", "measure_mixture", "build_objectives",
           "SCORINGS", "unit_errors", "allocate", "noise_bounds", "check_budget", "plan_document", "as_layer_specs", "gptq_calibration",
           "quantize_with_plan", "with_rotation", "probe_weights", "error_widths",
           "record_unit_errors", "mixture_linear_errors", "fill_unit_errors",
           "measure", "measure_fingerprint", "weights_digest", "check_same_model"]


# ---- data -------------------------------------------------------------------------------------

def split_data(cfg: PipelineConfig) -> dict:
    """The pools of the module docstring: ``gen_calib``, ``gen_heldout`` (documents),
    ``gsm8k_calib``, ``gsm8k_heldout``, ``arc_calib``, ``arc_heldout`` (items)."""
    gen = corpora.load_general(cfg.data)
    gsm = corpora.load_gsm8k(cfg.data, "train")
    arc = corpora.load_arc(cfg.data, "challenge", "validation") + corpora.load_arc(cfg.data, "easy", "validation")
    n_gh = max(1, int(round(len(gen) * cfg.holdout)))
    if len(gen) - n_gh < 1:
        raise ValueError("tasa: not enough general documents to hold some out")

    def split(items, salt):
        items = list(items)
        random.Random(f"{cfg.seed}:{salt}").shuffle(items)
        k = max(1, int(round(len(items) * cfg.holdout)))
        if len(items) - k < 1:
            raise ValueError(f"tasa: not enough {salt} items to hold some out")
        return items[:-k], items[-k:]

    gsm_c, gsm_h = split(gsm, "gsm8k")
    arc_c, arc_h = split(arc, "arc")
    return {"gen_calib": gen[:-n_gh], "gen_heldout": gen[-n_gh:],
            "gsm8k_calib": gsm_c, "gsm8k_heldout": gsm_h, "arc_calib": arc_c, "arc_heldout": arc_h}


def _task_pools(split: dict, which: str) -> dict:
    return {"gsm8k": corpora.Pool("gsm8k", [corpora.format_gsm8k(x) for x in split[f"gsm8k_{which}"]]),
            "arc": corpora.Pool("arc", [corpora.format_arc(x) for x in split[f"arc_{which}"]])}


def mixture_calibration(tokenizer, split: dict, alpha: float, n: int, seqlen: int, seed: int):
    """The GPTQ calibration set for mixing ratio ``alpha``: ``round(alpha n)`` general
    sequences, then the task sequences (GSM8K and ARC equally). Returns ``(input_ids [n, seqlen],
    (n_general, n_task))``."""
    n_gen, n_task = mixture.mixture_counts(alpha, n)
    parts = []
    if n_gen:
        parts.append(corpora.calibration_batch(tokenizer, corpora.Pool("general", split["gen_calib"]),
                                            n_gen, seqlen, seed=seed).input_ids)
    if n_task:
        parts.append(corpora.calibration_batch(tokenizer, _task_pools(split, "calib"), n_task,
                                            seqlen, seed=seed + SEED_TASK_PART).input_ids)
    return torch.cat(parts), (n_gen, n_task)


# ---- stage 2: mixture search ------------------------------------------------------------------

# sequences per block forward in the calibration passes (run_blockwise's default); with
# torch.distributed every rank gets whole batches of this size, so results do not depend on
# the number of processes
CALIB_BATCH = 8
# one seed per draw, as offsets from cfg.seed: each draw keeps its items when another draw's
# settings change (more task sequences must not reshuffle the objectives)
SEED_MIX_GEN, SEED_MIX_TASK, SEED_MIX_TEST = 0, 1, 2        # the mixture search's sequences
SEED_OBJ_PPL, SEED_OBJ_MATH, SEED_OBJ_ARC = 3, 4, 5         # the sensitivity objectives
SEED_GPTQ = 10                                              # GPTQ's calibration mix
SEED_TASK_PART = 1         # mixture_calibration: the task part, beside the general part's seed


def _linear_specs(model: nn.Module, cfg: PipelineConfig) -> Dict[str, LayerSpec]:
    out = {}
    for name, m in default_targets(model).items():
        G = resolve_group_size(m.in_features, cfg.group_size)
        out[name] = alloc.linear_spec(name, m.out_features, m.in_features, G, cfg.mode,
                                     cfg.act_order)
    return out


def measure_mixture(model, tokenizer, split: dict, cfg: PipelineConfig,
                    progress=True, dist=None) -> MixtureResult:
    t0 = time.perf_counter()
    parts = []
    b = corpora.calibration_batch(tokenizer, corpora.Pool("general", split["gen_calib"]), cfg.n_gen,
                               cfg.mix_seqlen, seed=cfg.seed + SEED_MIX_GEN)
    parts.append(b.input_ids)
    b = corpora.calibration_batch(tokenizer, _task_pools(split, "calib"), cfg.n_task,
                               cfg.mix_seqlen, seed=cfg.seed + SEED_MIX_TASK)
    parts.append(b.input_ids)
    b = corpora.calibration_batch(tokenizer, _task_pools(split, "heldout"), cfg.n_test,
                               cfg.mix_seqlen, seed=cfg.seed + SEED_MIX_TEST)
    parts.append(b.input_ids)
    ids = torch.cat(parts)
    src = torch.tensor([0] * cfg.n_gen + [1] * cfg.n_task + [2] * cfg.n_test, dtype=torch.int64)
    specs = _linear_specs(model, cfg)
    curve = mixture.MixtureCurve(normalize=cfg.mix_normalize)
    diags: Dict[str, tuple] = {}
    shared: Dict[str, List[str]] = {}

    def on_block(idx, block, prefix, hessians):
        seen: Dict[int, str] = {}
        for lname, (H, count) in hessians.items():
            full = f"{prefix}.{lname}"
            if full not in specs:
                continue
            if (count == 0).any():
                raise ValueError(f"tasa: {full}: a calibration source produced no tokens")
            key = id(H)
            if key in seen:
                shared[seen[key]].append(full)
            else:
                seen[key] = full
                shared[full] = [full]
            diags[full] = (torch.diagonal(H[0]).clone(), torch.diagonal(H[1]).clone())
        for first in seen.values():         # this block's unique inputs, each once
            H = hessians[first[len(prefix) + 1:]][0]
            curve.add_layer(first, H[0], H[1], H[2], weight=float(len(shared[first])))
        return False

    kw = {}
    if dist is not None and dist.active:      # this rank's batches; Hessians all-reduced
        ids, src = dist.shard(ids, src, CALIB_BATCH)
        kw["reduce"] = dist.reduce_hessians
    calib.run_blockwise(model, ids, on_block, src=src, n_sources=3, progress=progress,
                        linear_filter=lambda f: f in specs, batch_size=CALIB_BATCH, **kw)
    if cfg.alpha is None:
        a_star, f_star = curve.argmin()
    else:
        a_star, f_star = float(cfg.alpha), curve(float(cfg.alpha))
    # per-group RTN errors under diag(H_alpha*), for the intra-layer step
    widths = list(tasa_ext.SUPPORTED_BITS)
    group_err, lin_err = alloc.group_error_tables(
        {n: model.get_submodule(n).weight for n in specs}, specs, diags, a_star, widths, cfg.mode)
    table = curve.table(cfg.alpha_grid)
    layer_alpha = {}
    for n in curve.layers:
        sub = mixture.MixtureCurve(layers={n: curve.layers[n]}, normalize=curve.normalize)
        layer_alpha[n] = sub.argmin(n_grid=201)[0]
    return MixtureResult(
        alpha_star=a_star, f_star=f_star, alpha_searched=cfg.alpha is None,
        best_on_grid=curve.best_on_grid(cfg.alpha_grid), table=table,
        curve=curve.compress(1e-5).to_dict(), layer_alpha=layer_alpha,
        shared_inputs=shared, group_error_widths=widths, group_errors=group_err,
        linear_errors=lin_err,
        tokens={"gen": cfg.n_gen * cfg.mix_seqlen, "task": cfg.n_task * cfg.mix_seqlen,
                "test": cfg.n_test * cfg.mix_seqlen},
        seconds=time.perf_counter() - t0)


# ---- stage 3: sensitivity ---------------------------------------------------------------------

def _span(cfg: PipelineConfig, objective: str) -> str:
    return "item" if objective in cfg.sens_item_span else "answer"


def build_objectives(tokenizer, split: dict, cfg: PipelineConfig) -> List[sensitivity.Objective]:
    objs = []
    for name in cfg.objectives:
        if name == "ppl":
            objs.append(sensitivity.text_objective(
                "ppl", tokenizer, split["gen_heldout"], cfg.sens_ppl_windows, cfg.sens_ppl_seqlen,
                seed=cfg.seed + SEED_OBJ_PPL, description=f"held-out general text, {cfg.sens_ppl_windows} x "
                f"{cfg.sens_ppl_seqlen} tokens"))
        elif name == "math":
            objs.append(sensitivity.gsm8k_objective(tokenizer, split["gsm8k_heldout"],
                                                    cfg.sens_math_items, seed=cfg.seed + SEED_OBJ_MATH,
                                                    span=_span(cfg, "math")))
        elif name == "arc":
            objs.append(sensitivity.arc_objective(tokenizer, split["arc_heldout"],
                                                  cfg.sens_arc_items, seed=cfg.seed + SEED_OBJ_ARC,
                                                  span=_span(cfg, "arc")))
    return objs


def _units(model, cfg):
    return sensitivity.UNIT_BUILDERS[cfg.granularity](model, list(default_targets(model)))


# ---- stage 4: allocation ----------------------------------------------------------------------

MAX_DIM = 1 << 20          # a linear's side: far above any model's (LLaMA-405B: 53248)


def check_measured(m: Measurement) -> None:
    """A measurement that says ``complete`` must hold what the allocator reads: every unit's
    linears, and a finite loss increase of every unit at every probe width for every objective
    (a unit whose probe was deleted moved 4 -> 3 bits silently; an empty ``units`` divided by
    zero). The error names the unit, width and objective."""
    if not isinstance(m.units, dict) or not m.units:
        raise ValueError("tasa: the measurement has no units to allocate (edited or damaged?); "
                         "re-measure")
    if not isinstance(m.linears, dict):
        raise ValueError("tasa: the measurement's linears must be an object")
    for f, v in m.linears.items():
        ok = isinstance(v, dict) and all(
            isinstance(v.get(k), int) and not isinstance(v.get(k), bool)
            and 0 < v[k] <= MAX_DIM for k in ("n_out", "k_in", "group_size"))
        if not ok or v["group_size"] % tasa_ext.TILE_K or v["k_in"] % v["group_size"] \
                or v.get("mode") not in ("sym", "asym"):
            # k_in 10^12 ran the allocator out of memory
            raise ValueError(f"tasa: the measurement's linear {f!r} has no valid n_out / k_in "
                             f"(1..{MAX_DIM}) / group_size / mode: {v!r}"[:300])
    for u, spec in m.units.items():
        lins = spec.get("linears") if isinstance(spec, dict) else None
        if not isinstance(lins, list) or not lins or any(f not in m.linears for f in lins):
            raise ValueError(f"tasa: the measurement's unit {u!r} does not list linears of the "
                             f"measurement (edited or damaged?); re-measure")
    if m.mixture is None:
        raise ValueError("tasa: the measurement has no mixture stage (edited or damaged?); "
                         "re-measure")
    sens = m.sensitivity
    if not isinstance(sens.delta, dict) or not isinstance(sens.delta_by_width, dict) \
            or not isinstance(sens.objectives, list) or not sens.objectives:
        raise ValueError("tasa: the measurement's sensitivity section is malformed; re-measure")
    for b in sens.widths:
        d = sens.delta if int(b) == int(sens.bits) else sens.delta_by_width.get(str(int(b)), {})
        for u in m.units:
            if not isinstance(d, dict) or u not in d:
                raise ValueError(f"tasa: the measurement says complete but has no {b}-bit probe "
                                 f"of unit {u!r} (edited or damaged?); re-measure")
            for k in sens.objectives:
                v = d[u].get(k) if isinstance(d[u], dict) else None
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"tasa: the measurement's {b}-bit probe of unit {u!r} has "
                                     f"{k} loss increase {v!r}, not a finite number")


def allocate(measurement: Measurement, bits: float, beta: float = defaults.BETA,
             widths: Sequence[int] = defaults.WIDTHS, intra: bool = True,
             act_order: bool = False, budget: str = "storage", scoring: str = "tasa") -> dict:
    """Bit allocation from a measurement (no model needed: seconds). ``budget``: what ``bits``
    counts, ``"storage"`` (every stored bit, ``tasa_ext.cost_bits``) or ``"code"`` (the code
    bits alone: the paper's convention); ``scoring``: the errors the knapsack minimises
    (:func:`unit_errors`). Returns ``{"plan": {fqn: {...}}, "summary", "item_bits", "scores",
    "layer_allocation", ...}``; raises ``ValueError`` for an infeasible budget."""
    if not measurement.complete:
        raise ValueError("tasa: the measurement has no complete sensitivity stage")
    check_measured(measurement)
    lin = measurement.linears
    units = measurement.units
    names = list(units)
    errors, score, dropped = unit_errors(measurement, beta, widths, scoring)
    specs = {f: alloc.linear_spec(f, v["n_out"], v["k_in"], v["group_size"], v["mode"], act_order)
             for f, v in lin.items()}
    items = {u: [specs[f] for f in units[u]["linears"]] for u in names}
    lo = min(widths)
    n = sum(sp.n_weights for sp in specs.values())
    floor = sum(alloc.member_cost(sp, lo, budget) for sp in specs.values())
    if floor > alloc.budget_from_avg_bits(bits, n):
        # the same refusal as quantize's (check_budget), with the two ways out
        flag = "--bits" if budget == "storage" else "--code-bits"
        hint = (f"raise {flag} to at least {floor / n:.2f}"
                + (f", give the budget in code bits (--code-bits {bits}: the paper's convention,"
                   f" scales not counted)" if budget == "storage" else "")
                + (f", or allow narrower widths (--widths {','.join(map(str, sorted({2, *widths})))})"
                   if lo > 2 else ""))
        raise ValueError(f"tasa: {flag} {bits} is below the minimum {floor / n:.4f} average "
                         f"bits (every linear at {lo} bits, "
                         f"{'scales/zeros included' if budget == 'storage' else 'code bits'}); "
                         f"{hint}")
    la = alloc.allocate_layers(items, bits, errors=errors, widths=widths, kind=budget)
    per_linear: Dict[str, Any] = dict(la.linear_bits)
    if intra:
        mix = measurement.mixture
        ew = list(mix.group_error_widths)
        for f, b in la.linear_bits.items():
            E = np.asarray(mix.group_errors[f])
            per_linear[f] = alloc.allocate_groups(specs[f], b, errors=E, error_widths=ew,
                                                  allowed=widths)
    plan = alloc.make_plan(specs, per_linear)
    shapes = {f: (s.n_out, s.k_in) for f, s in specs.items()}
    summary = alloc.plan_summary(plan, shapes)
    budget_bits = alloc.budget_from_avg_bits(bits, summary["n_weights"])
    spent = (summary["cost_bits"] if budget == "storage"
             else sum(specs[f].code_cost(e["bits"]) for f, e in plan.items()))
    if spent > budget_bits:
        raise RuntimeError("tasa: internal error: the plan exceeds its budget")
    return {"plan": plan, "summary": summary, "item_bits": la.bits,
            "scores": dict(zip(names, np.asarray(score).tolist())),
            "layer_allocation": la.to_dict(), "target_bits": float(bits), "budget": budget,
            "scoring": scoring, "beta": float(beta), "widths": list(widths),
            "dropped_objectives": dropped, "intra": bool(intra), "budget_bits": budget_bits}


def check_budget(model, cfg: PipelineConfig) -> float:
    """Raises ``ValueError`` (before any measuring) when ``cfg.bits`` is below the cheapest plan,
    every linear at the narrowest allowed width (counted as ``cfg.budget`` says); returns that
    minimum average."""
    specs = _linear_specs(model, cfg)
    if not specs:
        if any(type(m).__name__ == "TasaLinear" for m in model.modules()):
            raise ValueError("tasa: this model is already tasa-quantized (a tasa folder); "
                             "quantize the model it was made from (its config.json "
                             "quantization_config.meta.base_model)")
        raise ValueError("tasa: the model has no nn.Linear to quantize (outside lm_head)")
    lo = min(cfg.widths)
    c = sum(alloc.member_cost(s, lo, cfg.budget) for s in specs.values())
    n = sum(s.n_weights for s in specs.values())
    if c > alloc.budget_from_avg_bits(cfg.bits, n):
        flag, what = (("--bits", "scales/zeros included") if cfg.budget == "storage"
                      else ("--code-bits", "code bits"))
        raise ValueError(f"tasa: {flag} {cfg.bits} is below the minimum {c / n:.4f} average bits "
                         f"(every linear at {lo} bits, group size {cfg.group_size}, {cfg.mode}, "
                         f"{what}); raise {flag} or allow narrower --widths")
    return c / n


def plan_document(measurement: Measurement, allocation: Mapping) -> dict:
    """The ``plan.json`` of an allocation in the one plan format (:func:`tasa.quant.plan_to_dict`:
    kind, version, layers with their shapes) with the allocation settings, alpha*, the summary
    and the per-unit widths beside the layers."""
    A = allocation
    shapes = {f: (v["n_out"], v["k_in"]) for f, v in measurement.linears.items()}
    return plan_to_dict(as_layer_specs(A["plan"]), shapes, target_bits=A["target_bits"],
                        budget=A["budget"], scoring=A["scoring"], beta=A["beta"], widths=A["widths"], intra=A["intra"],
                        alpha=measurement.mixture.alpha_star, summary=A["summary"],
                        item_bits=A["item_bits"])


def as_layer_specs(plan: Mapping) -> Dict[str, LayerSpec]:
    """``{fqn: LayerSpec}`` from LayerSpecs or layer entries (the allocator's, with their
    derived cost_bits / avg_bits, or a plan document's)."""
    return {f: e if isinstance(e, LayerSpec) else
            LayerSpec.from_dict(e, f, "plan", ("cost_bits", "avg_bits", "shape"))
            for f, e in plan.items()}


# ---- stage 5: quantization --------------------------------------------------------------------

def gptq_calibration(tokenizer, cfg: PipelineConfig, alpha: float, split: Optional[dict] = None,
                     log=print) -> tuple:
    """GPTQ's calibration token ids for mixing ratio ``alpha``: ``cfg.n_calib`` sequences of
    ``cfg.seqlen`` tokens drawn with seed ``cfg.seed + SEED_GPTQ`` from the pools of ``split`` (default
    :func:`split_data` of ``cfg``). Returns ``(ids [n, seqlen], info)``."""
    ids, counts = mixture_calibration(tokenizer, split or split_data(cfg), alpha, cfg.n_calib,
                                      cfg.seqlen, cfg.seed + SEED_GPTQ)
    log(f"GPTQ: calibration mix {counts[0]} general + {counts[1]} task sequences x {cfg.seqlen}")
    return ids, {"alpha": alpha, "n_general": counts[0], "n_task": counts[1], "seqlen": cfg.seqlen}


def with_rotation(cfg: PipelineConfig, lplan: Mapping[str, LayerSpec]) -> dict:
    """The plan's specs with ``hadamard`` set as the job says (:meth:`PipelineConfig.rotates`):
    the rotation is a property of how a linear is quantized, not of how many bits it gets, so
    plans (and their files) do not carry it; every quantizing path (in memory, lazy) asks
    here."""
    rot = cfg.rotates()
    return {n: dataclasses.replace(s, hadamard=rot) for n, s in lplan.items()}


def quantize_with_plan(model, tokenizer, cfg: PipelineConfig, plan: Mapping[str, Any],
                       alpha: float, progress: bool = True, log=print,
                       split: Optional[dict] = None,
                       shapes: Optional[Mapping[str, tuple]] = None, dist=None) -> tuple:
    """Quantizes ``model`` in place per ``plan`` (``{fqn: {"bits", "group_size", "mode",
    "act_order"}}``) with ``cfg.method``; GPTQ calibrates on ``cfg.n_calib`` sequences of
    ``cfg.seqlen`` tokens drawn (seed ``cfg.seed + SEED_GPTQ``) with mixing ratio ``alpha`` (share of
    general text) from the pools of ``split`` (default :func:`split_data` of ``cfg``). The plan
    is checked against the model first (:func:`tasa.quant.check_plan`, with ``shapes`` when the
    plan recorded them). Returns ``(plan as LayerSpecs, info)``."""
    lplan = as_layer_specs(plan)
    check_plan(model, lplan, shapes)
    lplan = with_rotation(cfg, lplan)
    qinfo: Dict[str, Any] = {"method": cfg.method, "hadamard": cfg.rotates()}
    ids = None
    if get_method(cfg.method).needs_hessian:
        ids, qinfo["calibration"] = gptq_calibration(tokenizer, cfg, alpha, split, log)
    res = quantize_model(model, lplan, cfg.method, calib_ids=ids, damp=cfg.damp,
                         progress=progress, batch_size=CALIB_BATCH, dist=dist)
    qinfo["seconds"] = res["seconds"]
    return lplan, qinfo


def probe_weights(model, tokenizer, cfg: PipelineConfig, alpha: float, units: Mapping[str, tuple],
                  split: Optional[dict] = None, progress: bool = True,
                  log=print, error_widths: Sequence[int] = (),
                  errors: Optional[dict] = None) -> Dict[tuple, torch.Tensor]:
    """``{(bits, fqn): dequantized weight (bf16)}`` of every linear of ``units`` quantized alone by
    ``cfg.sens_method`` at every width of ``cfg.sens_widths`` (group size and mode as the plan's):
    what the probes set a unit to (issue 27 item 2: RTN probes measured a quantizer other than
    the one the model is then quantized with; GPTQ repairs some units far better than others).

    A Hessian method is calibrated as the final quantization (:func:`gptq_calibration` at
    ``alpha``: the same sequences), but every block's Hessians come from the inputs of the
    *full-precision* model -- a probe quantizes its unit alone, the rest unchanged -- so the
    model is not modified. Memory: 2 bytes x widths x the probed linears' weights (SmolLM2-135M,
    2 widths: 0.4 GB). Time: one quantization of the model per width.

    ``errors`` (a dict, filled when the method has a Hessian): ``{(bits, fqn): tr(dW H dW^T)}``
    at every width of ``sens_widths`` and ``error_widths`` (those only quantized for it)."""
    meth = get_method(cfg.sens_method)
    widths = [int(b) for b in cfg.sens_widths]
    all_widths = sorted(set(widths) | {int(b) for b in error_widths})
    wanted = {f for _, fqns in units.values() for f in fqns}
    mods = dict(model.named_modules())
    missing = sorted(f for f in wanted if not isinstance(mods.get(f), nn.Linear))
    if missing:
        raise ValueError(f"tasa: probe weights: not nn.Linear modules: {missing[:3]}")
    out: Dict[tuple, torch.Tensor] = {}

    def one(full, lin, H):
        for b in all_widths if (errors is not None and H is not None) else widths:
            spec = dataclasses.replace(sensitivity.probe_spec(lin, b, cfg.group_size, cfg.mode),
                                       hadamard=cfg.rotates())
            q = meth.quantize(lin.weight, spec, H, damp=cfg.damp, name=full)
            dq = q.dequantize()
            if b in widths:
                out[(b, full)] = dq.to(torch.bfloat16).cpu()
            if errors is not None and H is not None:
                errors[(b, full)] = output_error(lin.weight, dq, H)

    t0 = time.perf_counter()
    if not meth.needs_hessian:
        for full in sorted(wanted):
            one(full, mods[full], None)
    else:
        ids, _ = gptq_calibration(tokenizer, cfg, alpha, split, log)

        def on_block(idx, block, prefix, hessians):
            for lname, (H, count) in hessians.items():
                full = f"{prefix}.{lname}"
                if full in wanted:
                    one(full, block.get_submodule(lname), H[0])
            return False             # the next block's inputs stay the full-precision ones

        calib.run_blockwise(model, ids, on_block, progress=progress, batch_size=CALIB_BATCH,
                            linear_filter=lambda f: f in wanted)
    absent = sorted(f for f in wanted if (widths[0], f) not in out)
    if absent:
        raise ValueError(f"tasa: probe weights: {cfg.sens_method} quantizes decoder-block "
                         f"linears only; no weights for {absent[:3]}")
    extra = sorted(set(all_widths) - set(widths)) if errors is not None and meth.needs_hessian else []
    log(f"probe weights: {len(wanted)} linears x widths {widths} by {cfg.sens_method}"
        + (f" (and their errors at {extra} bits)" if extra else "")
        + f" in {time.perf_counter() - t0:.0f} s")
    return out


def error_widths(cfg: PipelineConfig) -> List[int]:
    """The widths at which the sensitivity stage records each unit's quantizer error
    (``SensitivityResult.unit_error``): every probe width and every allocation width below 8
    (8 bits follows from 4 by the noise model: its error is ~1/256 of 4 bits', near zero)."""
    return sorted({int(b) for b in cfg.sens_widths} | {int(b) for b in cfg.widths if b < 8})


def record_unit_errors(sens: SensitivityResult, units: Mapping[str, tuple],
                       errors: Mapping[tuple, float]) -> None:
    """Sums ``errors[(bits, fqn)]`` over each unit's linears into ``sens.unit_error[str(bits)]``
    for every unit whose linears all have one (others are left as they are)."""
    for b in sorted({b for b, _ in errors}):
        row = sens.unit_error.setdefault(str(b), {})
        for u, (_, fqns) in units.items():
            if all((b, f) in errors for f in fqns):
                row[u] = float(sum(errors[(b, f)] for f in fqns))


def mixture_linear_errors(mix: MixtureResult, widths: Sequence[int]) -> Dict[tuple, float]:
    """``{(bits, fqn): sum over groups of the RTN error under diag(H_alpha*)}`` from the mixture
    stage's per-group table, at the widths of ``widths`` it holds."""
    ew = [int(b) for b in mix.group_error_widths]
    return {(b, f): float(np.asarray(g, dtype=np.float64)[:, ew.index(b)].sum())
            for f, g in mix.group_errors.items() for b in widths if b in ew and len(g)}


def fill_unit_errors(model, tokenizer, cfg: PipelineConfig, mix: MixtureResult,
                     units: Mapping[str, tuple], sens: SensitivityResult, split: dict,
                     widths: Sequence[int], probe: Optional[Mapping[str, tuple]] = None,
                     progress: bool = True, log=print) -> Optional[Dict[str, Any]]:
    """Records ``sens.unit_error`` at ``widths`` for every unit of ``units`` that lacks one, from
    the probes' own quantizer: a Hessian method or the rotation -- :func:`probe_weights` at
    alpha* (which also returns the probe weights of the units of ``probe``, the probes still to
    run) -- else plain RTN, whose errors the mixture stage already holds. Returns those probe
    weights (None for plain RTN probes)."""
    widths = [int(b) for b in widths]
    missing = {u: units[u] for u in units
               if any(u not in sens.unit_error.get(str(b), {}) for b in widths)}
    probe = dict(probe or {})
    pw = None
    if (cfg.sens_method != "rtn" or cfg.rotates()) and (probe or missing):
        # (every rank computes them all: the same calibration, deterministic)
        errs: Dict[tuple, float] = {}
        pw = probe_weights(model, tokenizer, cfg, mix.alpha_star, {**probe, **missing}, split,
                           progress, log, error_widths=widths, errors=errs)
        record_unit_errors(sens, units, errs)
    if any(u not in sens.unit_error.get(str(b), {}) for b in widths for u in units):
        # a data-free probe quantizer (plain RTN): the mixture stage's per-group RTN errors
        # under diag(H_alpha*) are that quantizer's errors
        record_unit_errors(sens, units, mixture_linear_errors(mix, widths))
    return pw


def measure_fingerprint(model: nn.Module, cfg: PipelineConfig) -> dict:
    """What a measurement depends on: the measurement settings and the model's weights."""
    return {**cfg.measure_fingerprint(), "weights": weights_digest(model)}


def check_same_model(m: Measurement, fp: Mapping, what: str, log=print, hint: str = "") -> None:
    """:meth:`Measurement.check_settings` against ``fp`` (:func:`measure_fingerprint`); a
    measurement written before weights were fingerprinted is accepted on its settings, said."""
    if "weights" not in m.config:
        log(f"{what} predates weight fingerprints: checked on its settings only")
        fp = {k: v for k, v in fp.items() if k != "weights"}
    m.check_settings(fp, what, hint)


def noise_bounds(sens: SensitivityResult, units: Sequence[str], seed: int = 0,
                 n_boot: int = 1000, n_splits: int = 200) -> Optional[dict]:
    """:func:`tasa.stats.noise_report` of the probes at every measured width (``{str(b):
    report}``), from the per-item record; None when there is none or only one objective/unit."""
    if len(units) < 2 or len(sens.objectives) < 1 or not sens.item_tokens:
        return None
    out = {}
    for b in sens.widths:
        try:
            ip = sens.item_profile(units, b)
        except ValueError:
            continue
        profiles = {k: (np.asarray(ip[k]), np.asarray(sens.item_tokens[k])) for k in sens.objectives
                    if len(sens.item_tokens.get(k, [])) >= 2}
        if profiles:
            out[str(b)] = stats.noise_report(profiles, n_boot=n_boot, n_splits=n_splits, seed=seed)
    return out or None


def measure(model, tokenizer, cfg: PipelineConfig, path: Path, fresh: bool = False,
            progress: bool = True, log=print, split: Optional[dict] = None,
            dist=None) -> Measurement:
    """Stages 1-3 with resume: ``path`` (measurement.json) is updated after every stage and
    every sensitivity probe; an existing file made with the same settings is continued, one
    made with other settings is an error (never overwritten silently) unless ``fresh``.
    ``split``: :func:`split_data` of ``cfg``, if the caller has it already. ``dist``: a
    :class:`tasa.distributed.Dist`: rank 0 reads and writes ``path`` and hands what it resumed
    from to the others; the calibration and the probes are divided among the ranks."""
    active = dist is not None and dist.active
    writer = not active or dist.is_writer

    def save():
        if writer:
            m.save(path)

    fp = measure_fingerprint(model, cfg)
    m = None
    if writer and path.is_file() and not fresh:
        m = Measurement.load(path)
        check_same_model(m, fp, str(path), log, "use another --out, pass --fresh to discard "
                         "it, or re-use it with the same settings and model")
        m.config = dict(fp)          # (records the weights of a pre-fingerprint file)
        log(f"resuming from {path}")
    if active:
        m = dist.from_writer(m if writer else None, "the measurement to resume")
    if m is None:
        m = Measurement(config=fp, format_version=tasa_ext.FORMAT_VERSION,
                        created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    specs = _linear_specs(model, cfg)
    m.linears = {f: {"n_out": s.n_out, "k_in": s.k_in, "group_size": s.group_size,
                     "mode": s.mode} for f, s in specs.items()}
    units = _units(model, cfg)
    m.units = {u: {"block": i, "linears": f} for u, (i, f) in units.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save()
    split = split or split_data(cfg)
    m.data = {k: len(v) for k, v in split.items()}
    if m.mixture is None:
        log(f"mixture search: Hessians of {cfg.n_gen} general / {cfg.n_task} task / "
            f"{cfg.n_test} held-out task sequences x {cfg.mix_seqlen} tokens, one pass")
        m.mixture = measure_mixture(model, tokenizer, split, cfg, progress, dist=dist)
        save()
    mix = m.mixture
    log(f"alpha* = {mix.alpha_star:.3f} (share of general text in the calibration mix; "
        f"best grid point {mix.best_on_grid})")
    if not m.complete:
        sens = m.sensitivity or SensitivityResult()
        objs = build_objectives(tokenizer, split, cfg)
        if not sens.objectives:
            sens.objectives = [o.name for o in objs]
        sens.objective_data = [o.summary() for o in objs]
        widths = list(cfg.sens_widths)
        sens.bits = widths[0]
        sens.compute_dtype = cfg.probe_dtype()
        t_prev = float(sens.seconds)
        t0 = time.perf_counter()
        m.sensitivity = sens
        done = {b: sens.deltas(b) for b in widths}
        n_done = sum(len(v) for v in done.values())
        log(f"sensitivity: {len(units)} {cfg.granularity} units x widths {widths} = "
            f"{len(units) * len(widths)} probes x {len(objs)} objectives ({n_done} already "
            f"measured; {cfg.probe_dtype()} compute)")

        def on_result(b, u, d, items):
            sens.deltas(b)[u] = d
            sens.item_delta.setdefault(str(b), {})[u] = items
            sens.seconds = t_prev + time.perf_counter() - t0
            save()

        todo_units = {u: units[u] for u in units if any(u not in done[b] for b in widths)}
        pw = fill_unit_errors(model, tokenizer, cfg, mix, units, sens, split, error_widths(cfg),
                              probe=todo_units, progress=progress, log=log)
        save()
        res = sensitivity.measure_sensitivity(
            model, objs, units, widths=widths, group_size=cfg.group_size, mode=cfg.mode,
            done=done, on_result=on_result, base=sens.base, progress=progress,
            compute_dtype=getattr(torch, cfg.probe_dtype()), dist=dist, scoring=cfg.sens_scoring,
            probe_weights=pw,
            probe_name=cfg.sens_method.upper() + (" (rotated)" if cfg.rotates() else ""))
        sens.base = res["base"]
        sens.base_items = res["base_items"]
        sens.item_tokens = res["tokens"]
        sens.seconds = t_prev + time.perf_counter() - t0
        names = list(units)
        for b in widths:         # in the units' order, whatever order the probes arrived in
            d = sens.deltas(b)
            ordered = {u: d[u] for u in names}
            d.clear()
            d.update(ordered)
            sens.item_delta[str(b)] = {u: sens.item_delta[str(b)][u] for u in names}
        prof = sens.profile(names)
        if "ppl" in prof and len(prof) > 1 and len(names) > 1:
            sens.illusion = stats.illusion_report(
                prof["ppl"], {k: v for k, v in prof.items() if k != "ppl"},
                k=max(1, len(names) // 5), pairs="all")
        sens.noise = noise_bounds(sens, names, seed=cfg.seed)
        sens.complete = True
        save()
    return m


