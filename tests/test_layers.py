"""The layers point one way, builder ← retriever ← cluster, with no import cycle between files.

Read from the source with `ast` (every import statement, in functions too): a file may import
only from its own package or the ones below it; the graph of file → imported file has no cycle;
the project's own imports sit at the top of each file. `from package import name` counts as
importing the package's `__init__.py` unless `name` is a module of it. A file that loads modules by
name (`importlib.import_module`, e.g. the command line's dispatch table of handler modules) imports
every project module whose name is a string constant in it: a table cannot hide an import.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("builder", "retriever", "cluster")          # each may import only from itself and those before it


def _module_file(root: Path, dotted: str) -> Path | None:
    """The file of a dotted project module (a module, or a package's __init__.py)."""
    base = root.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def project_imports(root: Path, path: Path) -> list[tuple[int, bool, Path]]:
    """(line, at module level, imported file) for every import of a project module in `path`."""
    pkg = path.relative_to(root).parts[0]
    out = []
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    in_function = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(fn) if n is not fn}
    loads_by_name = any(isinstance(n, ast.Attribute) and n.attr == "import_module" or
                        isinstance(n, ast.Name) and n.id in ("import_module", "__import__") for n in ast.walk(tree))
    for node in ast.walk(tree):
        targets: list[str] = []
        if loads_by_name and isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", node.value):
            targets = [node.value]
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:                                  # relative: from . import x / from .m import y
                mod = ".".join([pkg, mod] if mod else [pkg])
            for a in node.names:                            # `from pkg import module` imports that module
                sub = f"{mod}.{a.name}"
                targets.append(sub if _module_file(root, sub) else mod)
        for t in targets:
            if t.split(".")[0] in LAYERS and (f := _module_file(root, t)) is not None:
                out.append((node.lineno, id(node) not in in_function, f))
    return out


def check_layers(root: Path) -> list[str]:
    """Every violation in the tree at `root`: upward imports, imports inside functions, cycles."""
    files = sorted(p for pkg in LAYERS if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py"))
    problems, graph = [], {}
    for f in files:
        rel = f.relative_to(root)
        layer = LAYERS.index(rel.parts[0])
        graph[f] = set()
        for line, top, target in project_imports(root, f):
            trel = target.relative_to(root)
            if LAYERS.index(trel.parts[0]) > layer:
                problems.append(f"{rel}:{line}: imports {trel} from a higher layer ({' <- '.join(LAYERS)})")
            if not top:
                problems.append(f"{rel}:{line}: imports {trel} inside a function (the project's imports go at "
                                "the top of the file)")
            if target != f:
                graph[f].add(target)
    # cycles: a depth-first search that reports each back edge's cycle once
    state: dict[Path, int] = {}
    stack: list[Path] = []

    def visit(f: Path) -> None:
        state[f] = 1
        stack.append(f)
        for g in sorted(graph.get(f, ())):
            if state.get(g) == 1:
                cycle = stack[stack.index(g):] + [g]
                problems.append("import cycle: " + " -> ".join(str(c.relative_to(root)) for c in cycle))
            elif g not in state:
                visit(g)
        stack.pop()
        state[f] = 2

    for f in files:
        if f not in state:
            visit(f)
    return problems


def test_layers_point_one_way_and_have_no_cycle():
    assert check_layers(REPO) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


GOOD = {"builder/__init__.py": "", "builder/a.py": "X = 1\n", "retriever/__init__.py": "",
        "retriever/b.py": "from builder.a import X\n", "cluster/__init__.py": "",
        "cluster/c.py": "from builder import a\nfrom retriever.b import X\n"}


def test_the_checker_passes_a_clean_tree(tmp_path):
    assert check_layers(_tree(tmp_path, GOOD)) == []


@pytest.mark.parametrize("name,text,expect", [
    ("builder/up.py", "from retriever.b import X\n", "builder/up.py:1: imports retriever/b.py from a higher layer"),
    ("builder/up.py", "def f():\n    import cluster.c\n", "builder/up.py:2: imports cluster/c.py from a higher layer"),
    ("retriever/up.py", "from cluster import c\n", "retriever/up.py:1: imports cluster/c.py from a higher layer"),
    ("retriever/init.py", "from retriever import b\nfrom cluster import nothing\n", None),
    ("builder/lazy.py", "def f():\n    from builder.a import X\n", "builder/lazy.py:2: imports builder/a.py inside"),
])
def test_the_checker_fails_an_upward_or_inner_import(tmp_path, name, text, expect):
    problems = check_layers(_tree(tmp_path, {**GOOD, name: text}))
    if expect is None:          # `from cluster import nothing`: the package's __init__.py, a higher layer
        assert problems == ["retriever/init.py:2: imports cluster/__init__.py from a higher layer "
                            "(builder <- retriever <- cluster)"]
    else:
        assert any(p.startswith(expect) for p in problems) and len(problems) == 1 + ("import cluster" in text), problems


def test_the_checker_fails_a_cycle(tmp_path):
    files = {**GOOD, "builder/a.py": "from builder.d import Y\nX = 1\n", "builder/d.py": "from builder.a import X\n"}
    assert check_layers(_tree(tmp_path, files)) == ["import cycle: builder/a.py -> builder/d.py -> builder/a.py"]
    # through a package's __init__.py: `from retriever import name` imports retriever/__init__.py
    files = {**GOOD, "retriever/__init__.py": "from retriever.b import X\n",
             "retriever/b.py": "from retriever import e\n", "retriever/e.py": "from retriever import X\n"}
    problems = check_layers(_tree(tmp_path / "2", files))
    assert problems == ["import cycle: retriever/b.py -> retriever/e.py -> retriever/__init__.py -> retriever/b.py"]


def test_the_checker_sees_modules_loaded_by_name(tmp_path):
    """A dispatch table of module names (cluster/cli.py's COMMANDS) counts as imports of its file."""
    table = ("import importlib\nHANDLERS = {'x': ('retriever.b', 'f')}\n\n"
             "def run(name):\n    return importlib.import_module(HANDLERS[name][0])\n")
    assert check_layers(_tree(tmp_path / "ok", {**GOOD, "cluster/c.py": table})) == []
    up = table.replace("retriever.b", "cluster.c")
    problems = check_layers(_tree(tmp_path / "up", {**GOOD, "retriever/t.py": up}))
    assert problems == ["retriever/t.py:2: imports cluster/c.py from a higher layer "
                        "(builder <- retriever <- cluster)"]
    files = {**GOOD, "cluster/c.py": table.replace("retriever.b", "cluster.d"),
             "cluster/d.py": "from cluster import c\n"}
    assert check_layers(_tree(tmp_path / "cycle", files)) == [
        "import cycle: cluster/c.py -> cluster/d.py -> cluster/c.py"]


MAX_LINES = 450


def test_no_module_is_over_450_lines():
    """Files by concern: no .py file of the three packages over 450 lines, every line counted."""
    long = {str(p.relative_to(REPO)): n for pkg in LAYERS for p in sorted((REPO / pkg).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"split these by concern: {long}"
