"""The TASA pipeline, in three layers: the settings (:mod:`.config`), the stages -- data split,
mixture search, sensitivity, allocation, quantization with a plan (:mod:`.stages`, module
docstring: the whole method) -- and the job that runs them and writes the folder (:mod:`.job`).
"""
from .config import PipelineConfig
from .job import run
from .stages import (allocate, build_objectives, check_budget, measure, measure_fingerprint,
                     measure_mixture, mixture_calibration, plan_document, quantize_with_plan,
                     split_data, weights_digest)

__all__ = ["PipelineConfig", "run", "split_data", "mixture_calibration", "measure_mixture",
           "build_objectives", "measure", "allocate", "check_budget", "plan_document",
           "quantize_with_plan", "measure_fingerprint", "weights_digest"]
