"""tasa: task-aware mixed-precision weight quantization of LLMs.

``import tasa`` registers the ``"tasa"`` quantization method with transformers (so
``AutoModelForCausalLM.from_pretrained(folder)`` loads tasa folders) and exposes the Python API:
:func:`quantize` and :func:`load`.
"""
__version__ = "0.1.0"

from . import hf as _hf

_hf.register()

from .api import load, quantize  # noqa: E402  (after the registration it relies on)

__all__ = ["quantize", "load", "__version__"]
