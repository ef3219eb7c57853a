"""The import graph of python/tasa, read from the source with ``ast`` (function-local imports
included): no cycle, and the layering the README documents.

Edges: ``import a.b.c`` -> a.b.c; ``from pkg import x`` -> pkg.x when that is a module (a
submodule), else -> pkg; relative imports are resolved against the importing module's package
(``from .. import defaults`` in tasa.pipeline.stages -> tasa.defaults). Only edges between modules
of the package are kept.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

from helpers import REPO

SRC = REPO / "python"
ROOT = "tasa"


# ---- the checker -----------------------------------------------------------------------------------

def module_files(src: Path, root: str) -> Dict[str, Path]:
    """Module name -> file for every .py file of package ``root`` under ``src``."""
    out = {}
    for p in sorted((src / root).rglob("*.py")):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _owner(name: str, modules) -> Optional[str]:
    """The longest module of ``modules`` that ``name`` is or lies inside (None: not ours)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def import_graph(src: Path, root: str) -> Dict[str, Set[str]]:
    """``{module: {modules it imports}}`` over the modules of package ``root``."""
    files = module_files(src, root)
    graph: Dict[str, Set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    if node.level > 1:
                        base_parts = base_parts[:-(node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in files else base)
            for t in targets:
                if t == root or t.startswith(root + "."):
                    owner = _owner(t, files)
                    if owner is not None and owner != mod:
                        graph[mod].add(owner)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle ``[a, b, ..., a]`` of the graph, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {m: WHITE for m in graph}
    stack: List[str] = []

    def visit(m):
        color[m] = GREY
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if color.get(n, WHITE) == GREY:
                return stack[stack.index(n):] + [n]
            if color.get(n, WHITE) == WHITE:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        color[m] = BLACK
        return None

    for m in sorted(graph):
        if color[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def in_(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


# ---- tasa ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph():
    g = import_graph(SRC, ROOT)
    assert {"tasa", "tasa.util", "tasa.defaults", "tasa.quant.rtn", "tasa.pipeline.stages"} <= set(g)
    return g


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_relative_and_local_imports(graph):
    # from .. import alloc, calib, data, ... (stages); from .rtn import ... (gptq); from
    # ..quant import LayerSpec (a name of the package, not a submodule)
    assert {"tasa.alloc", "tasa.calib", "tasa.defaults", "tasa.measurement",
            "tasa.quant", "tasa.modelquant"} <= graph["tasa.pipeline.stages"]
    assert "tasa.quant.rtn" in graph["tasa.quant.gptq"]
    assert graph["tasa.pipeline"] >= {"tasa.pipeline.config", "tasa.pipeline.job",
                                      "tasa.pipeline.stages"}


# the layering (each rule: what a module may not depend on, directly or through another module)
def _violations(graph, who, allowed=None, forbidden=()):
    out = []
    for m in graph:
        if not in_(m, *who):
            continue
        deps = reachable(graph, m)
        for d in sorted(deps):
            if (allowed is not None and not in_(d, *allowed)) or in_(d, *forbidden):
                out.append(f"{m} -> {d}" + ("" if d in graph[m] else " (indirectly)"))
    return out


def test_bottom_layer_util_and_defaults(graph):
    assert _violations(graph, ("tasa.util", "tasa.defaults"),
                       allowed=("tasa.util", "tasa.defaults")) == []


def test_quant_imports_only_util_defaults_and_itself(graph):
    assert _violations(graph, ("tasa.quant",),
                       allowed=("tasa.util", "tasa.defaults", "tasa.quant")) == []


def test_nn_below_calibration_and_the_drivers(graph):
    assert _violations(graph, ("tasa.layers",),
                       forbidden=("tasa.calib", "tasa.modelquant", "tasa.pipeline")) == []


def test_calib_below_the_drivers_and_nn(graph):
    assert _violations(graph, ("tasa.calib",),
                       forbidden=("tasa.modelquant", "tasa.pipeline", "tasa.layers")) == []


def test_nothing_imports_the_cli(graph):
    assert [f"{m} -> tasa.cli" for m in graph if m != "tasa.cli" and "tasa.cli" in graph[m]] == []


def test_report_does_not_import_the_pipeline(graph):
    assert _violations(graph, ("tasa.report",), forbidden=("tasa.pipeline",)) == []


# ---- the checker itself, on a small package written here -------------------------------------------

def readme_layers() -> List[List[str]]:
    """The python/tasa lines of the README's layout block, top to bottom: the module names each
    line lists (``pipeline/`` = the pipeline package and its modules)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("python/tasa/                 the algorithms"):]
    block = block[:block.index("\nbenchmarks/")]
    layers, cont = [], False
    for line in block.splitlines()[1:]:
        if not line.startswith("  ") or line.startswith("   "):
            continue                                  # a description's continuation
        cell = line[2:31].strip()                     # the names column
        names = [n.strip() for n in cell.split(",") if n.strip()]
        if cont:
            layers[-1].extend(names)                  # "a, b," continues on the next line
        else:
            layers.append(names)
        cont = cell.endswith(",")
    return layers


def test_readme_layout_lists_every_module_in_import_order(graph):
    """Every module of python/tasa is on one line of the README's layout, and each line
    imports only modules on the lines above it (or its own)."""
    rank = {}
    for i, names in enumerate(readme_layers()):
        for n in names:
            mod = f"{ROOT}.{n.rstrip('/')}"
            rank[mod] = i
    def rank_of(m):
        for cand in (m, m.rpartition(".")[0]):
            if cand in rank:
                return rank[cand]
        return None
    unlisted = sorted(m for m in graph if m != ROOT and rank_of(m) is None)
    assert not unlisted, f"modules missing from the README layout: {unlisted}"
    bad = [(a, b) for a, deps in graph.items() for b in deps
           if a != ROOT and b != ROOT and rank_of(b) > rank_of(a)]
    assert not bad, f"imports pointing up the README's layers: {bad}"


def _package(tmp_path, files: Dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_edges(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "",
        "defaults.py": "X = 1\n",
        "util.py": "import os\nimport pkg_other\n",
        "sub/__init__.py": "from .a import f\n",
        "sub/a.py": "from .. import defaults\nfrom . import b\n\ndef f():\n    from pkg.util import g\n",
        "sub/b.py": "from pkg.sub import f\nimport pkg.defaults\n",
    })
    g = import_graph(src, "pkg")
    assert g == {"pkg": set(), "pkg.defaults": set(), "pkg.util": set(),
                 "pkg.sub": {"pkg.sub.a"},
                 "pkg.sub.a": {"pkg.defaults", "pkg.sub.b", "pkg.util"},
                 "pkg.sub.b": {"pkg.sub", "pkg.defaults"}}
    # pkg.sub -> a -> b -> pkg.sub: the bare "from pkg.sub import f" closes a cycle
    cycle = find_cycle(g)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.sub", "pkg.sub.a", "pkg.sub.b"}


def test_checker_fails_on_an_injected_cycle(tmp_path):
    files = {"__init__.py": "", "low.py": "import json\n", "high.py": "from . import low\n"}
    assert find_cycle(import_graph(_package(tmp_path / "ok", files), "pkg")) is None
    # a function-local import in the low layer back into the high one
    files["low.py"] = "def late():\n    from .high import thing\n    return thing\n"
    g = import_graph(_package(tmp_path / "bad", files), "pkg")
    cycle = find_cycle(g)
    assert cycle in (["pkg.high", "pkg.low", "pkg.high"], ["pkg.low", "pkg.high", "pkg.low"])
    with pytest.raises(AssertionError, match=r"import cycle: pkg\.\w+ -> pkg\.\w+ -> pkg\.\w+"):
        test_no_import_cycle(g)
