"""The package's import graph: argument checks import no heavy module, and no two modules import each other.

Every ``import`` statement counts, at module level or inside a function: a function-level import
that closes a circle still ties the two modules together (each needs the other to be importable,
and a refactor of one breaks the other at call time instead of at import time).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_otselect"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (any statement, any depth)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def test_the_argument_checks_reach_no_other_package_module_but_the_suggester():
    # _checks.py imported embed.py (for cache_root and resolve_device) while embed.py imports
    # _checks.py: a circle. The checks are the bottom layer; the device and cache helpers moved up.
    graph = _graph()
    assert graph["hf_otselect._checks"] <= {"hf_otselect._suggest"}
    assert not _reaches(graph, "hf_otselect._checks", "hf_otselect.embed")
    assert _reaches(graph, "hf_otselect.embed", "hf_otselect._checks")


@pytest.mark.parametrize("a,b", [("hf_otselect._checks", "hf_otselect.embed"), ("hf_otselect._checks", "hf_otselect.devices"),
                                 ("hf_otselect._checks", "hf_otselect.cache")])
def test_no_circle_between(a, b):
    graph = _graph()
    assert not (_reaches(graph, a, b) and _reaches(graph, b, a))


@pytest.mark.parametrize("module", ["hf_otselect._checks", "hf_otselect.embed", "hf_otselect.devices", "hf_otselect.cache"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
