"""Plan and spec types: how each linear is quantized (bits per group, group size, mode,
act-order), the JSON form of a plan, and choosing the target linears of a model.

The bottom of tasa's quantization layers: imports only torch and tasa_ext.
"""
from __future__ import annotations

import numbers

import dataclasses
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

from torch import nn

import tasa_ext
from tasa_ext.format import QuantMode

from .. import defaults
from ..util import read_json

__all__ = ["SUPPORTED_BITS", "LayerSpec", "Plan", "PLAN_KIND", "PLAN_VERSION", "plan_to_dict",
           "plan_from_dict", "plan_shapes", "read_plan", "check_plan",
           "resolve_group_size", "default_targets", "uniform_plan"]

SUPPORTED_BITS = tuple(tasa_ext.SUPPORTED_BITS)
PLAN_KIND = "tasa.plan"
PLAN_VERSION = 1
_LAYER_KEYS = ("bits", "group_size", "mode", "act_order", "hadamard")
# per-layer keys of the plan.json that `tasa allocate` wrote before plan version 1 (derived from
# the others by the exact cost function, so they are ignored on reading)
_DERIVED_KEYS = ("cost_bits", "avg_bits")


def _is_scalar(x) -> bool:
    """An int / numpy or torch scalar (one width), not a list of widths."""
    return not isinstance(x, (list, tuple)) and getattr(x, "ndim", 0) == 0


@dataclasses.dataclass
class LayerSpec:
    """How one linear is quantized -- tasa's one spec class: ``bits`` (one width per logical
    group, length K/G; empty while the widths are still to be allocated), ``group_size`` G,
    ``mode`` ("sym"/"asym") and ``act_order``; optionally the linear's ``name`` and shape
    ``n_out`` x ``k_in`` (what the allocator needs: exact costs, :meth:`cost`), and
    ``hadamard``: the matrix is quantized and stored rotated (format version 2's incoherence
    rotation, csrc/include/tasa/format.h; every registered method honours it, no bytes).

    Plans map module names to LayerSpecs (:func:`plan_to_dict` / :func:`plan_from_dict`), the
    allocator's items are LayerSpecs with a shape (:func:`tasa.alloc.linear_spec`), TasaLinear
    is built from one and reports its own (``TasaLinear.spec``)."""

    bits: list
    group_size: int
    mode: str = "sym"
    act_order: bool = False
    name: str = ""
    n_out: Optional[int] = None
    k_in: Optional[int] = None
    hadamard: bool = False

    def __post_init__(self):
        self.bits = [int(b) for b in self.bits]
        self.group_size = int(self.group_size)
        try:
            self.mode = QuantMode(self.mode).value
        except ValueError:
            raise ValueError(f"tasa: mode must be 'sym' or 'asym', got {self.mode!r}") from None
        self.act_order = bool(self.act_order)
        self.hadamard = bool(self.hadamard)
        if (self.n_out is None) != (self.k_in is None):
            raise ValueError(f"{self.name}: give both n_out and k_in, or neither")
        if self.n_out is not None:
            self.n_out, self.k_in = int(self.n_out), int(self.k_in)
            if self.n_out <= 0 or self.k_in <= 0:
                raise ValueError(f"{self.name}: shape must be positive, got "
                                 f"[{self.n_out}, {self.k_in}]")
            G = self.group_size
            if G <= 0 or G % tasa_ext.TILE_K or self.k_in % G:
                raise ValueError(f"{self.name}: group_size {G} must be a positive multiple of "
                                 f"{tasa_ext.TILE_K} dividing k_in={self.k_in}")

    # -- with a shape: the allocator's view ------------------------------------------------
    @property
    def fqn(self) -> str:
        return self.name

    def _shape(self):
        if self.n_out is None:
            raise ValueError(f"tasa: {self.name or 'LayerSpec'} has no shape (n_out, k_in)")
        return self.n_out, self.k_in

    @property
    def n_groups(self) -> int:
        return self._shape()[1] // self.group_size

    @property
    def n_weights(self) -> int:
        n, k = self._shape()
        return n * k

    @property
    def n_pad(self) -> int:
        return -(-self._shape()[0] // tasa_ext.COL_BLOCK) * tasa_ext.COL_BLOCK

    def _group_widths(self, bits) -> list:
        """``bits`` (an int: uniform; a list: per group; None: this spec's own) as one
        supported width per group."""
        if bits is None:
            bits = self.bits
        gb = [int(bits)] * self.n_groups if _is_scalar(bits) else [int(b) for b in bits]
        if len(gb) != self.n_groups:
            raise ValueError(f"{self.name}: {len(gb)} group widths for {self.n_groups} groups")
        bad = [b for b in gb if b not in SUPPORTED_BITS]
        if bad:
            raise ValueError(f"{self.name}: unsupported widths {sorted(set(bad))} (supported "
                             f"{SUPPORTED_BITS})")
        return gb

    def cost(self, bits=None) -> int:
        """Exact ``tasa_ext.cost_bits`` of this linear at uniform ``bits`` (int), per-group
        ``bits`` (list) or, by default, its own widths."""
        n, k = self._shape()
        return tasa_ext.cost_bits(n, k, self.group_size, self._group_widths(bits), self.mode,
                                  self.act_order)

    def code_cost(self, bits=None) -> int:
        """The code bits alone, ``sum_g b_g * G * N`` (no scales, zeros, tables or column
        padding): the paper's "average bits" convention counts these."""
        n, _ = self._shape()
        return sum(self._group_widths(bits)) * self.group_size * n

    def with_bits(self, bits) -> "LayerSpec":
        """This linear with the given per-group widths (an int: uniform)."""
        gb = [int(bits)] * self.n_groups if _is_scalar(bits) else [int(b) for b in bits]
        return dataclasses.replace(self, bits=gb)

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

    def to_dict(self) -> dict:
        """``{"bits", "group_size", "mode", "act_order"}`` (and ``"hadamard": true`` for a
        rotated matrix, format version 2): a plan layer / config module entry."""
        d = {"bits": list(self.bits), "group_size": self.group_size, "mode": self.mode,
             "act_order": self.act_order}
        if self.hadamard:
            d["hadamard"] = True
        return d

    @classmethod
    def from_dict(cls, e, name: str = "layer", source: str = "plan",
                  extra_keys: Sequence[str] = ()) -> "LayerSpec":
        """Inverse of :meth:`to_dict`; refuses missing or unknown keys (besides ``extra_keys``),
        naming the layer and the document."""
        if not isinstance(e, Mapping):
            raise ValueError(f"tasa: {source}: layer {name!r} is not an object")
        unknown = sorted(set(e) - set(_LAYER_KEYS) - set(extra_keys))
        missing = [k for k in ("bits", "group_size") if k not in e]
        if unknown or missing:
            raise ValueError(f"tasa: {source}: layer {name!r} has unknown keys {unknown} / lacks "
                             f"{missing}")
        if not isinstance(e["bits"], (list, tuple)):
            raise ValueError(f"tasa: {source}: layer {name!r}: bits must be a list of widths")
        # JSON types exactly: 3.7 was truncated to 3, "4" and 32.0 accepted, NaN a traceback
        bad = [b for b in e["bits"] if isinstance(b, bool) or not isinstance(b, numbers.Integral)]
        if bad:
            raise ValueError(f"tasa: {source}: layer {name!r}: bits must be whole numbers "
                             f"(widths {list(tasa_ext.SUPPORTED_BITS)}), got {bad[0]!r}")
        if not e["bits"] or any(int(b) not in tasa_ext.SUPPORTED_BITS for b in e["bits"]):
            raise ValueError(f"tasa: {source}: layer {name!r}: bits must be a non-empty list of "
                             f"widths {list(tasa_ext.SUPPORTED_BITS)}, got {list(e['bits'])[:8]}")
        gs = e["group_size"]
        if (isinstance(gs, bool) or not isinstance(gs, numbers.Integral) or gs <= 0
                or gs % tasa_ext.TILE_K):
            raise ValueError(f"tasa: {source}: layer {name!r}: group_size must be a positive "
                             f"multiple of {tasa_ext.TILE_K}, got {gs!r}")
        if "act_order" in e and not isinstance(e["act_order"], bool):
            raise ValueError(f"tasa: {source}: layer {name!r}: act_order must be true or false, "
                             f"got {e['act_order']!r}")
        if "hadamard" in e and not isinstance(e["hadamard"], bool):
            raise ValueError(f"tasa: {source}: layer {name!r}: hadamard must be true or false, "
                             f"got {e['hadamard']!r}")
        return cls(e["bits"], gs, e.get("mode", "sym"), e.get("act_order", False),
                   hadamard=e.get("hadamard", False))

    def average_bits(self, n_out: int, k_in: int) -> float:
        return tasa_ext.average_bits(n_out, k_in, self.group_size, self.bits, self.mode,
                                     self.act_order)

    def cost_bits(self, n_out: int, k_in: int) -> int:
        return tasa_ext.cost_bits(n_out, k_in, self.group_size, self.bits, self.mode,
                                  self.act_order)


Plan = dict  # module name -> LayerSpec

def plan_to_dict(plan: Mapping[str, LayerSpec], shapes: Optional[Mapping[str, tuple]] = None,
                 **meta) -> dict:
    """The one plan format (version :data:`PLAN_VERSION`), JSON-ready::

        {"kind": "tasa.plan", "version": 1, "format_version": V, <meta ...>,
         "layers": {name: {"bits": [width per logical group], "group_size": G,
                           "mode": "sym"|"asym", "act_order": bool, "shape": [n_out, k_in]}}}

    ``shape`` is written where ``shapes[name]`` is given (a plan read back is then refused for a
    model whose module has another shape); ``meta``: settings and summary to keep beside the
    layers (target bits, beta, alpha, ...). Written by ``tasa allocate``, ``tasa quantize``
    (plan.json) and :func:`tasa.quantize`; read by :func:`plan_from_dict` / :func:`read_plan`."""
    bad = [k for k in meta if k in ("kind", "version", "format_version", "layers")]
    if bad:
        raise ValueError(f"tasa: plan metadata may not use the reserved keys {bad}")
    layers = {}
    for name, v in plan.items():
        e = v.to_dict()
        if shapes is not None and name in shapes:
            e["shape"] = [int(x) for x in shapes[name]]
        layers[name] = e
    return {"kind": PLAN_KIND, "version": PLAN_VERSION, "format_version": tasa_ext.FORMAT_VERSION,
            **meta, "layers": layers}


def plan_from_dict(d: Mapping, source: str = "plan") -> dict:
    """``{name: LayerSpec}`` of a plan document (:func:`plan_to_dict`). Also reads the layouts
    tasa wrote before plan version 1 (``{"format_version", "layers"}``, per-layer cost_bits /
    avg_bits ignored). Refuses another kind, version or packing format version, and layers with
    missing or unknown keys, naming the layer."""
    if not isinstance(d, Mapping):
        raise ValueError(f"tasa: {source} is not a JSON object")
    kind = d.get("kind")
    if kind not in (None, PLAN_KIND):
        raise ValueError(f"tasa: {source} is a {kind!r} document, not a tasa plan")
    if kind == PLAN_KIND and d.get("version") != PLAN_VERSION:
        raise ValueError(f"tasa: {source} is plan version {d.get('version')!r}; this tasa reads "
                         f"version {PLAN_VERSION}")
    tasa_ext.check_format_version(d.get("format_version"), str(source))
    layers = d.get("layers")
    if not isinstance(layers, Mapping):
        raise ValueError(f"tasa: {source}: layers must be an object {{module name: layer}}, got "
                         f"a {type(layers).__name__}")
    if not layers:
        raise ValueError(f"tasa: {source} has no layers")
    extra = ("shape",) + (_DERIVED_KEYS if kind is None else ())
    return {name: LayerSpec.from_dict(e, name, source, extra) for name, e in layers.items()}


def plan_shapes(d: Mapping) -> dict:
    """``{name: (n_out, k_in)}`` recorded in a plan document (layers without a shape omitted)."""
    return {n: tuple(int(x) for x in e["shape"]) for n, e in d.get("layers", {}).items()
            if isinstance(e, Mapping) and "shape" in e}


def read_plan(path) -> Tuple[dict, dict]:
    """``(plan {name: LayerSpec}, the whole document)`` of a plan.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "plan.json"
    doc = read_json(p, "plan file")
    return plan_from_dict(doc, source=str(p)), doc


def check_plan(model: nn.Module, plan: Mapping[str, LayerSpec],
               shapes: Optional[Mapping[str, tuple]] = None) -> None:
    """Raises ``ValueError`` naming the module when ``plan`` does not fit ``model``: a module the
    model does not have, one that is not an ``nn.Linear``, a recorded shape that differs, or
    widths / group size that do not fit the module's in_features."""
    if not plan:
        raise ValueError("tasa: the plan has no layers")
    for name, spec in plan.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"tasa: the plan names module {name!r}, which this "
                             f"{type(model).__name__} does not have (a plan for another "
                             f"model?)") from None
        if not isinstance(m, nn.Linear):
            raise ValueError(f"tasa: the plan names {name!r}, a {type(m).__name__}, not an "
                             f"nn.Linear (already quantized?)")
        if m is model.get_output_embeddings():
            raise ValueError(f"tasa: the plan names the output projection {name!r}: it is "
                             f"quantized with the embedding (--embed-bits / embed_bits=), not "
                             f"by the plan")
        if shapes is not None and name in shapes and tuple(shapes[name]) != (m.out_features,
                                                                              m.in_features):
            raise ValueError(f"tasa: the plan was made for {name} of shape "
                             f"{list(shapes[name])}, this model's is "
                             f"{[m.out_features, m.in_features]} (a plan for another model?)")
        spec.validate(m.out_features, m.in_features, name)
    left = sorted(set(default_targets(model)) - set(plan))
    if left:
        # they would stay in full precision, silently, and out of the reported average
        raise ValueError(f"tasa: the plan leaves out {len(left)} of the model's linears "
                         f"({', '.join(left[:4])}{' ...' if len(left) > 4 else ''}): each needs "
                         f"a width (a plan from `tasa allocate` names them all)")


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
                 fit_group_size: bool = False, hadamard: bool = False) -> dict:
    """Same width for every group of every target linear. ``fit_group_size``: where K is not
    divisible by ``group_size`` use :func:`resolve_group_size` instead of failing;
    ``hadamard``: every linear rotated (:class:`LayerSpec`)."""
    plan = {}
    for name, m in default_targets(model, skip).items():
        G = resolve_group_size(m.in_features, group_size) if fit_group_size else group_size
        spec = LayerSpec([bits] * max(1, m.in_features // G), G, mode, act_order,
                         hadamard=hadamard)
        spec.validate(m.out_features, m.in_features, name)
        plan[name] = spec
    return plan


