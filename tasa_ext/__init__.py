"""tasa_ext: the compiled kernels of tasa behind registered torch ops.

The op schemas live in :mod:`tasa_ext.ops` (defined once, with fake kernels for torch.compile);
the CPU (and, where built, CUDA) implementations come from the compiled module ``tasa_ext._C``;
:mod:`tasa_ext.reference` holds pure-torch twins that serve as the test oracle; the packing
format's constants and exact cost function are in :mod:`tasa_ext.format` (from
``csrc/include/tasa/format.h``). :mod:`tasa_ext.testing` makes random packed matrices (tests,
benchmarks, ``tasa demo``); :mod:`tasa_ext.machine` holds the CPU-name lookup and the timer.
"""
from . import ops
from .format import (
    COL_BLOCK,
    FORMAT_VERSION,
    READS_FORMAT_VERSIONS,
    SUPPORTED_BITS,
    TILE_K,
    QuantMode,
    average_bits,
    check_format_version,
    cost_bits,
)
from .ops import (build_info, dequant, embed, gemm, gptq_cols_, hadamard, hadamard_block,
                  hessian_accumulate_, mse_params, pack, set_cpu_isa, unpack)

__all__ = [
    "COL_BLOCK", "FORMAT_VERSION", "READS_FORMAT_VERSIONS", "SUPPORTED_BITS", "TILE_K", "QuantMode", "average_bits",
    "check_format_version", "cost_bits", "build_info", "dequant", "embed", "gemm", "gptq_cols_", "hadamard", "hadamard_block", "hessian_accumulate_", "mse_params", "pack", "set_cpu_isa",
    "unpack", "ops",
]
