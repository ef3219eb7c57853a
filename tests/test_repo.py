"""Repository invariants: the README's commands and CI agree; one source of truth per fact; every
C++/CUDA source on disk is compiled by the builds that own it."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tasa_ext

from helpers import REPO


def readme_commands():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    main_cmd, test_cmd = cmds
    assert "\n" not in main_cmd and "\n" not in test_cmd
    assert test_cmd.endswith("pytest -q")
    ci_lines = [l for l in (REPO / ".ci" / "run").read_text().splitlines() if l and not l.startswith("#")]
    assert test_cmd in ci_lines
    for cmd in cmds:                      # torch always pinned, extension built against it
        assert "-c constraints.txt" in cmd and "--no-build-isolation" in cmd
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text()


def test_format_constants_come_from_the_header():
    header = (REPO / "csrc" / "include" / "tasa" / "format.h").read_text()
    for name, value in [("TASA_FORMAT_VERSION", tasa_ext.FORMAT_VERSION), ("TASA_TILE_K", tasa_ext.TILE_K),
                        ("TASA_COL_BLOCK", tasa_ext.COL_BLOCK)]:
        assert re.search(rf"#define {name} {value}\b", header), name


def on_disk(*patterns):
    return sorted(p.relative_to(REPO).as_posix() for pat in patterns for p in REPO.glob(pat))


ARCHS = [a for a in (REPO / "csrc" / "cuda" / "archs.txt").read_text().strip().split(";") if a]

# runs setup.py with setuptools.setup replaced by a recorder (nothing is built) and prints what
# it would hand to setuptools: the extension's sources and compile flags
_SETUP_PROBE = """
import json, runpy, sys, tempfile
import setuptools
import torch.utils.cpp_extension as ce
if sys.argv[1] == "1":
    ce.CUDA_HOME = ce.CUDA_HOME or tempfile.mkdtemp()   # a CPU torch knows no CUDA_HOME
seen = {}
setuptools.setup = lambda **kw: seen.update(kw)
runpy.run_path("setup.py", run_name="__main__")
(ext,) = seen["ext_modules"]
print(json.dumps({"name": ext.name, "sources": ext.sources, "flags": ext.extra_compile_args}))
"""


def setup_extension(cuda: bool) -> dict:
    env = {**os.environ, "TASA_CUDA": "1" if cuda else "0"}
    r = subprocess.run([sys.executable, "-c", _SETUP_PROBE, "1" if cuda else "0"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_setup_compiles_every_source_on_disk(cuda):
    """What setup.py hands to the compiler is exactly the extension's sources on disk (a new
    file is picked up, a removed one is not looked for), and the CUDA build targets exactly the
    architectures of csrc/cuda/archs.txt."""
    ext = setup_extension(cuda)
    assert ext["name"] == "tasa_ext._C"
    want = on_disk("csrc/cpu/*.cpp", "tasa_ext/csrc/*.cpp")
    if cuda:
        want += on_disk("csrc/cuda/*.cu", "tasa_ext/csrc/*.cu")
    assert ext["sources"] == want
    if cuda:
        nvcc = ext["flags"]["nvcc"]
        gencode = [nvcc[i + 1] for i, f in enumerate(nvcc) if f == "-gencode"]
        assert gencode == [f"arch=compute_{a},code=sm_{a}" for a in ARCHS]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_compiles_every_source_on_disk(tmp_path):
    """CMake's build (configure only, compile database) compiles exactly the torch-free sources
    on disk and the C++ tests, plus every CUDA kernel for archs.txt's architectures where nvcc is
    found; together with setup.py's sources no C++/CUDA file in the repository is left out."""
    build = tmp_path / "build"
    r = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    db = json.loads((build / "compile_commands.json").read_text())
    files = sorted(Path(e["file"]).resolve().relative_to(REPO).as_posix()
                   for e in db)
    cache = (build / "CMakeCache.txt").read_text()
    has_cuda = re.search(r"^CMAKE_CUDA_COMPILER:\w+=.+$", cache, re.M) is not None
    want = on_disk("csrc/cpu/*.cpp", "csrc/tests/*.cpp")
    if has_cuda:
        want = sorted(want + on_disk("csrc/cuda/*.cu"))
    assert files == want
    for e in db:
        if e["file"].endswith(".cu"):
            cmd = e.get("command") or " ".join(e["arguments"])
            assert all(f"compute_{a}" in cmd for a in ARCHS), cmd
    # no orphan: every C++/CUDA source is compiled by CMake or by setup.py
    every = on_disk("csrc/**/*.cpp", "csrc/**/*.cu", "tasa_ext/**/*.cpp", "tasa_ext/**/*.cu")
    setup = setup_extension(cuda=True)["sources"]
    assert sorted(set(every) - set(files) - set(setup)) == (
        [] if has_cuda else on_disk("csrc/cuda/*.cu"))
