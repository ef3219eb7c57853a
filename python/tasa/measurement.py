"""Typed, versioned measurement objects: what ``tasa quantize`` measures once and every later
allocation, report and benchmark reads (exllamav2's "measure once, allocate many times").

``measurement.json`` is :meth:`Measurement.to_dict`: ``{"kind": "tasa.measurement", "version":
1, "config", "format_version", "created", "linears", "units", "data", "mixture",
"sensitivity"}``. Files written by version 1 load unchanged; keys this version does not know
are kept (``extra``) and written back, so nothing a newer writer added is lost on resume.

Imports nothing from tasa but the defaults and the file writer (a pure data layer).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from . import defaults
from .util import read_json, write_json_atomic

__all__ = ["MEASUREMENT_KIND", "MEASUREMENT_VERSION", "MixtureResult", "SensitivityResult",
           "Measurement", "settings_diff", "check_settings"]

MEASUREMENT_KIND = "tasa.measurement"
MEASUREMENT_VERSION = 1


def settings_diff(recorded: Mapping, current: Mapping) -> List[str]:
    """The names of the settings whose values differ between two settings mappings (a key
    present in only one counts)."""
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def check_settings(recorded: Mapping, current: Mapping, what: str, hint: str = "") -> None:
    """Raises ``ValueError`` naming every differing setting when ``what`` (e.g. a measurement
    file) was made with settings other than ``current`` -- never a silent reuse."""
    diff = settings_diff(recorded, current)
    if diff:
        absent = defaults.FINGERPRINT_ABSENT

        def say(d, k):       # a setting left out of a fingerprint at its first value
            return repr(d[k]) if k in d else (f"{absent[k]!r} (unrecorded: the value before "
                                              f"the setting existed)" if k in absent else "None")
        detail = ", ".join(f"{k}: {say(recorded, k)} there, {say(current, k)} now" for k in diff)
        # the flags that reproduce the file's settings (an unrecorded one: its first value,
        # e.g. --sens-method rtn for a file measured before gptq-mse probes were the default)
        def flag(k):
            v = recorded.get(k, absent[k])
            name = k.replace('_', '-')
            if isinstance(v, bool):          # a switch: --hadamard / --no-hadamard
                return f"--{name}" if v else f"--no-{name}"
            return f"--{name} {v}"
        flags = [flag(k) for k in diff if k in absent]
        raise ValueError(f"tasa: {what} was made with other settings ({detail})"
                         + (f"; to reuse it give {' '.join(flags)}" if flags else "")
                         + (f"; {hint}" if hint else ""))


def _split(cls, d: Mapping):
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names}
    return known, extra


# fields added after the first version-1 files: left out while empty / unset, so those files
# round-trip unchanged (and readers that predate the fields see nothing new)
_LATER = ("linear_errors", "delta_by_width", "base_items", "item_tokens", "item_delta", "noise",
          "compute_dtype", "unit_error")


def _to_dict(obj) -> dict:
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "extra"}
    for k in _LATER:
        if k in out and out[k] in (None, {}):
            del out[k]
    out.update(obj.extra)
    return out


@dataclasses.dataclass
class MixtureResult:
    """Stage 2: the calibration-mixture search (see :mod:`tasa.mixture`). ``alpha_star`` is the
    share of general text in the GPTQ calibration mix; ``group_errors[fqn]`` the per-group RTN
    errors ``[n_groups][len(group_error_widths)]`` under ``diag(H_alpha*)``; ``linear_errors``
    the whole-linear errors of the baselines (see the field)."""

    alpha_star: float
    f_star: float
    alpha_searched: bool = True
    best_on_grid: Any = None
    table: list = dataclasses.field(default_factory=list)
    curve: dict = dataclasses.field(default_factory=dict)
    layer_alpha: dict = dataclasses.field(default_factory=dict)
    shared_inputs: dict = dataclasses.field(default_factory=dict)
    group_error_widths: list = dataclasses.field(default_factory=list)
    group_errors: dict = dataclasses.field(default_factory=dict)
    # per linear, per width of group_error_widths: "gen" = sum_k diag(H_gen)_k ||W_k - RTN(W)_k||^2
    # (GPTQ's output-error proxy on general text), "rel" = ||W - RTN(W)||^2 / ||W||^2 (HIGGS's
    # relative l2 error): the non-task-aware baselines' inputs
    linear_errors: dict = dataclasses.field(default_factory=dict)
    tokens: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "MixtureResult":
        known, extra = _split(cls, d)
        missing = [k for k in ("alpha_star", "f_star") if k not in known]
        if missing:
            raise ValueError(f"tasa: mixture result lacks {missing}")
        return cls(**known, extra=extra)


@dataclasses.dataclass
class SensitivityResult:
    """Stage 3: per-unit loss increases when the unit alone is RTN-quantized.

    ``delta[unit][objective]``: at ``bits`` (the first probe width); ``delta_by_width[str(b)]``
    the same at every further measured width ``b`` (empty in files written before widths were
    measured apart, which extrapolate from ``bits``). Per item (sequence) of each objective:
    ``base_items[obj]`` the unquantized summed NLL, ``item_tokens[obj]`` the scored tokens and
    ``item_delta[str(b)][unit][obj]`` the summed NLL increase -- ``delta`` is
    ``sum(item_delta) / sum(item_tokens)``; the noise bounds resample the items.
    ``unit_error[str(b)][unit]``: the output error ``sum_l tr(dW_l H_l dW_l^T)`` of the unit's
    linears quantized alone by the probes' quantizer at width ``b`` (``H`` at alpha*), for every
    width the allocation may give below 8 bits: the per-unit shape of the error across widths
    that carries a probe to the widths that were not probed (:func:`tasa.scoring.unit_errors`).
    ``base``: the unquantized losses; ``illusion``: the rank agreement between objectives
    (:func:`tasa.stats.illusion_report`), ``noise``: its error bars
    (:func:`tasa.stats.noise_report`). Written after every probe; ``complete`` once every unit
    is measured at every width."""

    objectives: list = dataclasses.field(default_factory=list)
    objective_data: list = dataclasses.field(default_factory=list)
    delta: dict = dataclasses.field(default_factory=dict)
    bits: int = defaults.SENS_BITS
    seconds: float = 0.0
    base: Optional[dict] = None
    illusion: Any = None
    complete: bool = False
    delta_by_width: dict = dataclasses.field(default_factory=dict)
    base_items: dict = dataclasses.field(default_factory=dict)
    item_tokens: dict = dataclasses.field(default_factory=dict)
    item_delta: dict = dataclasses.field(default_factory=dict)
    noise: Any = None
    compute_dtype: Optional[str] = None        # None: float32 (files before the option)
    unit_error: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        d = _to_dict(self)
        if d["illusion"] is None:          # version-1 files omit it until it is computed
            del d["illusion"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "SensitivityResult":
        known, extra = _split(cls, d)
        return cls(**known, extra=extra)

    @property
    def widths(self) -> List[int]:
        """Every measured probe width, ascending."""
        return sorted({int(self.bits)} | {int(b) for b in self.delta_by_width})

    def deltas(self, bits: Optional[int] = None) -> dict:
        """``{unit: {objective: delta}}`` at ``bits`` (default: :attr:`bits`); ``{}`` where
        nothing was measured at that width yet."""
        if bits is None or int(bits) == int(self.bits):
            return self.delta
        return self.delta_by_width.setdefault(str(int(bits)), {})

    def profile(self, units, bits: Optional[int] = None) -> Dict[str, list]:
        """``{objective: [delta of each unit, in the order of units]}`` at ``bits``."""
        d = self.deltas(bits)
        return {k: [d[u][k] for u in units] for k in self.objectives}

    def item_profile(self, units, bits: Optional[int] = None) -> Dict[str, list]:
        """``{objective: [[summed NLL increase per item] of each unit]}`` at ``bits`` (needs
        the per-item record)."""
        d = self.item_delta.get(str(int(self.bits if bits is None else bits)), {})
        missing = [u for u in units if u not in d]
        if missing:
            raise ValueError(f"tasa: no per-item record for {len(missing)} unit(s) at "
                             f"{bits or self.bits} bits (a measurement from before items were kept)")
        return {k: [d[u][k] for u in units] for k in self.objectives}


@dataclasses.dataclass
class Measurement:
    """Everything measured about one model under one set of measurement settings (``config``:
    the pipeline's measure fingerprint). ``linears[fqn] = {n_out, k_in, group_size, mode}``,
    ``units[name] = {block, linears}`` (the items the allocator gives one width), ``data`` the
    pool sizes of the split."""

    config: dict
    format_version: int
    created: str = ""
    linears: dict = dataclasses.field(default_factory=dict)
    units: dict = dataclasses.field(default_factory=dict)
    data: Optional[dict] = None
    mixture: Optional[MixtureResult] = None
    sensitivity: Optional[SensitivityResult] = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.sensitivity is not None and bool(self.sensitivity.complete)

    def to_dict(self) -> dict:
        d = {"kind": MEASUREMENT_KIND, "version": MEASUREMENT_VERSION}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.name in ("mixture", "sensitivity", "data") and v is None:
                continue
            d[f.name] = v.to_dict() if hasattr(v, "to_dict") else v
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "measurement") -> "Measurement":
        if not isinstance(d, Mapping):
            raise ValueError(f"tasa: {source} is not a JSON object (not a tasa measurement)")
        if d.get("kind") != MEASUREMENT_KIND or d.get("version") != MEASUREMENT_VERSION:
            raise ValueError(f"tasa: {source} is not a version-{MEASUREMENT_VERSION} tasa "
                             f"measurement (kind {d.get('kind')!r}, version {d.get('version')!r})")
        body = {k: v for k, v in d.items() if k not in ("kind", "version")}
        known, extra = _split(cls, body)
        if "config" not in known or "format_version" not in known:
            raise ValueError(f"tasa: {source} lacks its config or format_version")
        for key in ("config", "linears", "units"):
            if key in known and not isinstance(known[key], Mapping):
                raise ValueError(f"tasa: {source}: {key} must be an object")
        for key, typ in (("mixture", MixtureResult), ("sensitivity", SensitivityResult)):
            if known.get(key) is None:
                continue
            if not isinstance(known[key], Mapping):
                raise ValueError(f"tasa: {source}: {key} must be an object")
            try:
                known[key] = typ.from_dict(known[key])
            except (TypeError, AttributeError, KeyError) as e:
                raise ValueError(f"tasa: {source}: the {key} section is malformed ({e})") from None
        return cls(**known, extra=extra)

    @classmethod
    def load(cls, path) -> "Measurement":
        """From ``measurement.json`` or a folder holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / defaults.MEASUREMENT_NAME
        if not p.is_file():
            raise FileNotFoundError(f"tasa: {p} not found")
        return cls.from_dict(read_json(p, "measurement"), source=str(p))

    def save(self, path) -> None:
        """Atomically (a reader sees the old file or the new one)."""
        write_json_atomic(path, self.to_dict())

    def check_settings(self, current: Mapping, what: str, hint: str = "") -> None:
        check_settings(self.config, current, what, hint)
