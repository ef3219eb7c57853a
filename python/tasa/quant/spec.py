"""Plan and spec types: how each linear is quantized (bits per group, group size, mode,
act-order), the JSON form of a plan, and choosing the target linears of a model.

The bottom of tasa's quantization layers: imports only torch and tasa_ext.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from torch import nn

import tasa_ext
from tasa_ext.format import QuantMode

from .. import defaults

__all__ = ["SUPPORTED_BITS", "LayerSpec", "Plan", "plan_to_dict", "plan_from_dict",
           "resolve_group_size", "default_targets", "uniform_plan"]

SUPPORTED_BITS = tuple(tasa_ext.SUPPORTED_BITS)


@dataclasses.dataclass
class LayerSpec:
    """How one linear is quantized: ``bits`` (one width per logical group, length K/G),
    ``group_size`` G, ``mode`` ("sym"/"asym") and ``act_order``."""

    bits: list
    group_size: int
    mode: str = "sym"
    act_order: bool = False

    def __post_init__(self):
        self.bits = [int(b) for b in self.bits]
        self.group_size = int(self.group_size)
        try:
            self.mode = QuantMode(self.mode).value
        except ValueError:
            raise ValueError(f"tasa: mode must be 'sym' or 'asym', got {self.mode!r}") from None
        self.act_order = bool(self.act_order)

    def validate(self, n_out: int, k_in: int, name: str = "layer") -> None:
        """Clear errors for a spec that does not fit a ``[n_out, k_in]`` weight."""
        G = self.group_size
        if G <= 0 or G % tasa_ext.TILE_K:
            raise ValueError(f"tasa: {name}: group_size={G} must be a positive multiple of "
                             f"{tasa_ext.TILE_K}")
        if k_in % G:
            raise ValueError(f"tasa: {name}: in_features K={k_in} is not divisible by "
                             f"group_size={G}")
        if len(self.bits) != k_in // G:
            raise ValueError(f"tasa: {name}: bit pattern has {len(self.bits)} entries but "
                             f"K/group_size = {k_in}/{G} = {k_in // G} groups")
        bad = sorted({b for b in self.bits if b not in SUPPORTED_BITS})
        if bad:
            raise ValueError(f"tasa: {name}: unsupported bit widths {bad}; "
                             f"supported: {list(SUPPORTED_BITS)}")

    def average_bits(self, n_out: int, k_in: int) -> float:
        return tasa_ext.average_bits(n_out, k_in, self.group_size, self.bits, self.mode,
                                     self.act_order)

    def cost_bits(self, n_out: int, k_in: int) -> int:
        return tasa_ext.cost_bits(n_out, k_in, self.group_size, self.bits, self.mode,
                                  self.act_order)


Plan = dict  # module name -> LayerSpec


def plan_to_dict(plan: Mapping[str, LayerSpec]) -> dict:
    """JSON-ready ``{"format_version": V, "layers": {name: {bits, group_size, mode, act_order}}}``."""
    return {"format_version": tasa_ext.FORMAT_VERSION,
            "layers": {k: dataclasses.asdict(v) for k, v in plan.items()}}


def plan_from_dict(d: Mapping) -> dict:
    """Inverse of :func:`plan_to_dict`; refuses another format version."""
    v = d.get("format_version")
    if v != tasa_ext.FORMAT_VERSION:
        raise ValueError(f"tasa: plan has format_version {v}, this build reads "
                         f"{tasa_ext.FORMAT_VERSION}")
    return {k: LayerSpec(**s) for k, s in d["layers"].items()}


def resolve_group_size(k_in: int, group_size: int) -> int:
    """The largest multiple of 32 that is <= ``group_size`` and divides ``k_in`` (e.g. 96 for
    K=576, G=128). Used by :func:`uniform_plan` with ``fit_group_size=True``."""
    for g in range(group_size - group_size % tasa_ext.TILE_K, 0, -tasa_ext.TILE_K):
        if k_in % g == 0:
            return g
    raise ValueError(f"tasa: no multiple of {tasa_ext.TILE_K} <= {group_size} divides K={k_in}")


def default_targets(model: nn.Module, skip: Sequence[str] = defaults.SKIP_MODULES) -> dict:
    """The nn.Linear modules to quantize: all except names whose last component is in
    ``skip`` (lm_head stays full precision by default; embeddings are not nn.Linear)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[-1] not in skip and name not in skip:
            out[name] = m
    return out


def uniform_plan(model: nn.Module, bits: int, group_size: int = defaults.GROUP_SIZE, mode="sym",
                 act_order: bool = False, skip: Sequence[str] = defaults.SKIP_MODULES,
                 fit_group_size: bool = False) -> dict:
    """Same width for every group of every target linear. ``fit_group_size``: where K is not
    divisible by ``group_size`` use :func:`resolve_group_size` instead of failing."""
    plan = {}
    for name, m in default_targets(model, skip).items():
        G = resolve_group_size(m.in_features, group_size) if fit_group_size else group_size
        spec = LayerSpec([bits] * max(1, m.in_features // G), G, mode, act_order)
        spec.validate(m.out_features, m.in_features, name)
        plan[name] = spec
    return plan


