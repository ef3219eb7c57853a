"""The pipeline's settings: one versioned object with every knob of ``tasa quantize`` and the
fingerprint of the settings a measurement depends on."""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch

import tasa_ext

from .. import defaults, mixture
from ..quant import get_method

__all__ = ["PipelineConfig"]


@dataclasses.dataclass
class PipelineConfig:
    """Every knob of the pipeline, with the defaults of ``tasa quantize``."""

    model: str = defaults.MODEL
    bits: float = defaults.BITS            # target average bits, counted as `budget` says
    budget: str = "storage"                # "storage": every stored bit (tasa_ext.cost_bits);
                                           # "code": code bits only (the paper's convention)
    data: Optional[str] = None             # data folder / None: the slices shipped with tasa
    seed: int = 0
    # format
    group_size: int = defaults.GROUP_SIZE
    mode: str = defaults.MODE
    widths: tuple = defaults.WIDTHS
    # data split
    holdout: float = 0.25
    # mixture search
    alpha: Optional[float] = None          # None: search; a number: use it (no search)
    alpha_grid: tuple = mixture.DEFAULT_GRID
    mix_normalize: str = "oracle"
    n_gen: int = 16
    n_task: int = 16
    n_test: int = 8
    mix_seqlen: int = 512
    # sensitivity
    sens_widths: tuple = defaults.SENS_WIDTHS   # probe widths, each measured per unit
    sens_dtype: str = defaults.SENS_DTYPE       # compute dtype of the probes' forward passes
    sens_scoring: str = defaults.SENS_SCORING   # "nll" | "kl" (tasa.sensitivity)
    sens_method: str = defaults.SENS_METHOD     # the probes' quantizer (tasa.quant.METHODS)
    # the math/arc objectives whose probes score the question's tokens too (defaults.SENS_ITEM_SPAN)
    sens_item_span: tuple = defaults.SENS_ITEM_SPAN
    granularity: str = defaults.GRANULARITY     # "block" | "sublayer" | "linear"
    objectives: tuple = defaults.OBJECTIVES
    sens_ppl_windows: int = 8
    sens_ppl_seqlen: int = 128
    sens_math_items: int = 10
    sens_arc_items: int = 48
    # allocation
    beta: float = defaults.BETA
    intra: bool = True
    # quantization
    method: str = defaults.METHOD
    n_calib: int = 32
    seqlen: int = 512
    damp: float = 0.01
    act_order: bool = False
    # format version 2's incoherence rotation of every quantized linear (and of the probes'
    # quantizer); None: defaults.HADAMARD for a method with a Hessian, off for a data-free one
    # (validate() resolves it to a bool, which the measurement and the report record)
    hadamard: Optional[bool] = None
    # the token embedding and the output projection (one packed table when tied): RTN at this
    # width after GPTQ, reported apart from the decoder linears' average (which --bits budgets);
    # 0 keeps them as the checkpoint stores them. Default: defaults.EMBED_BITS (measured)
    # widths of the input embedding and of the output projection (driver.embedding_widths):
    # None = the measured defaults (a tied table and the head 8, an untied embedding 4);
    # embed_bits 0 keeps both as the checkpoint stores them
    embed_bits: Optional[int] = None
    head_bits: Optional[int] = None
    # report
    eval_windows: int = 4
    eval_seqlen: int = 2048

    # fields whose change invalidates the measurement (everything the measured numbers depend on)
    MEASURE_KEYS = ("model", "data", "seed", "group_size", "mode", "holdout", "alpha",
                    "mix_normalize", "n_gen", "n_task", "n_test", "mix_seqlen", "sens_widths", "sens_dtype", "sens_scoring",
                    "sens_method", "sens_item_span", "granularity", "objectives", "sens_ppl_windows", "sens_ppl_seqlen",
                    "sens_math_items", "sens_arc_items", "hadamard")

    def validate(self) -> None:
        """Every setting checked before any work (a bad count used to fail only after the whole
        measurement)."""
        if not (self.bits > 0 and math.isfinite(self.bits)):
            raise ValueError(f"tasa: --bits must be a finite number > 0, got {self.bits}")
        if self.group_size <= 0 or self.group_size % tasa_ext.TILE_K:
            raise ValueError(f"tasa: --group-size must be a positive multiple of "
                             f"{tasa_ext.TILE_K}, got {self.group_size} (per linear, the largest "
                             f"multiple of {tasa_ext.TILE_K} <= it that divides in_features is used)")
        for name in ("n_calib", "seqlen", "n_gen", "n_task", "n_test", "mix_seqlen",
                     "sens_ppl_windows", "sens_ppl_seqlen", "sens_math_items", "sens_arc_items",
                     "eval_seqlen"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"tasa: --{name.replace('_', '-')} must be a positive integer, "
                                 f"got {v!r}")
        if not (isinstance(self.eval_windows, int) and self.eval_windows >= 0):
            raise ValueError(f"tasa: --eval-windows must be >= 0, got {self.eval_windows!r}")
        if self.embed_bits is not None and (isinstance(self.embed_bits, bool) or self.embed_bits
                                            not in (0,) + tuple(tasa_ext.SUPPORTED_BITS)):
            raise ValueError(f"tasa: --embed-bits must be 0 (as stored) or one of "
                             f"{list(tasa_ext.SUPPORTED_BITS)}, got {self.embed_bits!r}")
        if self.head_bits is not None and (isinstance(self.head_bits, bool) or self.head_bits
                                           not in tasa_ext.SUPPORTED_BITS):
            raise ValueError(f"tasa: --head-bits must be one of {list(tasa_ext.SUPPORTED_BITS)}, "
                             f"got {self.head_bits!r}")
        if self.head_bits is not None and self.embed_bits == 0:
            raise ValueError("tasa: --head-bits needs --embed-bits (0 keeps both as stored)")
        if not (self.damp > 0 and math.isfinite(self.damp)):
            raise ValueError(f"tasa: damp must be > 0, got {self.damp}")
        bad = [b for b in self.widths if b not in tasa_ext.SUPPORTED_BITS]
        if bad or not self.widths:
            raise ValueError(f"tasa: widths {list(self.widths)} must be a non-empty subset of "
                             f"{list(tasa_ext.SUPPORTED_BITS)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"tasa: --alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"tasa: --beta must be in [0, 1], got {self.beta}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"tasa: holdout must be in (0, 1), got {self.holdout}")
        if self.granularity not in ("block", "sublayer", "linear"):
            raise ValueError(f"tasa: granularity must be 'block', 'sublayer' or 'linear', got "
                             f"{self.granularity!r}")
        if self.budget not in ("storage", "code"):
            raise ValueError(f"tasa: budget must be 'storage' or 'code', got {self.budget!r}")
        if self.sens_scoring not in defaults.SENS_SCORINGS:
            raise ValueError(f"tasa: --sens-scoring must be one of {list(defaults.SENS_SCORINGS)}, "
                             f"got {self.sens_scoring!r}")
        self.sens_item_span = tuple(self.sens_item_span)
        bad = [o for o in self.sens_item_span if o not in defaults.SENS_ITEM_SPAN_OBJECTIVES]
        if bad:
            raise ValueError(f"tasa: --sens-item-span takes objectives among "
                             f"{list(defaults.SENS_ITEM_SPAN_OBJECTIVES)}, got {bad}")
        if self.sens_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"tasa: --sens-dtype must be auto, float32 or bfloat16, got "
                             f"{self.sens_dtype!r}")
        self.sens_dtype = self.probe_dtype()
        unknown = set(self.objectives) - set(defaults.OBJECTIVES)
        if unknown or not self.objectives:
            raise ValueError(f"tasa: objectives must be a non-empty subset of {defaults.OBJECTIVES}")
        get_method(self.method)            # a ValueError naming the registered methods
        get_method(self.sens_method)
        if self.hadamard is not None and not isinstance(self.hadamard, bool):
            raise ValueError(f"tasa: hadamard must be true, false or None (the default for the "
                             f"method), got {self.hadamard!r}")
        if self.hadamard and not get_method(self.method).needs_hessian:
            warnings.warn(f"tasa: --hadamard with the data-free method {self.method!r}: the "
                          f"rotation measured worse with RTN on SmolLM2 (uniform W3 KL 2.68 -> "
                          f"3.81; benchmarks/results/hadamard_probe_smollm2-135m.md)",
                          stacklevel=2)
        self.hadamard = self.rotates()
        sw = list(self.sens_widths)
        if (not sw or any(b not in tasa_ext.SUPPORTED_BITS for b in sw) or len(set(sw)) != len(sw)
                or sw != sorted(sw)):
            raise ValueError(f"tasa: --sens-widths must be distinct ascending widths of "
                             f"{list(tasa_ext.SUPPORTED_BITS)}, got {sw}")
        if self.beta < 1.0 and not (set(self.objectives) - {"ppl"}):
            raise ValueError("tasa: beta < 1 needs at least one task objective (math, arc)")

    def probe_dtype(self) -> str:
        """The probes' compute dtype: ``sens_dtype``, or for "auto" bfloat16 where bf16 matmuls
        are native (CUDA; a CPU at tasa's avx512 level or above, which includes AVX-512 BF16)
        and float32 elsewhere (:data:`tasa.defaults.SENS_DTYPE`)."""
        if self.sens_dtype != "auto":
            return self.sens_dtype
        if torch.cuda.is_available():
            return "bfloat16"
        native = tasa_ext.build_info()["cpu_isa_detected"] in ("avx512", "avx512vnni", "amx")
        return "bfloat16" if native else "float32"

    def rotates(self) -> bool:
        """Whether the linears (and the probes) are stored rotated: ``hadamard``, or where it is
        None, :data:`tasa.defaults.HADAMARD` for a method with a Hessian (off for RTN)."""
        if self.hadamard is not None:
            return bool(self.hadamard)
        return defaults.HADAMARD and get_method(self.method).needs_hessian

    def measure_fingerprint(self) -> dict:
        d = dataclasses.asdict(self)
        out = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in self.MEASURE_KEYS}
        out["hadamard"] = self.rotates()
        out["sens_dtype"] = self.probe_dtype()
        if get_method(self.sens_method).needs_hessian:    # its probes depend on its calibration
            out.update(n_calib=self.n_calib, seqlen=self.seqlen, damp=self.damp)
        for k, v in defaults.FINGERPRINT_ABSENT.items():   # the only value before the setting
            if out.get(k) == v:                              # existed: files written then match
                del out[k]
        return out
