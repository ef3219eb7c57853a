"""The defaults shared across tasa's layers: every module, the CLI and the benchmarks read them
from here. The pipeline's own settings (sample counts, sequence lengths, the holdout share ...)
have their defaults in one place too, the fields of :class:`tasa.pipeline.PipelineConfig`
(which reads the shared ones from here); the CLI's --help reads both, never repeats them.

Imports nothing from tasa (the bottom of the import graph).
"""
from __future__ import annotations

from typing import Tuple

__all__ = ["WIDTHS", "BETA", "GROUP_SIZE", "MODE", "SKIP_MODULES", "HEAD_BITS", "UNTIED_EMBED_BITS", "OBJECTIVES", "SENS_WIDTHS", "SENS_BITS",
           "SENS_DTYPE", "SENS_SCORING", "SENS_SCORINGS", "SENS_ITEM_SPAN", "SENS_ITEM_SPAN_OBJECTIVES", "SENS_METHOD", "GRANULARITY",
           "FINGERPRINT_ABSENT", "DRIFT_TASK_TOKENS", "METHOD", "MODEL", "BITS", "MEASUREMENT_NAME",
           "PLAN_NAME", "RUN_NAME", "HADAMARD"]

# the paper's allocation set: 3-, 4- and occasionally 8-bit layers (2 bits is supported by the
# format but collapses small models, so it is opt-in through --widths)
WIDTHS: Tuple[int, ...] = (3, 4, 8)
# weight of the perplexity objective in the aggregate sensitivity (0 = tasks only, 1 = ppl only)
BETA: float = 0.5
GROUP_SIZE: int = 128
# the pipeline's default mode: asymmetric min/max groups (zero point per group and column)
MODE: str = "asym"
# the token embedding and output projection, RTN-quantized after GPTQ. Chosen by measurement
# (benchmarks/results/embed_bits.md): the output projection -- and a table tied to it -- at 8
# bits (KL to the reference +0.0001-0.0005, against 0.2-1.2 for a 3.5-bit decoder; 4 bits cost
# +0.03-0.16); an untied input embedding at 4 bits (Qwen2.5-Coder-0.5B: +0.0025 KL, ~1% of the
# decoder's; the lookup's error enters once, at the input)
HEAD_BITS: int = 8
UNTIED_EMBED_BITS: int = 4
# modules left in full precision by default (matched on the last name component or the full name)
SKIP_MODULES: Tuple[str, ...] = ("lm_head",)
# sensitivity objectives: held-out general text, GSM8K gold solutions, ARC correct answers
OBJECTIVES: Tuple[str, ...] = ("ppl", "math", "arc")
# widths of the probes of the sensitivity stage: every unit is probed at each; a width not
# probed gets the nearest lower one's loss increase times the unit's own quantizer-error ratio
# (tasa.scoring.unit_errors; 8 bits: the 4-bit value x 4^-4). 3 bits alone since 2026-12-07:
# on SmolLM2 (README job, AVX2 EPYC) the measured 4-bit probes were 0.253x the 3-bit ones
# (median over units) where the GPTQ-MSE error ratio said 0.254 (0.23-0.26), carried and
# measured 4-bit errors ranked alike (Spearman 0.94, Kendall 0.80; split-half 0.84 / 0.87); the
# 3.5-bit plan came out identical, the 4.25-bit plan swapped two MLPs: KL to the reference
# +0.0022 +- 0.0020 on WikiText-2 (0.134 vs 0.132), -0.0028 +- 0.0017 on GSM8K text (0.072 vs
# 0.074), gold NLL -0.021: a wash, for half the probes (60 instead of 120: ~8 of the job's 16
# probe minutes there):
# benchmarks/results/probe_widths_smollm2-135m.md
SENS_WIDTHS: Tuple[int, ...] = (3,)
SENS_BITS: int = SENS_WIDTHS[0]
# the probes' forward passes: bf16 autocast (matmuls bf16, residual/norms/head fp32) where the
# machine multiplies bf16 natively (a GPU; a CPU with AVX-512 BF16 or AMX), fp32 elsewhere
# ("auto"). Measured on an AVX2-only AMD EPYC (2026-12-06): a 4096-token SmolLM2 forward took
# 58 s under bf16 autocast against 8.3 s in fp32 (bf16 emulated), so the README job's probes
# ran ~40 s each instead of ~4 s on the AVX-512 BF16 machines.
SENS_DTYPE: str = "auto"
# how a probe is scored (tasa.sensitivity): "nll" = gold-token NLL increase, "kl" = KL divergence
# from the full-precision model at every scored position (issue 27 item 1)
SENS_SCORINGS: tuple = ("nll", "kl")
# KL: the same probes' unit rankings are far more reliable (split-half Kendall tau 0.72-0.90
# against 0.15-0.68 with NLL, SmolLM2, benchmarks/results/probe_scoring_smollm2-135m.md) and
# the job's model moved less: KL to the reference 0.62 -> 0.51 at 3.5 bits, GSM8K-text KL
# 0.205 -> 0.166 at 4.25 (benchmarks/results/budget_sweep_smollm2.md)
SENS_SCORING: str = "kl"
# the question/answer objectives (math, arc) whose probes score every token of the item after
# its first (the question's too), not only the gold continuation given the question (lm-eval's
# continuation). Under KL scoring a question token's next-token distribution moves with the
# unit as an answer token's does, at no extra forward pass. Measured on SmolLM2 (the same probe
# weights; benchmarks/results/probe_span_smollm2-135m.md): ARC's 48 items score 196 answer
# tokens, 1497 with their questions, and its split-half reliability went 0.75 -> 0.83, but its
# ranking moved toward the ppl one (Kendall tau 0.47 -> 0.65: the questions' drift is mostly
# general-text drift); GSM8K's questions lowered the math reliability 0.84 -> 0.75. With arc
# spanned the 3.5/4.0/4.25-bit plans did not change; at 3.75 bits, where 6 units moved, the
# KL to the reference was unchanged (-0.004 +- 0.005 general, -0.003 +- 0.004 GSM8K text) and
# the GSM8K gold NLL worse by 0.030 +- 0.011 (paired): more reliable, not better -- answers only
# by default, the item span an option.
SENS_ITEM_SPAN_OBJECTIVES: tuple = ("math", "arc")
SENS_ITEM_SPAN: Tuple[str, ...] = ()
# settings a measurement fingerprint leaves out at these values (files written before the
# setting existed still match); error messages name them instead of None
FINGERPRINT_ABSENT: dict = {"sens_scoring": "nll", "sens_method": "rtn", "hadamard": False,
                             "sens_item_span": []}
# format version 2's in-group Hadamard rotation for the methods with a Hessian (gptq, gptq-mse;
# RTN never by default): uniform GPTQ-MSE on SmolLM2, KL to the reference W3 0.653 -> 0.425,
# W4 0.191 -> 0.120, GSM8K gold NLL -0.19 at both (paired, beyond noise); RTN W3 2.68 -> 3.81
# (benchmarks/results/hadamard_probe_smollm2-135m.md)
HADAMARD: bool = True
# the quantizer of the sensitivity probes (a name of tasa.quant.METHODS): "rtn" probes every unit
# with round-to-nearest; a Hessian method (gptq, gptq-mse) probes each unit with the quantizer the
# model is then quantized with, calibrated like the final quantization at alpha* (issue 27 item
# 2; tasa.pipeline.stages.probe_weights). gptq-mse: the README job's model moved less from the
# reference (SmolLM2 4.25 bits: KL 0.265 -> 0.217, perplexity 32.5 -> 30.4, GSM8K NLL +0.154 ->
# +0.126; paired over sequences -0.051 +- 0.008 nats, benchmarks/results/probe_method_smollm2.md)
# for 66 s more (the job 12:55 -> 13:39 on the 2-core AMD EPYC, with the column-loop and
# clipping-search kernels)
SENS_METHOD: str = "gptq-mse"
# sensitivity / allocation unit
GRANULARITY: str = "sublayer"
# the per-matrix quantizer under a plan (a name of tasa.quant.METHODS). gptq-mse (GPTQ with a
# diag(H)-weighted clipping search per group) halved GPTQ's KL to the reference at uniform 3
# bits on SmolLM2 (1.29 -> 0.66 nats/token, paired -0.63 +- 0.05) and cut it by a third at 4
# bits (0.30 -> 0.20, -0.10 +- 0.01): benchmarks/results/mse_methods_smollm2-135m.md
METHOD: str = "gptq-mse"
# the main job
MODEL: str = "smollm2-135m"
# the default budget (decoder-linear storage bits): the smallest of 3.5 / 4.0 / 4.25 / 4.5 whose
# SmolLM2 model draws no warning from the job's drift check (3.5: perplexity 2.0x, KL 0.62;
# 4.0: perplexity 1.5x; 4.25: +33%, KL 0.27): benchmarks/results/budget_sweep_smollm2.md.
# The paper's 3.5 is --bits 3.5.
BITS: float = 4.25
# file names in an output folder
MEASUREMENT_NAME = "measurement.json"
PLAN_NAME = "plan.json"
RUN_NAME = "run.json"
# the job's drift check (run.json "drift", report.md "Result"): GSM8K test tokens scored beside
# the eval windows of general text (a forward pass each with the reference and the quantized
# model: ~4 s on SmolLM2 on the 2-core machine)
DRIFT_TASK_TOKENS: int = 4096
