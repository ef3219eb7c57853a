"""The tasa packed-weight format, as seen from Python.

The specification (bit diagrams, tensor shapes, cost model) is ``csrc/include/tasa/format.h``;
the constants and the exact cost function below are read from the compiled module built from
that header, so there is one source of truth.
"""
from __future__ import annotations

import enum
from typing import Sequence

from ._build import load_extension

_C = load_extension()

FORMAT_VERSION: int = int(_C.FORMAT_VERSION)
#: the versions this build reads: version 2 added rotated matrices (format.h), a version-1 file
#: is a version-2 file without them
READS_FORMAT_VERSIONS: tuple = (1, FORMAT_VERSION)
TILE_K: int = int(_C.TILE_K)          # rows of one packed tile (group_size is a multiple of it)
COL_BLOCK: int = int(_C.COL_BLOCK)    # output columns per packed column block
SUPPORTED_BITS: tuple = tuple(_C.SUPPORTED_BITS)


def check_format_version(v, source: str, hint: str = "re-quantize, or use a tasa that reads it"):
    """``v`` when it is a packing format version this build reads (an int of
    :data:`READS_FORMAT_VERSIONS`), else ValueError naming ``source``, the versions read and
    what to do (``hint``). Every reader of a tasa file asks here: one message, one list."""
    if isinstance(v, bool) or not isinstance(v, int) or v not in READS_FORMAT_VERSIONS:
        raise ValueError(f"tasa: {source} has format_version {v!r}; this build of tasa_ext reads "
                         f"format_version {' or '.join(map(str, READS_FORMAT_VERSIONS))} (an "
                         f"integer); {hint}")
    return v


class QuantMode(str, enum.Enum):
    """How a group's codes map to weights."""

    SYM = "sym"
    """w = (q - 2^(b-1)) * s; one fp16 scale per (group, column), no zeros stored."""
    ASYM = "asym"
    """w = (q - z) * s; fp16 scale and fp16 zero point per (group, column)."""


def cost_bits(n_out: int, k_in: int, group_size: int, group_bits: Sequence[int],
              mode: QuantMode | str = QuantMode.ASYM, act_order: bool = False) -> int:
    """Exact stored bits of one packed ``[n_out, k_in]`` matrix: codes (column padding
    included), fp16 scales, fp16 zeros (asymmetric), the group table and the permutation."""
    mode = QuantMode(mode)
    return int(_C.cost_bits(int(n_out), int(k_in), int(group_size), [int(b) for b in group_bits],
                            mode is QuantMode.ASYM, bool(act_order)))


def average_bits(n_out: int, k_in: int, group_size: int, group_bits: Sequence[int],
                 mode: QuantMode | str = QuantMode.ASYM, act_order: bool = False) -> float:
    """``cost_bits / (n_out * k_in)``: what "average bits" means everywhere in tasa."""
    return cost_bits(n_out, k_in, group_size, group_bits, mode, act_order) / (n_out * k_in)
