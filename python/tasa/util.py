"""Small shared utilities at the bottom of the import graph: atomic file writes, JSON of numpy
values, denormal flushing, peak memory. Imports nothing from tasa."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_write_bytes", "write_json_atomic", "json_default", "flush_denormals",
           "peak_rss_mib", "sha256_file", "read_json", "folder_lock", "FolderLockedError",
           "clean_stale_temps", "fault_point", "FAULT_ENV"]

# Fault injection for the tests (tests/test_reliability.py): with TASA_FAULT=<point> the process
# kills itself (SIGKILL: no cleanup, no finally) when it reaches that write point; <point>@<n>
# at its n-th visit. Unset in normal use: one environment lookup per write.
FAULT_ENV = "TASA_FAULT"
_fault_visits: dict = {}


def fault_point(name: str) -> None:
    """A named write point: SIGKILL here when ``$TASA_FAULT`` names it (see above)."""
    want = os.environ.get(FAULT_ENV)
    if not want:
        return
    point, _, nth = want.partition("@")
    if point != name:
        return
    _fault_visits[name] = _fault_visits.get(name, 0) + 1
    if _fault_visits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` (creating the folder), fsyncs it and
    moves it into place: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
            fault_point(f"write:{path.name}")        # a kill in the middle of a write
            f.write(data[len(data) // 2:])
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


def read_json(path, what: str = "file"):
    """The JSON in ``path``; ``FileNotFoundError`` / ``ValueError`` naming the file (and
    ``what`` it should be) instead of a traceback from the parser."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tasa: {what} {p} not found")
    try:
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"tasa: {p} is not JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"tasa: {p} nests too deeply to be a tasa {what}") from None


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


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class FolderLockedError(RuntimeError):
    """Another process holds the output folder's lock."""


@contextlib.contextmanager
def folder_lock(path):
    """An exclusive lock on output folder ``path`` (``.tasa.lock`` inside it, ``flock``: released
    by the kernel when the process dies, so a killed run never leaves it locked). A second
    writer gets a :class:`FolderLockedError` at once instead of racing the first.

    A folder this call created and that holds nothing but the lock when the run ends (a typo in
    the model name, an infeasible budget) is removed: a failed run leaves no empty folder."""
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".tasa.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLockedError(f"tasa: another tasa run is writing into {path} (its "
                                    f"lock {path / '.tasa.lock'} is held); wait for it or use "
                                    f"another --out") from None
        yield
    finally:
        os.close(fd)
        if created:
            try:
                if [p.name for p in path.iterdir()] == [".tasa.lock"]:
                    (path / ".tasa.lock").unlink()
                    path.rmdir()
            except OSError:
                pass


def clean_stale_temps(path) -> list:
    """Removes what a killed writer left in ``path``: ``.<name>.*.tmp`` files of
    :func:`atomic_write_bytes` and ``.save-*`` folders of ``tasa.io.save_quantized``. Call it
    holding :func:`folder_lock`. Returns the names removed."""
    path = Path(path)
    gone = []
    if not path.is_dir():
        return gone
    for p in path.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink()
            gone.append(p.name)
        elif p.name.startswith(".save-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone
