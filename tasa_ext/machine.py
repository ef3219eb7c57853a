"""Machine description and wall-clock timing, shared by the benchmarks and the ``tasa`` CLI."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Optional


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def timeit(fn: Callable[[], object], min_time: float = 0.3, warmup: int = 3, repeats: int = 5,
           sync: Optional[Callable[[], object]] = None) -> float:
    """Seconds per call of ``fn``: the median over ``repeats`` of the mean time of a batch of
    calls lasting >= ``min_time / repeats`` (one call per batch when ``min_time`` is 0), after
    ``warmup`` calls and one probe call. ``sync`` (e.g. ``torch.cuda.synchronize``) is called
    before reading the clock."""
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
