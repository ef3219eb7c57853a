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
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["atomic_write_bytes", "write_json_atomic", "json_default", "flush_denormals",
           "peak_rss_mib", "sha256_file", "read_json", "folder_lock", "FolderLockedError",
           "clean_stale_temps", "fault_point", "FAULT_ENV", "Log", "weights_digest"]

# Fault injection for the tests (tests/test_reliability.py, test_lazy.py, test_distributed.py):
# with TASA_FAULT=[<rank>:]<point>[@<n>][:kill|:raise] the process stops at the n-th visit
# (default the first) of a point whose name starts with <point> -- SIGKILL (no cleanup, no
# finally: the default) or a RuntimeError -- and, with <rank>, only on that torch.distributed
# rank. One mechanism for the write points and the distributed guards; unset in normal use: one
# environment lookup per point.
FAULT_ENV = "TASA_FAULT"
_FAULT_SPEC = re.compile(r"(?:(\d+):)?(.+?)(?:@(\d+))?(?::(kill|raise))?")
_fault_visits: dict = {}


def fault_point(name: str, rank: Optional[int] = None) -> None:
    """A named point where the tests can stop the process (see above)."""
    want = os.environ.get(FAULT_ENV)
    if not want:
        return
    m = _FAULT_SPEC.fullmatch(want)
    if m is None:
        raise ValueError(f"tasa: {FAULT_ENV}={want!r} is not [rank:]point[@n][:kill|:raise]")
    r, point, nth, mode = m.groups()
    if not name.startswith(point) or (r is not None and (rank or 0) != int(r)):
        return
    _fault_visits[point] = _fault_visits.get(point, 0) + 1
    if _fault_visits[point] < int(nth or 1):
        return
    if mode == "raise":
        raise RuntimeError(f"injected fault at {name} ({FAULT_ENV}={want})")
    os.kill(os.getpid(), signal.SIGKILL)


class Log:
    """The jobs' log lines (``[tasa] ...`` on stdout), silenced by ``quiet``."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str):
        if not self.quiet:
            print(f"[tasa] {msg}", flush=True)


def file_mode() -> int:
    """The permissions a new regular file gets under this process's umask (0o666 & ~umask):
    for files first written by ``mkstemp`` (0600) and then moved into place."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` (creating the folder), fsyncs it and
    moves it into place: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            fault_point(f"write:{path.name}")        # a kill before the file is in place
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())             # mkstemp makes 0600; a normal file instead
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

    The lock file is removed when the run ends (users saw an empty ``.tasa.lock`` in every
    finished folder); a folder this call created that holds nothing else then (a typo in the
    model name, an infeasible budget) is removed too: a failed run leaves no empty folder.
    Removing a lock file opens a race -- a writer that opened the old file before it was unlinked
    could lock that orphan while a third locks a new file -- so a lock counts only if the file
    locked is still the one at the path (same inode); otherwise it is taken again."""
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = path / ".tasa.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLockedError(f"tasa: another tasa run is writing into {path} (its "
                                    f"lock {lock} is held); wait for it or use "
                                    f"another --out") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)              # an orphan: its holder unlinked it while we waited to lock
    try:
        yield
    finally:
        try:
            lock.unlink()         # still holding it: nobody can hold this file now
        except OSError:
            pass
        os.close(fd)
        if created:
            try:
                if not any(path.iterdir()):
                    path.rmdir()
            except OSError:
                pass


def clean_stale_temps(path) -> list:
    """Removes what a killed writer left in ``path``: ``.<name>.*.tmp`` files of
    :func:`atomic_write_bytes` and ``.save-*`` folders of ``tasa.storage.save_quantized``. Call it
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


def weights_digest(model) -> str:
    """blake2b of every tensor of the model's state (names, shapes, dtypes, bytes): the
    measurement belongs to these weights, not to a path whose contents may change (~1 s per
    500 MB)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
