"""Repository invariants: the README's commands and CI agree; one source of truth per fact."""
import re

from conftest import REPO

import tasa_ext


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


def test_sources_are_globbed_not_listed():
    setup = (REPO / "setup.py").read_text()
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert ".cpp\"" not in setup.replace('"csrc/cpu/*.cpp"', "").replace('"tasa_ext/csrc/*.cpp"', "")
    assert "file(GLOB TASA_CPU_SOURCES" in cmake and "file(GLOB TASA_CUDA_SOURCES" in cmake
    assert "archs.txt" in setup and "archs.txt" in cmake
