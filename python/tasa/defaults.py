"""One home for tasa's defaults: every module, the CLI and the benchmarks read them from here.

Imports nothing from tasa (the bottom of the import graph).
"""
from __future__ import annotations

from typing import Tuple

__all__ = ["WIDTHS", "BETA", "GROUP_SIZE", "MODE", "SKIP_MODULES", "OBJECTIVES", "SENS_BITS",
           "MODEL", "BITS", "MEASUREMENT_NAME", "PLAN_NAME", "RUN_NAME"]

# the paper's allocation set: 3-, 4- and occasionally 8-bit layers (2 bits is supported by the
# format but collapses small models, so it is opt-in through --widths)
WIDTHS: Tuple[int, ...] = (3, 4, 8)
# weight of the perplexity objective in the aggregate sensitivity (0 = tasks only, 1 = ppl only)
BETA: float = 0.5
GROUP_SIZE: int = 128
# the pipeline's default mode: asymmetric min/max groups (zero point per group and column)
MODE: str = "asym"
# modules left in full precision by default (matched on the last name component or the full name)
SKIP_MODULES: Tuple[str, ...] = ("lm_head",)
# sensitivity objectives: held-out general text, GSM8K gold solutions, ARC correct answers
OBJECTIVES: Tuple[str, ...] = ("ppl", "math", "arc")
# width of the RTN probe of the sensitivity stage
SENS_BITS: int = 3
# the main job
MODEL: str = "smollm2-135m"
BITS: float = 3.5
# file names in an output folder
MEASUREMENT_NAME = "measurement.json"
PLAN_NAME = "plan.json"
RUN_NAME = "run.json"
