"""The registry of per-matrix quantization methods.

A method turns one weight ``W [N, K]`` and its :class:`~tasa.quant.spec.LayerSpec` (widths per
group, group size, mode, act-order) into a :class:`~tasa.quant.rtn.QuantizedWeight`, given the
layer-input Hessian when it asks for one (``needs_hessian``). Everything above this layer (the
driver's block-wise calibration, the lazy job, the pipeline, the API and the command line) asks
the registry, so a new method is one file with one ``@register_method`` class, imported by
``tasa/quant/__init__.py`` -- nothing else changes: ``--method NAME`` and ``tasa.quantize(...,
method=NAME)`` list it, and a method without ``needs_hessian`` runs without data everywhere.

(The shape follows torchao's ``quantize_(model, Config())`` with a handler registered per config
type: the caller names what it wants, the registry finds who does it.)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional

import torch

import tasa_ext

__all__ = ["Method", "METHODS", "register_method", "get_method", "method_names"]


class Method:
    """One quantization method. Subclasses set :attr:`name` and :attr:`needs_hessian` and
    implement :meth:`quantize`.

    A spec with ``hadamard`` (format version 2's incoherence rotation) is honoured here, once,
    for every method: :meth:`quantize` of each subclass is wrapped so that it quantizes
    ``W R`` with the Hessian ``R^T H R`` of the rotated inputs and returns the weight marked
    rotated (``QuantizedWeight.hadamard``: dequantize() rotates it back, TasaLinear rotates x).
    """

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "quantize" in cls.__dict__:
            cls.quantize = _honour_rotation(cls.__dict__["quantize"])

    name: str = ""
    #: True: :meth:`quantize` gets ``H [K, K]``, the mean of ``2 x x^T`` over calibration inputs
    #: (the driver runs the block-wise capture); False: data-free.
    needs_hessian: bool = False
    description: str = ""

    def quantize(self, W: torch.Tensor, spec, H: Optional[torch.Tensor] = None, *,
                 damp: float = 0.01, name: str = "weight"):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<tasa method {self.name!r}>"


def _rotate_inputs(W: torch.Tensor, H: Optional[torch.Tensor], group_size: int):
    """``(W R, R^T H R)`` for the rotation of format version 2 (``H`` None stays None)."""
    Wr = tasa_ext.hadamard(W.detach().float().contiguous(), group_size, False)
    if H is None:
        return Wr, None
    HR = tasa_ext.hadamard(H.float().contiguous(), group_size, False)          # H R
    Hr = tasa_ext.hadamard(HR.T.contiguous(), group_size, False).T            # R^T H R
    return Wr, 0.5 * (Hr + Hr.T)          # symmetric to the last bit (Cholesky follows)


def _honour_rotation(fn):
    @functools.wraps(fn)
    def quantize(self, W, spec, H=None, **kw):
        if not getattr(spec, "hadamard", False):
            return fn(self, W, spec, H, **kw)
        # the method itself sees an unrotated spec: a subclass calling super().quantize must
        # not rotate twice
        plain = dataclasses.replace(spec, hadamard=False)
        if W.dim() != 2:
            return fn(self, W, plain, H, **kw)                   # its own clear error
        spec.validate(W.shape[0], W.shape[1], kw.get("name", "weight"))
        if H is not None and H.shape != (W.shape[1], W.shape[1]):
            return fn(self, W, plain, H, **kw)                   # its own clear error
        Wr, Hr = _rotate_inputs(W, H, spec.group_size)
        q = fn(self, Wr, plain, Hr, **kw)
        q.hadamard = True
        return q
    quantize._tasa_rotation = True
    return quantize


METHODS: Dict[str, Method] = {}


def register_method(cls):
    """Class decorator: registers one instance of ``cls`` under ``cls.name`` (refusing a second
    method of the same name from another class)."""
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"tasa: a method class needs a name, {cls.__qualname__} has none")
    have = METHODS.get(cls.name)
    if have is not None and type(have).__qualname__ != cls.__qualname__:
        raise ValueError(f"tasa: a method named {cls.name!r} is already registered "
                         f"({type(have).__module__}.{type(have).__qualname__})")
    METHODS[cls.name] = cls()
    return cls


def method_names() -> list:
    return sorted(METHODS)


def get_method(name) -> Method:
    """The registered method ``name`` (a :class:`Method` is returned as it is); an unknown
    name is a ``ValueError`` listing the choices."""
    if isinstance(name, Method):
        return name
    m = METHODS.get(name)
    if m is None:
        raise ValueError(f"tasa: unknown quantization method {name!r}; choose from "
                         f"{method_names()}")
    return m
