"""Compile-checks every CUDA source with nvcc for each architecture in csrc/cuda/archs.txt, so
CUDA code cannot rot on machines without a GPU (runs wherever nvcc is installed; no GPU and no
CUDA build of torch needed).

  * csrc/cuda/*.cu (torch-free kernels): one nvcc run per architecture, with the flags
    setup.py and torch's CUDAExtension use; must compile with no warnings at all (ptxas spill /
    local-memory warnings included).
  * tasa_ext/csrc/*.cu (torch shims): one nvcc run with every architecture's -gencode (the host
    pass, the slow part, then runs once), against torch's headers from the installed wheel;
    must compile with no warnings located in this repository's files (torch's own headers warn
    under -std=c++17, which is not ours to fix).

All compiles run in parallel (one process per core); the longest start first.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import REPO

# the module's compile fixture takes ~45 s of nvcc on the 2-core CPU machine
pytestmark = pytest.mark.slow

ARCHS = [a for a in (REPO / "csrc" / "cuda" / "archs.txt").read_text().strip().split(";") if a]
KERNEL_SRCS = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
SHIM_SRCS = sorted((REPO / "tasa_ext" / "csrc").glob("*.cu"))
# setup.py's nvcc flags (minus -lineinfo, irrelevant to a compile check)
SETUP_NVCC = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DTASA_WITH_CUDA"]


def _nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _gencode(archs):
    out = []
    for a in archs:
        out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out


def _torch_nvcc_flags():
    """The flags torch's CUDAExtension adds to every .cu file (e.g. -D__CUDA_NO_HALF_OPERATORS__:
    the kernels must not rely on implicit half conversions)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return list(COMMON_NVCC_FLAGS)


def _torch_shim_flags(tmp: Path):
    import torch
    from torch.utils.cpp_extension import include_paths

    incs = include_paths()
    root = Path(incs[0])
    # The CPU wheel ships c10/cuda and ATen/cuda headers but not the CMake-generated
    # c10/cuda/impl/cuda_cmake_macros.h; supply its (one-line) content when it is missing.
    extra = []
    if not (root / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        d = tmp / "gen" / "c10" / "cuda" / "impl"
        d.mkdir(parents=True, exist_ok=True)
        (d / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        extra = [str(tmp / "gen")]
    flags = [f"-I{p}" for p in incs + extra + [sysconfig.get_paths()["include"]]]
    flags += [f"-I{REPO / 'tasa_ext' / 'csrc'}", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return flags


def _jobs(tmp: Path):
    base = SETUP_NVCC + _torch_nvcc_flags() + [f"-I{REPO / 'csrc' / 'include'}"]
    jobs = []
    for src in SHIM_SRCS:
        jobs.append((("shim", src.name, "all"), [*base, *_torch_shim_flags(tmp), *_gencode(ARCHS), "-c", str(src),
                                                   "-o", str(tmp / f"{src.stem}.o")]))
    for src in sorted(KERNEL_SRCS, key=lambda p: -p.stat().st_size):   # big files first
        for a in ARCHS:
            jobs.append((("kernel", src.name, a),
                         [*base, "-Xptxas", "-warn-spills,-warn-lmem-usage", *_gencode([a]), "-c", str(src),
                          "-o", str(tmp / f"{src.stem}_{a}.o")]))
    return jobs


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    tmp = tmp_path_factory.mktemp("nvcc")

    def run(job):
        key, args = job
        t0 = time.perf_counter()
        r = subprocess.run([nvcc, *args], capture_output=True, text=True, cwd=REPO)
        return key, (r.returncode, r.stdout + r.stderr, time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 2, 2)) as ex:
        results = dict(ex.map(run, _jobs(tmp)))
    results["wall_s"] = time.perf_counter() - t0
    return results


def test_sources_and_archs_found():
    assert KERNEL_SRCS, "no csrc/cuda/*.cu"
    assert SHIM_SRCS, "no tasa_ext/csrc/*.cu"
    assert ARCHS and all(re.fullmatch(r"\d+a?", a) for a in ARCHS), ARCHS


def test_torch_wheel_ships_cuda_headers():
    from torch.utils.cpp_extension import include_paths

    root = Path(include_paths()[0])
    for h in ("c10/cuda/CUDAGuard.h", "c10/cuda/CUDAStream.h", "c10/cuda/CUDAMacros.h"):
        assert (root / h).exists(), f"torch wheel lacks {h}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", [p.name for p in KERNEL_SRCS])
def test_kernel_compiles_without_warnings(compiled, src, arch):
    rc, log, _ = compiled[("kernel", src, arch)]
    assert rc == 0, f"nvcc failed on csrc/cuda/{src} for sm_{arch}:\n{log}"
    assert "warning" not in log.lower(), f"warnings in csrc/cuda/{src} for sm_{arch}:\n{log}"


@pytest.mark.parametrize("src", [p.name for p in SHIM_SRCS])
def test_shim_compiles(compiled, src):
    rc, log, _ = compiled[("shim", src, "all")]
    assert rc == 0, f"nvcc failed on tasa_ext/csrc/{src}:\n{log}"
    ours = [ln for ln in log.splitlines() if "warning" in ln.lower()
            and ("tasa_ext/csrc/" in ln or "csrc/include/" in ln or "csrc/cuda/" in ln)]
    assert not ours, "warnings in this repository's files:\n" + "\n".join(ours)


def test_compile_wall_time(compiled):
    """Keeps the check cheap enough to run on every commit (2-core CPU machine: ~2 minutes)."""
    slowest = sorted(((v[2], k) for k, v in compiled.items() if k != "wall_s"), reverse=True)[:3]
    sys.stderr.write(f"nvcc compile check: {compiled['wall_s']:.0f} s wall; slowest: "
                     + ", ".join(f"{'/'.join(k)} {t:.0f} s" for t, k in slowest) + "\n")
    assert compiled["wall_s"] < 600
