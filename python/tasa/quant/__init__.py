"""Per-matrix quantization: plan/spec types (:mod:`.spec`), the method registry
(:mod:`.methods`), round-to-nearest and the one RTN parameter routine (:mod:`.rtn`), GPTQ
(:mod:`.gptq`), the clipping search (:mod:`.mse`: rtn-mse, gptq-mse). Layers: spec, methods
<- rtn <- gptq <- mse; nothing here knows about models beyond
picking target linears. A new method: one module with one ``@register_method`` class, imported
below (the import registers it)."""
from .gptq import GPTQ, output_error, quantize_gptq
from .methods import METHODS, Method, get_method, method_names, register_method
from .mse import GPTQMSE, RTNMSE, mse_params, quantize_rtn_mse
from .rtn import (RTN, QuantizedWeight, check_weight, quantize_codes, quantize_rtn, rtn_fake_quant,
                  rtn_params)
from .spec import (PLAN_KIND, PLAN_VERSION, SUPPORTED_BITS, LayerSpec, Plan, check_plan,
                   default_targets, plan_from_dict, plan_shapes, plan_to_dict, read_plan,
                   resolve_group_size, uniform_plan)

__all__ = ["SUPPORTED_BITS", "LayerSpec", "Plan", "PLAN_KIND", "PLAN_VERSION", "plan_to_dict",
           "plan_from_dict", "plan_shapes", "read_plan", "check_plan",
           "resolve_group_size", "default_targets", "uniform_plan", "QuantizedWeight",
           "check_weight", "rtn_params", "quantize_codes", "rtn_fake_quant", "quantize_rtn",
           "quantize_gptq", "output_error", "Method", "METHODS", "register_method",
           "get_method", "method_names", "RTN", "GPTQ", "RTNMSE", "GPTQMSE", "mse_params",
           "quantize_rtn_mse"]
