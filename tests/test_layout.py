"""The architecture, enforced: the library never imports the book's lab, and no bnlib module imports itself
back through a chain of imports (module-level or deferred inside a function)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import bnlib

ROOT = Path(bnlib.__file__).parent
LAB = "bnlib.lab"


def _modules() -> dict:
    """Every module of the bnlib package: dotted name -> path (packages as their ``__init__``). Found on disk,
    not by importing (importing ``bnlib.torch.triton`` here would import triton before a test sets
    ``TRITON_INTERPRET``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("bnlib",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
CORE = sorted(name for name in MODULES if name != LAB and not name.startswith(LAB + "."))


def _imports(name: str, path: Path) -> set:
    """The bnlib modules that ``name`` imports anywhere in its source (``from x import y`` counts as
    importing the module ``x.y`` when that is a module, else ``x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in MODULES else stem
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_layout_has_a_library_and_a_lab():
    assert {"bnlib.numpy", "bnlib.torch", "bnlib.data", "bnlib.methods"} <= set(CORE)
    assert {"bnlib.lab.train", "bnlib.lab.packed", "bnlib.lab.probes", "bnlib.lab.models"} <= set(MODULES)


@pytest.mark.parametrize("name", CORE)
def test_core_module_source_never_names_the_lab(name):
    bad = sorted(t for t in GRAPH[name] if t == LAB or t.startswith(LAB + "."))
    assert not bad, f"{name} imports the lab: {bad}"


def test_every_core_module_imports_with_the_lab_unimportable():
    """A fresh interpreter where ``import bnlib.lab`` fails imports every core module (Triton's modules only
    where triton is installed)."""
    code = f"""
import importlib, sys
sys.modules[{LAB!r}] = None  # any import of the lab now raises ImportError
for name in {CORE!r}:
    try:
        importlib.import_module(name)
    except ImportError as e:
        if "triton" in name and "triton" in str(e) and "bnlib.lab" not in str(e):
            continue  # the optional extra is not installed
        raise SystemExit(f"{{name}}: {{e!r}}")
print("ok", len({CORE!r}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")


def _cycle(graph: dict):
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    # a package's __init__ may import its own submodules (that is what a package is); the edges that close a
    # loop are the other ones, so the graph leaves out "submodule -> its parent package"
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in GRAPH.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
