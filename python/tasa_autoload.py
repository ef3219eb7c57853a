"""Makes a tasa folder load with plain ``AutoModelForCausalLM.from_pretrained`` once tasa is
installed, without ``import tasa`` first (scripts, transformers' ``pipeline``, lm-eval's own CLI).

Without it transformers meets ``quant_method: "tasa"``, warns "Unknown quantization type ...
we will skip the quantization" and builds the model with *random* ``nn.Linear`` layers: the
model then writes "is is is is ...". GPTQ/AWQ folders never do that because transformers knows
them; transformers has no plugin entry point for quantization methods, so tasa installs a
``tasa_autoload.pth`` file into site-packages (the way coverage's and setuptools' own ``.pth``
hooks work) whose one line runs :func:`install` at interpreter start.

Cost at start-up: this module imports only ``os``/``sys`` and puts one finder on
``sys.meta_path`` (measured: under 1 ms). Nothing of torch, transformers or tasa is imported
until transformers itself imports ``transformers.quantizers.auto``; then three entry points of
that module are wrapped, and tasa (``tasa.hf.register``) is imported only when a configuration
whose ``quant_method`` is ``"tasa"`` is actually read. If tasa fails to import at that moment
(a broken build), the load fails with that error instead of building random layers.

``TASA_NO_AUTOLOAD=1`` turns the hook off (then only ``import tasa`` registers the method).
"""
from __future__ import annotations

import os
import sys

__all__ = ["install", "QUANT_METHOD", "TARGET"]

QUANT_METHOD = "tasa"                    # tasa.hf.QUANT_METHOD (kept torch-free here)
TARGET = "transformers.quantizers.auto"  # the module that owns the quantization-method tables


def _is_tasa(qc) -> bool:
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == QUANT_METHOD


def _register(auto) -> None:
    if QUANT_METHOD in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        return
    try:
        import tasa  # noqa: F401  (its import registers the method: tasa.hf.register)
    except Exception as e:  # a broken install must not fall back to random layers
        raise ImportError(f"tasa: this model folder was quantized with tasa "
                          f"(quant_method: \"tasa\"), and `import tasa` failed: {e}") from e


def patch(auto) -> None:
    """Wraps the entry points of ``transformers.quantizers.auto`` that read a quantization
    config (``AutoHfQuantizer.supports_quant_method`` — the gate of ``from_pretrained`` —,
    ``AutoHfQuantizer.from_config`` and ``AutoQuantizationConfig.from_dict``) so that a
    ``"tasa"`` config imports tasa first. Idempotent."""
    hq, qc = auto.AutoHfQuantizer, auto.AutoQuantizationConfig
    if getattr(hq, "_tasa_autoload", False):
        return
    supports = hq.supports_quant_method
    from_config = hq.from_config.__func__
    from_dict = qc.from_dict.__func__

    def supports_quant_method(quantization_config_dict):
        if _is_tasa(quantization_config_dict):
            _register(auto)
        return supports(quantization_config_dict)

    def from_config_(cls, quantization_config, **kwargs):
        if _is_tasa(quantization_config):
            _register(auto)
        return from_config(cls, quantization_config, **kwargs)

    def from_dict_(cls, quantization_config_dict):
        if _is_tasa(quantization_config_dict):
            _register(auto)
        return from_dict(cls, quantization_config_dict)

    hq.supports_quant_method = staticmethod(supports_quant_method)
    hq.from_config = classmethod(from_config_)
    qc.from_dict = classmethod(from_dict_)
    hq._tasa_autoload = True


class _Loader:
    """Runs the real loader, then :func:`patch` on the fresh module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            patch(module)
        except Exception as e:  # a transformers whose internals moved: say so, load on
            print(f"tasa: could not hook transformers' quantizer table ({e}); "
                  f"`import tasa` before loading tasa folders", file=sys.stderr)

    def __getattr__(self, name):  # get_code, get_source, is_package, ... for tools that ask
        return getattr(self._loader, name)


class _Finder:
    """A ``sys.meta_path`` finder that answers only for :data:`TARGET`, by asking the finders
    after it and wrapping the loader they return."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None

    def invalidate_caches(self):
        pass


def install() -> None:
    """Called by ``tasa_autoload.pth`` at interpreter start; never raises (a ``.pth`` error would
    be printed by every Python start-up)."""
    try:
        if os.environ.get("TASA_NO_AUTOLOAD", "") not in ("", "0"):
            return
        auto = sys.modules.get(TARGET)
        if auto is not None:  # transformers already imported (install() called late)
            patch(auto)
            return
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:  # pragma: no cover - start-up must never fail because of tasa
        pass
