"""Helpers shared by the benchmarks: timing, machine description, result files."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn, min_time: float = 0.3, warmup: int = 3, repeats: int = 5, sync=None) -> float:
    """Median over `repeats` of the mean time of a batch of calls lasting >= min_time/repeats."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(min_time / repeats / one))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """STREAM-copy convention: (bytes read + bytes written) / s of a large tensor copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t = timeit(lambda: dst.copy_(src), min_time=1.0, sync=sync)
    return 2 * nbytes / t


def git_commit() -> str:
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent,
                                      text=True, stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=RESULTS.parent,
                                stderr=subprocess.DEVNULL) != 0
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def machine(device: str = "cpu") -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        info["device"] = torch.cuda.get_device_name()
    else:
        cpu = platform.processor() or "cpu"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        import tasa_ext
        info["device"] = f"{cpu}, {os.cpu_count()} cores, tasa ISA {tasa_ext.build_info()['cpu_isa']}"
    return info


def write_results(stem: str, meta: dict, rows: list, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    path = RESULTS / f"{stem}.md"
    path.write_text(markdown)
    return path
