"""The package's layout holds what the style guide asks of it: no import cycle between its modules, and no module
outside the data sources asking which source it has."""

import ast
from pathlib import Path

import pytest

import deit_train

PACKAGE = Path(deit_train.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts}


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules `path` imports anywhere in it (top level or inside a function, not under `if
    TYPE_CHECKING:`): `from a.b import c` is a.b.c where c is a module, else a.b."""
    found = set()
    tree = ast.parse(path.read_text())
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
        block.body = []  # names for annotations only: never imported when the program runs
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for other in sorted(graph[node]):
            if state.get(other) == 1:
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_back_through_others():
    """Every import counts, also those inside functions: a cycle hidden in a function is still two modules that
    each need the other to be read. A package's __init__ is its own node (importing a.b runs a/__init__.py, but
    a.b does not depend on what a/__init__ imports)."""
    known = modules()
    graph = {name: imports(path, set(known)) - {name} for name, path in known.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.slow  # about 80 interpreters, each importing torch
def test_every_module_imports_first_in_a_fresh_interpreter():
    """A user's script imports any module first (import deit_train.mim.task, say): each does, in a fresh interpreter,
    with the package __init__ files it runs on the way. The cycle test above cannot see a cycle through an __init__
    (deit_train.mim.task failed: tasks/__init__ imported it, and it imported tasks.module)."""
    import subprocess
    import sys

    names = sorted(name for name in modules() if name != "deit_train.__main__")
    script = (
        "import importlib, subprocess, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    done = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
        "    if done.returncode:\n"
        "        failed.append((name, done.stderr.strip().splitlines()[-1]))\n"
        "print(failed)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1500)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
