"""Small shared utilities at the bottom of the import graph: atomic file writes, JSON of numpy
values, denormal flushing, peak memory. Imports nothing from tasa."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_write_bytes", "write_json_atomic", "json_default", "flush_denormals",
           "peak_rss_mib"]


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` (creating the folder), fsyncs it and
    moves it into place: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; a normal file instead
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def json_default(o: Any):
    """``default=`` for :func:`json.dumps`: numpy scalars and arrays as Python values."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json_atomic(path, obj, default=json_default) -> None:
    """``obj`` as indented UTF-8 JSON at ``path``, written atomically (``default``: as for
    :func:`json.dumps`; numpy values are converted by default)."""
    atomic_write_bytes(Path(path), json.dumps(obj, indent=1, default=default,
                                              ensure_ascii=False).encode("utf-8"))


@contextlib.contextmanager
def flush_denormals():
    """Flushes fp32 denormals to zero inside the block (restored after). GPTQ's inverse-Hessian
    factors of real activations hold many denormals, which are ~10x slower on x86 CPUs."""
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
