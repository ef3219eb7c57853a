"""The TASA pipeline, in three layers: the settings (:mod:`.config`), the stages -- data split,
mixture search, sensitivity, allocation, quantization with a plan (:mod:`.stages`, module
docstring: the whole method) -- and the job that runs them and writes the folder (:mod:`.job`).
"""
from .config import PipelineConfig
from .job import run, run_lazy
from .stages import (SCORINGS, allocate, build_objectives, check_budget, error_widths, gptq_calibration,
                     measure, measure_fingerprint, measure_mixture, mixture_calibration, noise_bounds,
                     plan_document, probe_weights, quantize_with_plan, split_data, unit_errors, weights_digest)

__all__ = ["PipelineConfig", "run", "run_lazy", "split_data", "mixture_calibration", "measure_mixture",
           "build_objectives", "measure", "allocate", "check_budget", "plan_document",
           "quantize_with_plan", "measure_fingerprint", "weights_digest", "SCORINGS",
           "unit_errors", "noise_bounds", "gptq_calibration", "probe_weights", "error_widths"]
