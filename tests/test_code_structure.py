"""The shape of the library, checked from its source: no import cycles, short functions, Hydra only at the
edge, the tokenizer independent of the data package."""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

PKG = ROOT / "minillm"
MAX_FUNCTION_LINES = 50


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def minillm_modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PKG.rglob("*.py"))}


def imported_modules(tree: ast.Module, known: set[str]) -> set[str]:
    """The minillm modules a module imports, at any depth of its code (function-level imports count):
    ``from minillm.x import y`` is minillm.x.y when that is a module, else minillm.x."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``graph`` as a list of nodes (first == last), or None (depth-first search)."""
    state, stack = {}, []

    def visit(n: str) -> list[str] | None:
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    mods = minillm_modules()
    return {name: imported_modules(tree, set(mods)) - {name} for name, tree in mods.items()}


def test_no_import_cycle_in_minillm():
    """No module of minillm imports (directly or through others) a module that imports it back."""
    graph = import_graph()
    assert len(graph) > 20 and graph["minillm.trainer"]  # the walk sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    """The check above can fail: a planted back edge (tokenizer -> data.prepare) is reported."""
    graph = import_graph()
    graph["minillm.tokenizer"] = graph["minillm.tokenizer"] | {"minillm.data.prepare"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "minillm.tokenizer" in cycle


def test_tokenizer_imports_nothing_from_the_data_package():
    graph = import_graph()
    assert not any(m.startswith("minillm.data") for m in graph["minillm.tokenizer"])


def test_hydra_only_in_the_cli_module():
    """The library takes dataclasses; only minillm/cli.py (used by the entry points) knows Hydra."""
    users = [name for name, tree in minillm_modules().items()
             if any(isinstance(n, (ast.Import, ast.ImportFrom)) and any(
                 (getattr(n, "module", None) or a.name).split(".")[0] in ("hydra", "omegaconf") for a in n.names)
                    for n in ast.walk(tree))]
    assert users == ["minillm.cli"]


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_over_50_lines(path):
    """Short functions: none in minillm/ spans more than 50 lines (docstring included)."""
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: {', '.join(long)}"
