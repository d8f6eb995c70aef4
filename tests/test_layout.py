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


@pytest.mark.slow  # about 16 s: the libraries' imports, then one fork per module
def test_every_module_imports_first_in_a_fresh_interpreter():
    """A user's script imports any module first (import deit_train.mim.task, say): each does, in a fresh interpreter,
    with the package __init__ files it runs on the way. The cycle test above cannot see a cycle through an __init__
    (deit_train.mim.task failed: tasks/__init__ imported it, and it imported tasks.module). One interpreter imports
    the libraries, none of deit_train, then forks one child per module: deit_train's own import order is what each
    child meets afresh (an interpreter each, importing torch, took 195 s)."""
    import subprocess
    import sys

    names = sorted(name for name in modules() if name != "deit_train.__main__")
    libraries = ["torch", "torchvision", "timm", "lightning.pytorch", "torchmetrics", "hydra", "transformers"]
    script = (
        "import importlib, os, sys\n"
        f"for library in {libraries!r}:\n"
        "    importlib.import_module(library)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'deit_train'], 'deit_train imported by a library'\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except BaseException as error:\n"
        "            print(name, repr(error), file=sys.stderr, flush=True)\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    if os.waitpid(pid, 0)[1]:\n"
        "        failed.append(name)\n"
        "print(failed)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
