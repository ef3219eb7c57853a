"""Loads the compiled extension, failing loudly with the fix (never a silent slow path)."""
import importlib

_FIX = (
    "tasa_ext._C (the compiled kernels) could not be imported. Build it from the repository "
    "root with:\n    pip install -c constraints.txt --no-build-isolation -e .\n"
    "(torch must already be installed: pip install -c constraints.txt torch). Original error: "
)


def load_extension():
    try:
        return importlib.import_module("tasa_ext._C")
    except ImportError as e:  # pragma: no cover - exercised only on a broken install
        raise ImportError(_FIX + repr(e)) from e
