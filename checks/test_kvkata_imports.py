"""kvkata's own shape: no import circle (not even through an import inside a function), and one runner.

Read from the source with ast, in this process: nothing is imported or run.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from kvkata.paths import ROOT

KVKATA = ROOT / "kvkata"

# Where `--kvkata-json` may be passed or declared: the plugin declares it, the runner passes it.
JSON_OPTION_ALLOWED = {
    "kvkata/plugin.py": "declares the option",
    "kvkata/runner.py": "the one function that runs pytest with the report and reads it back",
    # card00's tests in this process, against a solution swapped into sys.modules (monkeypatch): neither a new
    # interpreter nor a fork would see the swap the same way.
    "checks/test_alternatives.py": "an in-process run against a swapped-in solution",
    "checks/test_kvkata_imports.py": "tests this scan on snippets that pass the option",
}
SKIPPED_DIRS = {"__pycache__", "node_modules", "build", "dist"}


def module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside a function, class or `if`.

    `from pkg import name` is an edge to pkg.name where that is a module, else to pkg (its __init__).
    A parent package imported on the way to a submodule is not an edge: Python has finished (or is
    running) the parent's __init__ by then, and a circle through it shows as an edge from __init__.
    """
    package = package_dir.name
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in files else stem for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files and "." in target:  # `import pkg.mod.attr`-like names
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name and (target == package or target.startswith(package + ".")):
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan), each as a path that returns to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                found.append(_path_in(set(group), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A circle through the group's first module, by breadth-first search back to it."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(group)


def test_kvkata_has_no_import_circle_not_even_through_an_import_inside_a_function():
    graph = import_graph(KVKATA)
    assert "kvkata.paths" in graph and len(graph) > 10, f"the graph missed kvkata's modules: {sorted(graph)}"
    assert "kvkata.manifest" in graph["kvkata"], "the graph missed __init__'s imports"
    found = cycles(graph)
    assert not found, ("import circles in kvkata (put what both sides need in a leaf module such as kvkata/paths.py): "
                       + "; ".join(" -> ".join(c) for c in found))


def test_kvkata_paths_is_a_leaf():
    assert import_graph(KVKATA)["kvkata.paths"] == set(), "kvkata/paths.py must import nothing from kvkata"


def test_the_circle_finder_sees_a_circle_through_a_late_import_and_a_relative_one(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def load():\n    from pkg import b\n    return b\n")
    (pkg / "a.py").write_text("from . import c\n")
    (pkg / "b.py").write_text("from pkg import ROOT\n")   # a name from __init__: an edge to pkg
    (pkg / "c.py").write_text("import pkg.a.thing\n")      # a circle a -> c -> a, the relative way
    (pkg / "d.py").write_text("import os\nfrom pkg.a import x\n")  # not in a circle
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.b"}, "pkg.a": {"pkg.c"}, "pkg.b": {"pkg"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}
    assert sorted(cycles(graph)) == [["pkg", "pkg.b", "pkg"], ["pkg.a", "pkg.c", "pkg.a"]]


def _python_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS
                         and not d.endswith(".egg-info"))
        for f in sorted(files):
            if f.endswith(".py"):
                yield Path(folder) / f


def passes_json_option(tree: ast.AST) -> bool:
    """A string that is the option (`"--kvkata-json"`) or starts an f-string with it (`f"--kvkata-json={out}"`);
    a message or docstring that names it in a sentence does not count."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--kvkata-json"):
            return True
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                and str(node.values[0].value).startswith("--kvkata-json"):
            return True
    return False


def test_only_the_runner_runs_pytest_with_the_json_report():
    users = {str(p.relative_to(ROOT)) for p in _python_files()
             if "--kvkata-json" in (text := p.read_text(errors="replace")) and passes_json_option(ast.parse(text))}
    assert {"kvkata/plugin.py", "kvkata/runner.py"} <= users, f"the scan missed the plugin or the runner: {users}"
    stray = sorted(users - set(JSON_OPTION_ALLOWED))
    assert not stray, (f"{stray} pass --kvkata-json themselves: run pytest through kvkata.runner.run "
                       f"(or run_forked) and read Result.data / Result.tests")


def test_the_json_option_scan_tells_an_argument_from_a_sentence():
    assert passes_json_option(ast.parse('cmd = ["pytest", f"--kvkata-json={out}"]'))
    assert passes_json_option(ast.parse('parser.addoption("--kvkata-json", dest="x")'))
    assert not passes_json_option(ast.parse('"""From a --kvkata-json report."""\nassert x, "the --kvkata-json report"'))
