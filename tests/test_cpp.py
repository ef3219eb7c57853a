"""Builds the torch-free csrc library with CMake and runs its C++ unit tests (ctest)."""
import shutil
import subprocess

import pytest

from helpers import REPO


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_ctest(tmp_path):
    build = tmp_path / "build"
    # The CUDA sources are compile-checked by tests/test_cuda_compile.py; skip them here.
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DTASA_CUDA_COMPILE_CHECK=OFF"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    r = subprocess.run(["ctest", "--output-on-failure"], cwd=build, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100% tests passed" in r.stdout
