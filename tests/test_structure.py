"""The package's structure: no import cycle between its modules, no module reaching into
another module's private names.

Both checks read the source with ast, so they see every import: at module level, inside
functions, and under `if TYPE_CHECKING:` (a module that needs another's types for its own
annotations depends on it as much as one that calls it). The compiled extension
`llmdist._core` is the one private-looking name modules share: it is the package's C layer,
named with a leading underscore so that users import the Python API instead.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

import llmdist

PACKAGE = pathlib.Path(llmdist.__file__).resolve().parent  # the checkout, or an installed wheel
SHARED_PRIVATE = {"_core"}  # the compiled extension module


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Tuple[pathlib.Path, ast.Module]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _package_of(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = _package_of(module, path).split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(
    module: str, path: pathlib.Path, tree: ast.AST, known: Set[str]
) -> Iterator[Tuple[str, List[str], int]]:
    """(imported module, names taken from it, line) for every import of a package module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            names = [a.name for a in node.names]
            for name in names:  # `from . import x` imports the module x
                sub = f"{target}.{name}" if target else name
                if sub in known:
                    yield sub, [], node.lineno
            if target in known:
                yield target, names, node.lineno


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    known = set(mods)
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for module, (path, tree) in mods.items():
        for target, _, _ in _imports(module, path, tree, known):
            if target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of graph as a list of nodes (first == last), or [] when it has none."""
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_package_import_graph_has_no_cycle():
    graph = _graph()
    # the graph is read from the source: the planner's modules are in it, with their edges
    assert "llmdist.transfers" in graph["llmdist.writes"]
    assert "llmdist.writes" in graph["llmdist.cache_manager"]
    assert find_cycle(graph) == []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in SHARED_PRIVATE


def _defined_names(tree: ast.AST) -> Set[str]:
    """The private names a module defines: functions, classes, module names, attributes it
    assigns (self._x = ..., obj._x = ...), keywords it names (set_defaults(_x=...))."""
    names: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, (ast.keyword, ast.arg)) and node.arg:
            names.add(node.arg)
    return {n for n in names if _private(n)}


def private_uses(mods: Dict[str, Tuple[pathlib.Path, ast.Module]]) -> List[str]:
    """Each use of another package module's private name: `from .m import _x`, `m._x` on a
    package module, or `obj._x` where _x is defined by another package module and not by the
    module using it (self._x and cls._x are a class's own)."""
    known = set(mods)
    defined = {m: _defined_names(tree) for m, (_, tree) in mods.items()}
    found = []
    for module, (path, tree) in mods.items():
        rel = path.relative_to(PACKAGE.parent)
        for target, names, line in _imports(module, path, tree, known):
            for name in names:
                if _private(name) and f"{target}.{name}" not in known:
                    found.append(f"{rel}:{line}: from {target} import {name}")
        own = defined[module]
        elsewhere = set().union(*(d for m, d in defined.items() if m != module))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr in own or node.attr not in elsewhere:
                continue
            found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_private_use_check_sees_each_form():
    src = {
        "llmdist.a": "class A:\n    def __init__(self):\n        self._x = 1\n\ndef _f(): pass\n",
        "llmdist.b": "from .a import _f\nfrom . import a\n\ndef g(obj):\n    return obj._x, a._f\n",
    }
    mods = {m: (PACKAGE / (m.split(".")[1] + ".py"), ast.parse(s)) for m, s in src.items()}
    found = private_uses(mods)
    assert any("import _f" in f for f in found)
    assert any("obj._x" in f for f in found) and any("a._f" in f for f in found)
    assert not any(f.startswith("llmdist/a.py") for f in found)


def test_no_module_uses_another_modules_private_names():
    assert private_uses(_modules()) == []
