"""The Python API, in the habits of torchao and GPTQModel: quantize an in-memory transformers
model, load a saved one.

    import tasa
    model = tasa.quantize(model, tokenizer, bits=3.5, out="tasa-out")   # the TASA pipeline
    model = tasa.quantize(model, None, bits=4, method="rtn")             # uniform RTN, no data
    model = tasa.quantize(model, tokenizer, plan="tasa-out/plan.json")   # a given plan
    model.save_pretrained("folder")                                      # a transformers folder
    model = tasa.load("folder")                  # = AutoModelForCausalLM.from_pretrained(folder)
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from . import defaults
from .storage import load_quantized
from .pipeline import PipelineConfig, run
from .quant import get_method, plan_to_dict, uniform_plan

__all__ = ["quantize", "load"]

_SETTINGS = {f.name for f in dataclasses.fields(PipelineConfig)} - {"model", "bits", "data",
                                                                     "method"}


def quantize(model: nn.Module, tokenizer=None, bits: Optional[float] = defaults.BITS, *,
             method: str = defaults.METHOD, plan: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
             data=None, out=None, progress: bool = True, **settings) -> nn.Module:
    """Quantizes ``model`` (a transformers causal LM) in place and returns it with TasaLinear
    layers and ``config.quantization_config`` set, ready for ``save_pretrained``.

    * default: the TASA pipeline at ``bits`` average bits (exact storage cost): mixture search,
      multi-objective sensitivity, knapsack + group allocation, GPTQ (``method="gptq"``) or RTN.
      Needs ``tokenizer``; ``data``: None (the slices shipped with tasa) or a folder laid out
      like shared/data. ``out``: where the measurement, plan, report and the model folder go
      (default: a temporary folder, discarded).
    * ``method="rtn"`` with an integer ``bits`` and no plan: every target linear at ``bits``
      (group size and mode from ``settings``, defaults 128 / asym), no tokenizer or data.
    * ``plan``: a plan file / plan document / ``{module: LayerSpec}`` to quantize with (checked
      against the model's modules and shapes); GPTQ still needs ``tokenizer`` for calibration.

    ``settings``: any :class:`tasa.pipeline.PipelineConfig` field (``beta``, ``widths``,
    ``group_size``, ``mode``, ``alpha``, ``n_calib`` ...). Bad settings raise ``ValueError``.
    """
    if "lm_head_bits" in settings:       # tasa < 0.2: the head alone, the embedding untied
        warnings.warn("tasa.quantize: lm_head_bits is now embed_bits (the embedding and the "
                      "head, one packed table when tied)", DeprecationWarning, stacklevel=2)
        settings["embed_bits"] = settings.pop("lm_head_bits")
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise TypeError(f"tasa.quantize: unknown settings {unknown}; known: {sorted(_SETTINGS)}")
    meth = get_method(method)          # a ValueError naming the registered methods
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"tasa.quantize: needs a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or "in-memory"
    cfg = PipelineConfig(model=str(name), data=None if data is None else str(data),
                         method=method, **settings)
    if bits is not None:
        cfg.bits = float(bits)
    cfg.validate()
    if plan is None and not meth.needs_hessian and bits is not None and float(bits).is_integer():
        # data-free at an integer width: the uniform plan (group size fitted per linear)
        specs = uniform_plan(model, int(bits), cfg.group_size, cfg.mode, fit_group_size=True)
        shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
                  if n in specs}
        plan = plan_to_dict(specs, shapes, method=method, bits=int(bits))
    if plan is not None and cfg.act_order and not meth.needs_hessian:
        raise ValueError(f"tasa.quantize: act_order needs a Hessian; {method!r} has none")
    if tokenizer is None and (plan is None or meth.needs_hessian):
        raise ValueError("tasa.quantize: this needs a tokenizer (calibration / sensitivity data); "
                         "only a data-free method such as 'rtn' (integer bits, or a plan) runs "
                         "without one")
    if plan is not None and "eval_windows" not in settings:
        cfg.eval_windows = 0          # a given plan: no perplexity check unless asked
    # the one job (tasa.pipeline.run), into `out` or a temporary folder that is discarded
    with tempfile.TemporaryDirectory(prefix="tasa-") as tmp:
        run(cfg, out if out is not None else tmp, progress=progress, quiet=not progress,
            report=out is not None, model=model, tokenizer=tokenizer, plan=plan)
    return model


def load(folder, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """A saved tasa model (a transformers folder, or a layout-1 folder of older tasa versions):
    the same as ``AutoModelForCausalLM.from_pretrained(folder)`` after ``import tasa``."""
    return load_quantized(Path(folder), dtype=dtype, device=device)
